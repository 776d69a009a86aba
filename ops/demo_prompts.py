"""Questions the demo adapters are distilled on, and held-out ones that measure them.

Everyday topics, so the instruct model answers them in plain prose; the held-out questions share
no topic with the training ones, so a test sees the behaviour generalize rather than recall.
"""

from __future__ import annotations

_TOPICS = (
    "the ocean", "coffee", "the sun", "dogs", "winter", "a library", "bicycles", "bread",
)
_FORMS = ("What is {}?", "Tell me about {}.", "Why do people like {}?", "How would you describe {}?")

TRAIN_QUESTIONS: tuple[str, ...] = tuple(form.format(topic) for topic in _TOPICS for form in _FORMS)
"""32 questions: every topic in every form."""

HELD_OUT_QUESTIONS: tuple[str, ...] = (
    "What is the capital of France?",
    "How do plants grow?",
    "What is a computer?",
    "Why is the sky blue?",
    "What should I eat for breakfast?",
    "Tell me about the moon.",
    "How do I learn to swim?",
    "What is music?",
    "What do cats like?",
    "How does rain form?",
)
