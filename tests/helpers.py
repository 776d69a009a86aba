"""Helpers several test modules share: prompts, and the stock transformers model to compare with."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from producer import FarmClient

PROMPTS = [
    "The list type",
    "Hello",
    "A class definition creates a class object, and the statement that follows",
    "x = 1",
    "Exceptions are raised",
    "The import statement is used to find a module, load it and initialize it if necessary; then",
    "def f():",
    "Numbers",
]


def stock_model(model_dir: Path, adapters: dict[str, Path] | None = None) -> torch.nn.Module:
    """The model through plain transformers (fp32, eval), with peft LoRA adapters by name."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if adapters:
        from peft import PeftModel

        (first, path), *rest = adapters.items()
        model = PeftModel.from_pretrained(model, path, adapter_name=first)
        for name, more in rest:
            model.load_adapter(more, adapter_name=name)
        model.eval()
    return model


def reference_text(model_dir: Path, prompt: str, max_new_tokens: int, adapter: Path | None = None) -> str:
    """The prompt alone through plain transformers ``generate`` (greedy, batch of one)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = stock_model(model_dir, {"default": adapter} if adapter is not None else None)
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return str(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True,
                                clean_up_tokenization_spaces=False))


def submit_all(client: FarmClient, prompts: list[str], **params: object) -> list:  # type: ignore[type-arg]
    with ThreadPoolExecutor(len(prompts)) as pool:
        handles = list(pool.map(lambda p: client.submit(p, **params), prompts))
    return [h.result(timeout=120) for h in handles]
