"""The Chat tab's logic: a conversation as ``messages``, one streamed answer per turn.

No Gradio here (only the shape of its Chatbot's messages): ``ui.app`` wraps these generators.
The whole history goes out with each turn, as the request's ``messages``; the worker applies
the model's chat template, so the UI never formats a prompt itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from producer.client import FarmClient
from protocol.errors import RequestError
from ui.generate import Update, cancel, generate, request_data

Message = dict[str, Any]
"""One Chatbot message: ``{"role", "content"}``; content a string or Gradio's list of parts."""


@dataclass(frozen=True)
class Turn:
    """What the Chat tab shows after each step of one turn."""

    status: str
    history: list[Message]
    request_id: str


def plain(history: list[Message]) -> list[dict[str, str]]:
    """The Chatbot's history as request ``messages``: Gradio hands content back as a list of
    parts (``{"type": "text", "text": ...}``); only text parts exist in this chat."""
    return [{"role": str(m["role"]), "content": _text(m["content"])} for m in history]


def shown(role: str, text: str) -> Message:
    """A message for the Chatbot. A text part, not a bare string: Gradio dedents a string
    (``inspect.cleandoc``), and the history sent back must be the text the model wrote."""
    return {"role": role, "content": [{"type": "text", "text": text}]}


def chat_data(history: list[Message], message: str, system: str, params: dict[str, Any]) -> dict[str, Any]:
    """The request for the next turn: the optional system prompt, the history, the new message."""
    head = [{"role": "system", "content": system}] if system.strip() else []
    data = request_data(message, True, params)
    return {**data, "messages": [*head, *plain(history), *data["messages"]]}


def chat_turn(client: FarmClient, history: list[Message], message: str, system: str,
              params: dict[str, Any]) -> Iterator[Turn]:
    """The history with the new question and the answer as it streams. Raises ``FarmError``
    when refused (nothing is added to the history then)."""
    if not message.strip():  # the history alone would pass the schema's "not empty"
        raise RequestError.for_field("message", "is empty")
    asked = [*history, shown("user", message)]
    for update in generate(client, chat_data(history, message, system, params)):
        yield Turn(update.status, [*asked, shown("assistant", update.text)], update.request_id)


def cancel_turn(client: FarmClient, request_id: str, history: list[Message]) -> Turn:
    """Cancel the running turn; its answer keeps the text written until it stopped."""
    update: Update = cancel(client, request_id)
    if history and history[-1]["role"] == "assistant" and update.request_id:
        history = [*history[:-1], shown("assistant", update.text or _text(history[-1]["content"]))]
    return Turn(update.status, history, update.request_id)


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", ""))
    return "".join(_text(part) for part in content or ())
