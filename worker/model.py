"""Loading the model once per worker process: transformers + peft (LoRA) + bitsandbytes.

The same code takes a hub name or a local path; here it loads the locally built models.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedTokenizerBase

from protocol.settings import BASE_ADAPTER, FarmSettings
from worker import decode_attention
from worker.prepack import calibrate_min_rows, prepack_linears, set_min_rows

log = logging.getLogger(__name__)

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    """A model ready to generate, with what the engine needs to know about it."""

    model: Any
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    name: str
    quant: str
    adapters: list[str] = field(default_factory=list)
    """Loaded LoRA adapter names (``base`` excluded)."""
    default_adapter: str = BASE_ADAPTER
    packed_layers: int = 0
    """Linear layers running on oneDNN-packed weights (``FARM_CPU_PREPACK``)."""

    @property
    def eos_ids(self) -> frozenset[int]:
        eos = self.tokenizer.eos_token_id
        config_eos = getattr(self.model.generation_config, "eos_token_id", None)
        ids = {i for i in (eos, *(_as_list(config_eos))) if i is not None}
        return frozenset(ids)


def load_model(settings: FarmSettings, device: str = "cpu") -> LoadedModel:
    """Load tokenizer, base model (quantized if asked) and LoRA adapters onto ``device``."""
    _quiet_bitsandbytes()
    tokenizer = load_tokenizer(settings.model)
    target = torch.device(device)
    model = AutoModelForCausalLM.from_pretrained(settings.model, **_model_kwargs(settings, target))
    if settings.quant == "none":
        model.to(target)
    model.eval()
    # Before peft wraps the layers: only base weights are packed, LoRA's small ones stay stock.
    packed = prepack_linears(model) if settings.cpu_prepack else 0  # CPU float32 layers only
    if packed:
        _packed_min_rows(model, settings.packed_min_rows)
    if settings.cpu_decode_attention:
        decode_attention.enable(model)
    adapters = settings.adapter_paths()
    if adapters:
        model = _attach_adapters(model, adapters)
    default = "default" if "default" in adapters else BASE_ADAPTER
    log.info("loaded %s (quant=%s, adapters=%s, oneDNN-packed linears=%d, attention=%s) on %s",
             settings.model, settings.quant, list(adapters) or "none", packed,
             model.config._attn_implementation, target)
    return LoadedModel(model, tokenizer, target, settings.model, settings.quant, list(adapters), default, packed)


def _packed_min_rows(model: Any, rows: int) -> None:
    if rows:
        set_min_rows(model, rows)
        return

    def forward(n: int) -> None:
        model(input_ids=torch.zeros(1, n, dtype=torch.long, device=model.device), use_cache=False)

    calibrate_min_rows(model, forward)


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """Left padding: right padding changes batched outputs of decoder-only models."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _model_kwargs(settings: FarmSettings, device: torch.device) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"dtype": "auto" if settings.dtype == "auto" else _DTYPES[settings.dtype]}
    quant = quantization_config(settings)
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": device.index if device.type == "cuda" else "cpu"}
    return kwargs


def quantization_config(settings: FarmSettings) -> BitsAndBytesConfig | None:
    """bitsandbytes config for ``FARM_QUANT`` (transformers 5 dropped ``load_in_8bit=``)."""
    if settings.quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=settings.llm_int8_threshold)
    if settings.quant == "nf4":
        compute = torch.float32 if settings.dtype in ("float32", "auto") else _DTYPES[settings.dtype]
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_compute_dtype=compute)
    return None


def _attach_adapters(model: Any, adapters: dict[str, str]) -> Any:
    # Unmerged on purpose: merging LoRA into int8 weights is lossy, and several adapters must
    # stay switchable per batch.
    from peft import PeftModel

    names = list(adapters)
    peft_model = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(adapters[name], adapter_name=name)
    peft_model.eval()
    return peft_model


def load_adapter(loaded: LoadedModel, name: str, path: str) -> None:
    """Add an adapter to a running worker without restarting it."""
    if not loaded.adapters:
        loaded.model = _attach_adapters(loaded.model, {name: path})
    else:
        loaded.model.load_adapter(path, adapter_name=name)
    loaded.adapters.append(name)


def _quiet_bitsandbytes() -> None:
    # On CPU bitsandbytes logs a cast warning on every matmul.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def render_prompt(loaded: LoadedModel, template: str, prompt: str | None,
                  messages: tuple[dict[str, str], ...] | None) -> str:
    """The text the model sees: the prompt, in the configured template."""
    if messages is None and template == "alpaca":
        return ALPACA_TEMPLATE.format(instruction=prompt)
    if messages is None and template != "chat":
        return prompt or ""
    chat = list(messages) if messages is not None else [{"role": "user", "content": prompt or ""}]
    if getattr(loaded.tokenizer, "chat_template", None):
        return str(loaded.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False))
    return "".join(f"{m['role']}: {m['content']}\n" for m in chat) + "assistant:"
