"""oneDNN weight prepacking (``FARM_CPU_PREPACK``): the real tiny model, with and without LoRA, gives
the same greedy tokens and (to float rounding) the same logits as stock transformers/peft."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from protocol.settings import FarmSettings
from tests.test_core import PROMPTS
from worker.model import load_model
from worker.prepack import PACKED_MAX_ROWS, is_packed, prepack_linears


def _stock(model_dir: Path, adapter: Path | None = None) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).eval()
    return model


def _linears(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m) is torch.nn.Linear]


def test_every_base_linear_is_packed_and_greedy_tokens_equal_stock(tiny_model: Path) -> None:
    loaded = load_model(FarmSettings(model=str(tiny_model), adapter="", adapters=""), "cpu")
    stock = _stock(tiny_model)
    linears = _linears(loaded.model)
    assert loaded.packed_layers == len(linears) == len(_linears(stock)) > 0
    assert all(is_packed(m) for m in linears)
    for prompt in PROMPTS[:4]:
        ids = loaded.tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            packed_logits = loaded.model(**ids).logits
            stock_logits = stock(**ids).logits
            packed_out = loaded.model.generate(**ids, max_new_tokens=24, do_sample=False, eos_token_id=None)
            stock_out = stock.generate(**ids, max_new_tokens=24, do_sample=False, eos_token_id=None)
        torch.testing.assert_close(packed_logits, stock_logits, rtol=1e-4, atol=1e-4)
        assert packed_out.tolist() == stock_out.tolist()


def test_lora_adapters_wrap_packed_layers_and_match_stock_peft(tiny_model: Path) -> None:
    loaded = load_model(FarmSettings(model=str(tiny_model), adapter=str(tiny_model / "adapter"), adapters=""), "cpu")
    stock = _stock(tiny_model, tiny_model / "adapter")
    lora_layers = [m for m in loaded.model.modules() if hasattr(m, "lora_A")]
    assert lora_layers and all(is_packed(m.base_layer) for m in lora_layers)
    # LoRA's own small matrices are added after packing and stay stock.
    assert not any(is_packed(a) for m in lora_layers for a in m.lora_A.values())
    ids = loaded.tokenizer(PROMPTS[0], return_tensors="pt")
    with torch.inference_mode():
        with_lora = loaded.model(**ids).logits
        torch.testing.assert_close(with_lora, stock(**ids).logits, rtol=1e-4, atol=1e-4)
        with loaded.model.disable_adapter():
            without = loaded.model(**ids).logits
    assert (with_lora - without).abs().max() > 1e-3  # the adapter still acts on the packed base


def test_prepack_off_leaves_stock_layers(tiny_model: Path) -> None:
    loaded = load_model(FarmSettings(model=str(tiny_model), adapter="", adapters="", cpu_prepack=0), "cpu")
    assert loaded.packed_layers == 0
    assert not any(is_packed(m) for m in loaded.model.modules())


class _QuantizedLike(torch.nn.Linear):
    """Stands for bitsandbytes' Linear8bitLt / Linear4bit, which subclass ``nn.Linear``."""


def test_only_plain_float32_linears_are_packed_and_training_uses_stock_weights() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), _QuantizedLike(16, 16),
                                torch.nn.Linear(16, 4, bias=False).to(torch.float64), torch.nn.Linear(16, 4))
    assert prepack_linears(model) == 2
    assert [is_packed(m) for m in model] == [True, False, False, True]
    assert prepack_linears(model) == 0  # packing twice is a no-op
    x = torch.randn(5, 8)
    with torch.inference_mode():
        torch.testing.assert_close(model[0](x), torch.nn.functional.linear(x, model[0].weight, model[0].bias))
        # More rows than PACKED_MAX_ROWS (a long prefill) take stock matmul: bit for bit its result.
        tall = torch.randn(2, PACKED_MAX_ROWS, 8)
        assert torch.equal(model[0](tall), torch.nn.functional.linear(tall, model[0].weight, model[0].bias))
    # With autograd on, the stock weights run (gradients reach the parameters).
    model[0](x).sum().backward()
    assert model[0].weight.grad is not None
