"""The Bulk tab: upload prompts, run them as a job, follow its progress, download results."""

from __future__ import annotations

import gradio as gr

from producer.client import FarmClient
from protocol.settings import FarmSettings


def build_tab(client: FarmClient, settings: FarmSettings) -> None:
    gr.Markdown("Bulk jobs: not available yet.")
