"""The Gradio UI: thin callbacks over ``producer.FarmClient`` (never imports torch)."""
