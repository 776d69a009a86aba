"""The model picker: the models the workers serve (``FarmClient.models()``, from their
heartbeats), which one is chosen, the adapters of the chosen one, and the interactive queues a
request for it waits in.

Gradio only in ``model_dropdown``: ``ui.app`` fills the dropdowns from a ``Picker``.
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from producer.client import FarmClient
from protocol.errors import FarmError
from protocol.models import ServedModel
from protocol.names import INTERACTIVE_QUEUE, model_queue

DEFAULT_ADAPTER_CHOICE = "(farm default)"
"""The adapter choice that names none: the worker's default adapter (or the base model)."""


@dataclass(frozen=True)
class Picker:
    """The model dropdown's choices and value, and the adapters of the chosen model."""

    models: tuple[str, ...]
    model: str | None
    """The chosen model: the one asked for if it is served, else the only one, else the farm's
    default (``FARM_DEFAULT_MODEL``); None when there is nothing to choose or the person must."""
    adapters: tuple[str, ...]
    """Adapter choices: ``DEFAULT_ADAPTER_CHOICE`` first, then the chosen model's (every
    model's when none is chosen)."""


def model_dropdown(elem_id: str) -> gr.Dropdown:
    """A tab's model picker, empty until the page loads (``ui.app`` fills it then, and again
    whenever it is opened). Other values are allowed: the choices are the page's, so a caller of
    the UI's API (``gradio_client``) has none, and the farm refuses an unknown model itself,
    naming those served."""
    return gr.Dropdown([], value=None, label="Model", elem_id=elem_id, allow_custom_value=True)


def pick(models: list[ServedModel], wanted: str | None, default: str = "") -> Picker:
    """The picker for ``models`` served now, keeping ``wanted`` (the choice on the page) if it is one."""
    names = tuple(m.name for m in models)
    if wanted in names:
        chosen: str | None = wanted
    elif len(names) == 1:
        chosen = names[0]
    else:
        chosen = default if default in names else None
    offered = [a for m in models if chosen is None or m.name == chosen for a in m.adapters]
    return Picker(names, chosen, (DEFAULT_ADAPTER_CHOICE, *dict.fromkeys(offered)))


def read_picker(client: FarmClient, wanted: str | None) -> Picker:
    """The picker as the farm stands now; an unreachable Redis is an empty list (the request
    itself then says why it cannot be sent)."""
    try:
        models = client.models()
    except FarmError:
        models = []
    return pick(models, wanted, client.settings.default_model)


def interactive_queues(models: list[ServedModel], model: str | None) -> list[str]:
    """The queues whose waiting requests go before a new interactive one for ``model`` on its
    workers: the model's own (``interactive.<model>``), and the plain ``interactive`` queue if
    those workers take it too (they serve the farm's default model) or no model is named."""
    if model is None:
        return [INTERACTIVE_QUEUE]
    consumed = {q for m in models if m.name == model for q in m.queues}
    plain = [INTERACTIVE_QUEUE] if INTERACTIVE_QUEUE in consumed else []
    return [model_queue(INTERACTIVE_QUEUE, model), *plain]
