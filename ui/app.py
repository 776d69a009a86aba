"""The farm's Gradio UI: Generate (a chat, and plain completion), Bulk jobs, Farm status.

``python -m ui.app`` or ``farm ui``. Every callback is a thin wrapper over ``producer``: the
model runs in the workers, this process only enqueues and waits on Redis.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator
from typing import Any

import gradio as gr

from producer.client import FarmClient
from protocol.errors import FarmError, SettingsError
from protocol.schema import Limits
from protocol.settings import FarmSettings
from ui import bulk, chat, farm, status
from ui.generate import Update, cancel, generate, request_data
from ui.models import DEFAULT_ADAPTER_CHOICE, Picker, model_dropdown, read_picker

log = logging.getLogger(__name__)

FARM_REFRESH_SECONDS = 2.0
CLOCK_FORMAT = "%H:%M:%S"
GenerateOutputs = tuple[str, str, str]
ModelPicker = tuple[gr.Dropdown, gr.Dropdown]
"""A tab's model dropdown and the adapter dropdown that follows the chosen model."""


def build_app(client: FarmClient, settings: FarmSettings) -> gr.Blocks:
    """The UI for one farm; ``settings`` give the limits, the queue size and Flower's port."""
    with gr.Blocks(title="batchfarm", analytics_enabled=False) as demo:
        gr.Markdown("## batchfarm\nGeneration requests are queued in Redis and batched by the workers.")
        with gr.Tab("Generate") as generate_tab:
            pickers = _generate_tab(client, settings)
        with gr.Tab("Bulk") as bulk_tab:
            bulk_parts = bulk.build_tab(client, settings)
        with gr.Tab("Farm") as farm_tab:
            timer, farm_outputs = _farm_tab(client, settings)
        pickers.append((bulk_parts.model, bulk_parts.adapter))
        # Poll the farm (or the batches) only while its tab is open: every open page would
        # otherwise hit Redis.
        refresh = _farm_refresher(client, settings)
        timers = [timer, bulk_parts.timer]

        def on_farm_tab(request: gr.Request) -> tuple[Any, ...]:
            return gr.Timer(active=True), gr.Timer(active=False), *refresh(request)

        def on_bulk_tab() -> tuple[Any, ...]:
            return gr.Timer(active=False), gr.Timer(active=True), *bulk.refresh_batches(client)

        farm_tab.select(on_farm_tab, outputs=[*timers, *farm_outputs], api_visibility="private",
                        show_progress="hidden")
        bulk_tab.select(on_bulk_tab, outputs=[*timers, *bulk_parts.batches], api_visibility="private",
                        show_progress="hidden")
        generate_tab.select(lambda: (gr.Timer(active=False),) * 2, outputs=timers, api_visibility="private")
        _wire_pickers(demo, client, pickers)
        demo.load(refresh, outputs=farm_outputs, api_visibility="private", show_progress="hidden")
    # Each Generate callback spends its life waiting on Redis while the workers batch; a low
    # concurrency limit (Gradio's default is 1) would feed the farm one request at a time and
    # make every batch a batch of one. So as many run at once as the farm may queue
    # (FARM_UI_MAX_QUEUE, checked against Redis before enqueueing); only beyond that do events
    # wait in Gradio's own queue, which holds as many again before it says it is full.
    demo.queue(default_concurrency_limit=settings.ui_max_queue, max_size=settings.ui_max_queue)
    return demo


def _generate_tab(client: FarmClient, settings: FarmSettings) -> list[ModelPicker]:
    """A chat for instruct models, and plain completion (today's ``/generate``) for base models."""
    with gr.Tab("Chat"):
        chat_picker = _chat_tab(client, settings)
    with gr.Tab("Completion"):
        picker = _completion_tab(client, settings)
    return [chat_picker, picker]


def _wire_pickers(demo: gr.Blocks, client: FarmClient, pickers: list[ModelPicker]) -> None:
    """Every model dropdown is filled on page load and read again whenever it is opened (a
    worker may have come since), keeping the choice; its adapter dropdown follows the model."""
    def filled(wanted: str | None = None) -> tuple[gr.Dropdown, gr.Dropdown]:
        return _picker_updates(read_picker(client, wanted))

    for model, adapter in pickers:
        model.focus(filled, inputs=model, outputs=[model, adapter], api_visibility="private",
                    show_progress="hidden")
        model.input(filled, inputs=model, outputs=[model, adapter], api_visibility="private",
                    show_progress="hidden")
    demo.load(lambda: filled() * len(pickers), outputs=[w for pair in pickers for w in pair],
              api_visibility="private", show_progress="hidden")


def _picker_updates(picker: Picker) -> tuple[gr.Dropdown, gr.Dropdown]:
    """The model dropdown, and the adapter dropdown (shown only when there is a choice)."""
    return (gr.Dropdown(list(picker.models), value=picker.model),
            gr.Dropdown(list(picker.adapters), value=DEFAULT_ADAPTER_CHOICE, visible=len(picker.adapters) > 2))


def _parameters(settings: FarmSettings, prefix: str = "") -> list[Any]:
    """max new tokens, temperature, top-p, adapter, seed: the request's knobs, in this order."""
    max_new = gr.Slider(1, settings.max_new_tokens, value=min(settings.default_new_tokens, settings.max_new_tokens),
                        step=1, label="Max new tokens", elem_id=f"{prefix}max-new-tokens")
    temperature = gr.Slider(0.0, Limits.from_settings(settings).max_temperature, value=0.0, step=0.05,
                            label="Temperature (0 = greedy)")
    top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p")
    adapter = gr.Dropdown([DEFAULT_ADAPTER_CHOICE], value=DEFAULT_ADAPTER_CHOICE, label="Adapter (LoRA)",
                          visible=False, elem_id=f"{prefix}adapter")
    seed = gr.Number(-1, precision=0, label="Seed (-1: random)", minimum=-1)
    return [max_new, temperature, top_p, adapter, seed]


def _params(new_tokens: float, temp: float, p: float, adapter_name: str | None,
            seed_value: float | None, model_name: str | None = None) -> dict[str, Any]:
    return {"max_new_tokens": new_tokens, "temperature": temp, "top_p": p, "adapter": adapter_name,
            "seed": seed_value, "model": model_name}


def _chat_tab(client: FarmClient, settings: FarmSettings) -> ModelPicker:
    with gr.Row():
        with gr.Column(scale=3):
            chatbot = gr.Chatbot(label="Chat", height=460, elem_id="chatbot", buttons=["copy"])
            message = gr.Textbox(label="Message", lines=1, max_lines=8, autofocus=True, elem_id="chat-message",
                                 placeholder="Ask something; Enter sends, Shift+Enter starts a new line.")
            with gr.Row():
                send = gr.Button("Send", variant="primary", elem_id="chat-send")
                stop = gr.Button("Cancel", variant="stop", elem_id="chat-cancel")
                clear = gr.Button("New chat", elem_id="chat-clear")
            line = gr.Markdown("Ready.", elem_id="chat-status")
        with gr.Column(scale=1, min_width=260):
            model = model_dropdown("chat-model")
            system = gr.Textbox(label="System prompt (optional)", lines=2, elem_id="chat-system")
            params = [*_parameters(settings, "chat-"), model]
    request_id = gr.Textbox(visible="hidden", elem_id="chat-request-id")  # in the DOM: tests read it

    def on_chat(text: str, history: list[chat.Message] | None, system_prompt: str,
                *knobs: Any) -> Iterator[tuple[Any, ...]]:
        try:
            for turn in chat.chat_turn(client, history or [], text, system_prompt or "", _params(*knobs)):
                yield turn.status, turn.history, turn.request_id, ""
        except FarmError as error:
            yield _refused(error), history or [], "", text

    event = gr.on([send.click, message.submit], on_chat, inputs=[message, chatbot, system, *params],
                  outputs=[line, chatbot, request_id, message], api_name="chat", show_progress="hidden")
    stop.click(lambda rid, history: _turn(chat.cancel_turn(client, rid, history or [])),
               inputs=[request_id, chatbot], outputs=[line, chatbot, request_id], cancels=[event],
               api_name="chat_cancel")
    clear.click(lambda: ("Ready.", [], ""), outputs=[line, chatbot, request_id], cancels=[event],
                api_visibility="private")
    return model, params[3]


def _turn(turn: chat.Turn) -> tuple[str, list[chat.Message], str]:
    return turn.status, turn.history, turn.request_id


def _completion_tab(client: FarmClient, settings: FarmSettings) -> ModelPicker:
    # One line that grows: Gradio submits on Enter only in a one-line box (Shift+Enter adds a line).
    prompt = gr.Textbox(label="Prompt", lines=1, max_lines=12, elem_id="prompt",
                        placeholder=f"Type a prompt (up to {settings.max_prompt_chars} characters); "
                                    "Enter submits, Shift+Enter starts a new line.")
    with gr.Row():
        submit = gr.Button("Submit", variant="primary", elem_id="submit")
        stop = gr.Button("Cancel", variant="stop", elem_id="cancel")
        model = model_dropdown("model")
    with gr.Accordion("Parameters", open=False):
        as_chat = gr.Checkbox(False, label="Chat: send as a user message (the worker applies its chat template)")
        with gr.Row():
            params = [*_parameters(settings), model]
    line = gr.Markdown("Ready.", elem_id="status")
    output = gr.Textbox(label="Output", lines=10, interactive=False, elem_id="output")
    request_id = gr.Textbox(label="Request id", interactive=False, elem_id="request-id", max_lines=1)

    def on_generate(text: str, chat_box: bool, *knobs: Any) -> Iterator[GenerateOutputs]:
        yield from _stream(client, request_data(text, chat_box, _params(*knobs)))

    event = gr.on([submit.click, prompt.submit], on_generate, inputs=[prompt, as_chat, *params],
                  outputs=[line, output, request_id], api_name="generate", show_progress="minimal")
    stop.click(lambda rid: _outputs(cancel(client, rid)), inputs=request_id,
               outputs=[line, output, request_id], cancels=[event], api_name="cancel")
    return model, params[3]


def _stream(client: FarmClient, data: dict[str, Any]) -> Iterator[GenerateOutputs]:
    """Updates of one request. A refusal is the status line plus a warning toast, not a
    ``gr.Error``: an error would stamp "Error" over the very line that says why."""
    try:
        for update in generate(client, data):
            yield _outputs(update)
    except FarmError as error:
        yield _refused(error), "", ""


def _refused(error: FarmError) -> str:
    """A refusal is the status line plus a warning toast."""
    message = status.refused(error)
    log.info("request refused: %s", error.message)
    gr.Warning(message, duration=status.TOAST_SECONDS)
    return f"**Not sent.** {message}"


def _outputs(update: Update) -> GenerateOutputs:
    return update.status, update.text, update.request_id


def _farm_tab(client: FarmClient, settings: FarmSettings) -> tuple[gr.Timer, list[Any]]:
    summary = gr.Markdown("Loading…", elem_id="farm-summary")
    workers = gr.Dataframe(headers=farm.WORKER_COLUMNS, interactive=False, label="Workers online")
    with gr.Row():
        # Points, not bars: a bar on a time axis has no width, and a lone batch would not show.
        # The frames' dtypes make the axes (farm.BATCH_DTYPES); the clock format keeps the time
        # labels of a minute's batches apart (Vega's default shows only ":30", ":40").
        sizes = gr.ScatterPlot(x="time", y="batch size", color="worker", title="Recent batch sizes",
                               y_title="requests in the batch", y_lim=[0, None], height=280,
                               x_axis_format=CLOCK_FORMAT, elem_id="batch-sizes")
        speed = gr.LinePlot(x="time", y="tokens/s", color="worker", title="Throughput of recent batches",
                            y_title="tokens/s", y_lim=[0, None], height=280, x_axis_format=CLOCK_FORMAT,
                            elem_id="batch-speed")
    colors = gr.State({})
    # A changed colour map (a worker came or went) makes Gradio rebuild the charts with the data
    # they hold; a tick with the same workers only swaps the data (see farm.worker_colors).
    colors.change(lambda c: (gr.ScatterPlot(color_map=c), gr.LinePlot(color_map=c)), inputs=colors,
                  outputs=[sizes, speed], api_visibility="private", show_progress="hidden")
    outputs: list[Any] = [summary, workers, sizes, speed, colors]
    timer = gr.Timer(FARM_REFRESH_SECONDS, active=False)
    timer.tick(_farm_refresher(client, settings), outputs=outputs, show_progress="hidden",
               api_name="farm", concurrency_limit=8)
    return timer, outputs


def _farm_refresher(client: FarmClient, settings: FarmSettings) -> Any:
    def refresh(request: gr.Request) -> tuple[str, Any, Any, Any, dict[str, str]]:
        host = request.headers.get("host") if request is not None else None
        view = farm.farm_view(client, farm.flower_url(settings, host))
        return view.summary, view.workers, view.batches, view.batches, farm.worker_colors(view.batches)

    return refresh


def parse_auth(value: str) -> tuple[str, str] | None:
    """``FARM_UI_AUTH=user:pass`` as Gradio's ``auth``; empty means no login."""
    if not value:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise SettingsError("FARM_UI_AUTH must be user:pass")
    return user, password


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="farm ui", description="Start the farm's Gradio UI.")
    parser.add_argument("--host", help="bind address (FARM_UI_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (FARM_UI_PORT, default 7860)")
    parser.add_argument("--redis-url", help="the farm's Redis (FARM_REDIS_URL)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = {k: v for k, v in {"ui_host": args.host, "ui_port": args.port,
                                   "redis_url": args.redis_url}.items() if v is not None}
    try:
        settings = FarmSettings.from_env(**overrides)
        auth = parse_auth(settings.ui_auth)
    except SettingsError as error:
        print(f"farm ui: {error}", file=sys.stderr)
        return 2
    if auth is None and settings.ui_host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("the UI binds %s without FARM_UI_AUTH: anyone who reaches it can use the farm",
                    settings.ui_host)
    demo = build_app(FarmClient(settings=settings), settings)
    log.info("UI for the farm at %s on http://%s:%d", settings.redacted_redis_url(), settings.ui_host,
             settings.ui_port)
    # Threads carry the callbacks' Redis waits; one per concurrent event plus room for the rest.
    demo.launch(server_name=settings.ui_host, server_port=settings.ui_port, auth=auth,
                max_threads=settings.ui_max_queue + 40, ssr_mode=False, show_error=True, quiet=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
