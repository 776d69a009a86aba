"""Helpers several test modules share: prompts, and the stock transformers model to compare with."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from producer import FarmClient
from worker.engine.runner import Quiet as Quiet  # tests import the observer from here too

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



def tiny_runner(tiny_model: Path) -> Iterator[Any]:
    """A ``ModelRunner`` on the tiny model with adapters ``default`` and ``second``, on one torch
    thread (as a worker here runs it: a tiny model on a busy 2-core CPU); for module fixtures."""
    from protocol.settings import FarmSettings
    from worker.engine.model_runner import ModelRunner
    from worker.model import load_model

    settings = FarmSettings(model=str(tiny_model), adapter=str(tiny_model / "adapter"),
                            adapters=f"second={tiny_model / 'adapter2'}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield ModelRunner(load_model(settings, "cpu"))
    torch.set_num_threads(threads)


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
