"""Typed farm settings, read once from ``FARM_*`` environment variables at an entry point.

Library code never reads the environment itself: an entry point calls
``FarmSettings.from_env()`` and passes the object down.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocol.errors import SettingsError

QUANT_CHOICES = ("none", "int8", "nf4")
DTYPE_CHOICES = ("float32", "float16", "bfloat16", "auto")
TEMPLATE_CHOICES = ("none", "alpaca", "chat")
STRATEGY_CHOICES = ("dynamic", "continuous")
PACKED_MIN_ROWS_LIMIT = 64
"""Largest ``FARM_PACKED_MIN_ROWS``, and the most rows a packed layer serves
(``worker.prepack.PACKED_MAX_ROWS`` is this value)."""
BASE_ADAPTER = "base"
"""Adapter name that asks for the base model without any LoRA adapter."""
DEFAULT_ADAPTER = "default"
"""Name under which ``FARM_ADAPTER`` is loaded."""
MODEL_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""A model's public name: it is part of its queues' names (``interactive.<name>``); ``:`` is
kept for ``model:adapter`` and ``/`` left out (the last part of a hub id is the default)."""


def project_root() -> Path:
    """The checkout this package lives in (holds ``.farm/`` with models and data)."""
    return Path(__file__).resolve().parent.parent


def default_model_path() -> str:
    """The embedded demo model that ``farm make-model --size demo`` builds on first use."""
    return str(project_root() / ".farm" / "models" / "demo")


@dataclass(frozen=True)
class FarmSettings:
    """Every knob of the farm. Each field maps to ``FARM_<FIELD>`` in upper case."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    """Broker, result backend and stream store."""
    redis_socket_timeout: float = 3.0
    """Seconds a Redis reply may take before the connection counts as broken (above the 1 s
    blocking reads of clients); a Redis that accepts and never answers fails within seconds."""
    redis_connect_timeout: float = 2.0
    """Seconds to open a connection to Redis."""
    model: str = field(default_factory=default_model_path)
    """A hub name or a local path of a causal LM."""
    model_name: str = ""
    """The model's public name, which requests give in ``model`` and which names its queues;
    empty: the last part of ``FARM_MODEL``'s path or hub id (``served_model_name()``)."""
    default_model: str = ""
    """The model of requests that name none; empty: the only model served. In a farm of several
    models set it on every process: only this model's workers take requests that name no model."""
    adapter: str = ""
    """Optional peft LoRA adapter (name or path) loaded as adapter ``default``."""
    adapters: str = ""
    """More adapters, ``name=path,name2=path2``; requests pick one by name."""
    quant: str = "none"
    """``none | int8 | nf4`` through bitsandbytes."""
    dtype: str = "float32"
    """Weights dtype for unquantized layers."""
    template: str = "none"
    """Prompt template: ``none``, ``alpaca`` (alpaca-lora) or ``chat`` (the tokenizer's)."""
    llm_int8_threshold: float = 6.0
    """LLM.int8 outlier threshold; 0 makes int8 outputs depend less on batch neighbours."""
    strategy: str = "continuous"
    """Batching strategy of the engine: ``continuous`` (requests join and leave the running batch at
    every step; the default: faster under load and short requests are not held behind long ones,
    see README "Performance") or ``dynamic`` (group, run to completion)."""
    max_batch_size: int = 64
    """Most requests in one batch: a ceiling; ``max_batch_tokens`` decides how many fit."""
    max_batch_tokens: int = 8192
    """Token budget of one batch: rows × (longest prompt + most new tokens)."""
    max_wait_ms: float = 10.0
    """Dynamic strategy: how long a lone request waits for batch-mates when the engine is idle.
    The continuous strategy starts at once (later arrivals join at the next decode step)."""
    prefix_cache_mb: int = 256
    """Continuous strategy: memory for the prefix cache, which keeps the keys and values of
    prompts' leading 64-token blocks so that prompts starting alike (a system prompt, a few-shot
    prefix, a job's instruction) prefill them once; least recently used blocks are evicted.
    0 turns it off; quantized models (int8, nf4) run without it."""
    prefill_chunk_tokens: int = 2048
    """Continuous strategy: while rows run, requests joining them are prefilled in chunks of at
    most this many tokens (rows × prompt columns) per decode step, so that a long prompt joining
    does not stall the running rows for its whole prefill; 0 prefills joiners at once."""
    packed_prefill: int = 1
    """Continuous strategy: 1 prefills joiners of one adapter as one sequence without left padding
    where that takes fewer FLOPs (short prompts of unequal lengths: 15 prompts of 11-53 tokens
    prefilled in ~0.55x the time); 0 always left-pads them to the longest."""
    max_inflight: int = 64
    """Messages a worker process reserves at once (threads in its pool)."""
    torch_threads: int = 0
    """Torch intra-op threads of a worker; 0 picks half the CPU cores (at least 1), which leaves
    cores for Redis, Celery and clients: two threads on two busy cores ran 5-20x slower."""
    cpu_prepack: int = 1
    """1: on the CPU, float32 ``nn.Linear`` weights are also packed once for oneDNN, which runs the
    few rows of a decode step ~2x faster than stock matmul (README "Performance"); costs a second
    copy of those weights in RAM. 0: stock torch matmul only."""
    cpu_decode_attention: int = 1
    """1: on the CPU, a float32 model's decode-step attention runs in a small C++ kernel built on
    first use (``worker/decode_attention.py``; 0.38-0.41 against SDPA's 0.60-0.70 ms per layer of
    16 rows of the bench model); where it cannot be built, torch's SDPA. 0: SDPA only."""
    keep_freed_memory: int = 1
    """1: the worker's C heap keeps what torch frees (glibc ``mallopt``), so that the next tensors
    reuse it without page faults (a 64-prompt join of a 134M model: 3.5-4.3 s with 264,000 faults,
    2.6-3.1 s without); the worker's resident memory then stays at its peak. 0: glibc's defaults."""
    warmup: int = 1
    """1: before taking work, the worker runs one burst of the largest batch (``max_batch_size``
    rows of 32 tokens, within ``max_batch_tokens``) and drops it, so that the first real burst
    finds its memory and kernels ready (the first 64-prompt join of a 134M model: 5.9-6.5 s cold,
    2.0-3.3 s warm); costs that burst's time at start (3-4 s for 64 rows of a 134M model on 2 CPU
    cores). 0: the first burst pays it."""
    packed_min_rows: int = 0
    """With ``cpu_prepack``: inputs of fewer rows (a lone user's decode step has one) take stock
    matmul. 0 measures it when the model loads (2-3 s for a 135M model): whether MKL or the packed
    oneDNN kernel runs 1-3 rows faster depends on the CPU."""
    max_prompt_chars: int = 16000
    """Longest prompt (or chat, all messages) in characters, checked before enqueueing."""
    max_prompt_tokens: int = 2048
    """Longest prompt in tokens, checked by the worker after templating."""
    max_new_tokens: int = 1024
    """Upper limit of a request's ``max_new_tokens``."""
    default_new_tokens: int = 128
    """A request's ``max_new_tokens`` when it gives none."""
    result_expires: int = 86400
    """Seconds results and streams stay in Redis."""
    visibility_timeout: int = 7200
    """Seconds before an unacknowledged message returns to the queue; above the longest batch."""
    stream_maxlen: int = 4096
    """Most events kept in one request's partial-text stream."""
    stream_flush_ms: int = 50
    """How often a worker writes the running rows' new text to their streams, at most (a first
    token and a finished row go at once). Each write wakes every streaming client, whose threads
    and Redis's then take the cores the decode step runs on: a CPU host under load gains a little
    from a longer interval (demo model, 16 clients: 2-4 % more tok/s at 250 ms), at the price of
    fewer, larger updates in the UI and API streams."""
    heartbeat_seconds: float = 2.0
    """How often a worker writes its heartbeat record."""
    worker_name: str = ""
    """Celery node name; empty picks ``cpu@host`` or ``gpuN@host``."""
    metrics_port: int = 0
    """Prometheus port of a worker; 0 disables."""
    metrics_host: str = "127.0.0.1"
    """Address a worker's metrics endpoint binds (``0.0.0.0`` in a container for Prometheus)."""
    flower_port: int = 5555
    """Flower's port (monitoring UI, its API and Prometheus ``/metrics``)."""
    ui_host: str = "127.0.0.1"
    """Address the Gradio UI binds; anything beyond loopback should come with ``FARM_UI_AUTH``."""
    ui_port: int = 7860
    """The Gradio UI's port."""
    ui_auth: str = ""
    """``user:pass`` to require a login in the UI."""
    ui_max_queue: int = 256
    """Most requests waiting ahead in the chosen model's interactive queues (its own, and the
    plain one if its workers take it) before the UI refuses new ones as a full queue; also the
    size of the UI's own (Gradio) queue."""
    flower_auth: str = ""
    """``user:pass`` for Flower's basic auth (required when Flower binds beyond loopback)."""
    api_host: str = "127.0.0.1"
    """Address ``farm api`` (the OpenAI-compatible HTTP API) binds; beyond loopback it requires
    ``FARM_API_KEYS`` or ``FARM_API_KEYS_FILE``."""
    api_port: int = 8000
    """Port of ``farm api``; its base URL is ``http://HOST:PORT/v1``."""
    api_keys: str = field(default="", repr=False)
    """Comma-separated bearer keys of ``farm api``; with keys set, every endpoint but ``/health``
    needs one. Empty (and no keys file): no keys, loopback only."""
    api_keys_file: str = ""
    """A file of ``farm api`` keys, one a line (``#`` comments), added to ``FARM_API_KEYS``."""
    api_key_concurrency: int = 0
    """Most requests one key may have in flight at once across all API replicas; 0: no limit."""
    api_key_rpm: int = 0
    """Most requests one key may start per minute across all API replicas; 0: no limit."""
    api_max_queue: int = 256
    """Most requests waiting in the interactive queue before ``farm api`` answers 429."""
    job_window: int = 256
    """Most messages of one bulk job outstanding in Redis at once."""
    job_runner: int = 1
    """1: every ``farm api`` process also runs detached jobs (``farm submit --detach``, the Batch
    API), each pumped by one process at a time and taken over when it dies; 0: this one does not."""
    file_max_bytes: int = 104857600
    """Largest file ``POST /v1/files`` takes (100 MiB; files live in Redis, shared by every API
    replica). A batch input file also holds at most 50,000 requests, as OpenAI's."""
    file_ttl: int = 604800
    """Seconds an uploaded file (and a batch's output and error files) stays, its ``expires_at``."""
    batch_window_seconds: int = 86400
    """Seconds a batch has to finish (its ``completion_window``, ``24h`` as OpenAI's); rows not
    finished by then go to its error file as ``batch_expired``."""
    count_executions: int = 0
    """1: workers count executions per request id in Redis (tests, reliability reports)."""
    inject_faults: int = 0
    """1: prompts containing ``<<poison>>`` fail and ``<<oom>>`` raise out-of-memory in batches
    (fault-injection tests only)."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> FarmSettings:
        """Build settings from ``FARM_*`` variables; ``overrides`` win over the environment."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = env.get("FARM_" + f.name.upper())
            if raw is not None and raw != "":
                values[f.name] = _convert(f.name, f.type, raw)
        values.update(overrides)
        return cls(**values)

    def __post_init__(self) -> None:
        _check_choice("quant", self.quant, QUANT_CHOICES)
        _check_choice("dtype", self.dtype, DTYPE_CHOICES)
        _check_choice("template", self.template, TEMPLATE_CHOICES)
        _check_choice("strategy", self.strategy, STRATEGY_CHOICES)
        for name in ("max_batch_size", "max_batch_tokens", "max_inflight", "max_new_tokens",
                     "max_prompt_tokens", "max_prompt_chars", "job_window", "api_max_queue",
                     "file_max_bytes", "file_ttl", "batch_window_seconds"):
            if getattr(self, name) < 1:
                raise SettingsError(f"FARM_{name.upper()} must be at least 1")
        if not 0 <= self.packed_min_rows <= PACKED_MIN_ROWS_LIMIT:
            raise SettingsError(f"FARM_PACKED_MIN_ROWS must be 0 (measure) to {PACKED_MIN_ROWS_LIMIT}")
        self.adapter_paths()
        for setting, name in (("FARM_MODEL_NAME", self.model_name), ("FARM_DEFAULT_MODEL", self.default_model)):
            if name:
                check_model_name(name, setting)

    def served_model_name(self) -> str:
        """The public name of the model a worker serves (``FARM_MODEL_NAME``, else the last part
        of ``FARM_MODEL``): the one definition, read by the heartbeat, the queues and the results."""
        name = self.model_name or (self.model.rstrip("/").rsplit("/", 1)[-1] or self.model)
        return check_model_name(name, "FARM_MODEL_NAME (default: the last part of FARM_MODEL)")

    def takes_unnamed(self) -> bool:
        """Whether this worker also takes requests that name no model (it serves the default)."""
        return not self.default_model or self.default_model == self.served_model_name()

    def adapter_paths(self) -> dict[str, str]:
        """Adapters the worker loads, by request name (``default`` is ``FARM_ADAPTER``)."""
        paths: dict[str, str] = {}
        if self.adapter:
            paths[DEFAULT_ADAPTER] = self.adapter
        for item in filter(None, (p.strip() for p in self.adapters.split(","))):
            name, sep, path = item.partition("=")
            if not sep or not name.strip() or not path.strip():
                raise SettingsError(f"FARM_ADAPTERS entry {item!r} is not name=path")
            if name.strip() == BASE_ADAPTER:
                raise SettingsError(f"FARM_ADAPTERS: {BASE_ADAPTER!r} is reserved for the base model")
            paths[name.strip()] = path.strip()
        return paths

    def adapter_names(self) -> list[str]:
        """Names a request may give in ``adapter``."""
        return [BASE_ADAPTER, *self.adapter_paths()]

    def redacted_redis_url(self) -> str:
        """The Redis URL without its password, for logs and screens."""
        return redact_url(self.redis_url)


def redact_url(url: str) -> str:
    """``redis://:secret@host`` -> ``redis://:***@host``; URLs without a password unchanged."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    creds, _, host = rest.rpartition("@")
    user, colon, _password = creds.partition(":")
    return f"{scheme}://{user}{':***' if colon else ''}@{host}"


def check_model_name(name: str, setting: str) -> str:
    if not MODEL_NAME_PATTERN.fullmatch(name):
        raise SettingsError(f"{setting}={name!r} is not a model name (letters, digits, '.', '_', '-'; "
                            "at most 64 characters, no ':' or '/')")
    return name


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise SettingsError(f"FARM_{name.upper()}={value!r} is not one of {', '.join(choices)}")


def _convert(name: str, annotation: Any, raw: str) -> Any:
    kind = str(annotation)
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        noun = "an integer" if kind == "int" else "a number"
        raise SettingsError(f"FARM_{name.upper()}={raw!r} is not {noun}") from None
    return raw
