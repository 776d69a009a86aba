"""The CPU decode-attention kernel (``FARM_CPU_DECODE_ATTENTION``): built and loaded for real, equal
to transformers' SDPA attention on decode-step inputs (one head per key or grouped, padded or
not, the slab cache's strided views), and every call it cannot take falls back to SDPA itself:
prefill, half precision, a float mask, sliding windows, tensors off the CPU. Through the worker's
loader, the tiny model with LoRA adapters decodes the same greedy tokens as stock transformers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from protocol.schema import GenerationRequest
from protocol.settings import FarmSettings
from tests.helpers import PROMPTS, Quiet, stock_model
from worker import decode_attention
from worker.decode_attention import IMPLEMENTATION, batchfarm_sdpa, usable
from worker.model import load_model

CLOSE = {"rtol": 1e-5, "atol": 1e-5}


class _Attention(torch.nn.Module):
    """What ``sdpa_attention_forward`` reads of an attention module."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.is_causal = True
        self.num_key_value_groups = groups


@pytest.fixture(scope="module")
def kernel() -> None:
    assert decode_attention.load(), decode_attention._state.get("error")


def _decode_inputs(rows: int, heads: int, kv_heads: int, used: int, spare: int = 16,
                   dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A query token per row and keys/values as the slab cache holds them: views of the first
    ``used`` columns of buffers with spare ones."""
    generator = torch.Generator().manual_seed(rows * 100 + used)
    query = torch.randn(rows, heads, 1, 64, generator=generator, dtype=dtype)
    buffers = [torch.randn(rows, kv_heads, used + spare, 64, generator=generator, dtype=dtype) for _ in range(2)]
    return query, buffers[0][:, :, :used], buffers[1][:, :, :used]


def _left_padding(rows: int, used: int) -> torch.Tensor:
    """SDPA's boolean decode mask [B, 1, 1, S]: row i padded on its left by 3 * i columns."""
    mask = torch.ones(rows, 1, 1, used, dtype=torch.bool)
    for row in range(rows):
        mask[row, ..., :min(3 * row, used - 1)] = False
    return mask


@pytest.mark.parametrize(("heads", "kv_heads"), [(12, 12), (9, 3)])
@pytest.mark.parametrize("padded", [True, False])
def test_the_kernel_equals_sdpa_on_decode_steps(kernel: None, heads: int, kv_heads: int, padded: bool) -> None:
    module = _Attention(heads // kv_heads)
    for rows, used in ((1, 1), (5, 37), (16, 80)):
        query, key, value = _decode_inputs(rows, heads, kv_heads, used)
        mask = _left_padding(rows, used) if padded else None
        assert usable(query, key, value, mask, 0.0, {})
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            out, weights = batchfarm_sdpa(module, query, key, value, mask, scaling=0.125)
        assert "batchfarm::decode_attention" in {event.key for event in prof.key_averages()}
        expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.125)
        assert weights is None and out.shape == expected.shape == (rows, 1, heads, 64)
        torch.testing.assert_close(out, expected, **CLOSE)


def _fallbacks() -> dict[str, tuple[Any, ...]]:
    """Calls the kernel does not take: (query, key, value, mask, kwargs)."""
    query, key, value = _decode_inputs(4, 8, 8, 20)
    prefill_query = torch.randn(4, 8, 20, 64)
    half = _decode_inputs(4, 8, 8, 20, dtype=torch.bfloat16)
    float_mask = torch.zeros(4, 1, 1, 20)
    float_mask[0, ..., :5] = float("-inf")
    per_head = _left_padding(4, 20).expand(4, 8, 1, 20)
    return {"prefill": (prefill_query, key, value, None, {}),
            "bfloat16": (*half, None, {}),
            "float mask": (query, key, value, float_mask, {}),
            "mask per head": (query, key, value, per_head, {}),
            "mask broadcast over rows": (query, key, value, _left_padding(1, 20), {}),
            "sliding window": (query, key, value, None, {"sliding_window": 8}),
            "off the CPU": (query.to("meta"), key.to("meta"), value.to("meta"), None, {})}


@pytest.mark.parametrize("case", list(_fallbacks()))
def test_calls_the_kernel_cannot_take_go_to_sdpa(kernel: None, case: str) -> None:
    query, key, value, mask, kwargs = _fallbacks()[case]
    assert not usable(query, key, value, mask, 0.0, kwargs)
    if query.device.type == "meta":
        return  # nothing runs on the meta device: that it is not taken is the check
    module = _Attention(1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out, _ = batchfarm_sdpa(module, query, key, value, mask, scaling=0.125, **kwargs)
    assert "batchfarm::decode_attention" not in {event.key for event in prof.key_averages()}
    kwargs = {k: v for k, v in kwargs.items() if k != "sliding_window"}
    expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.125, **kwargs)
    torch.testing.assert_close(out, expected)


def test_training_dropout_goes_to_sdpa(kernel: None) -> None:
    query, key, value = _decode_inputs(2, 4, 4, 10)
    assert usable(query, key, value, None, 0.0, {}) and not usable(query, key, value, None, 0.1, {})


def _decode_all(runner: Any, rows: list[Any]) -> bool:
    """Join ``rows`` into one continuous batch and step it until every row is done; whether the
    kernel ran."""
    from worker.engine.kv_slab import ContinuousBatch

    batch = ContinuousBatch(runner)
    batch.join(rows, Quiet())
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        while batch.rows:
            batch.step(Quiet())
            batch.evict()
    return "batchfarm::decode_attention" in {event.key for event in prof.key_averages()}


def test_the_worker_loader_enables_it_and_lora_greedy_tokens_equal_stock(tiny_model: Path) -> None:
    from worker.engine.model_runner import ModelRunner

    adapters = {"default": tiny_model / "adapter", "second": tiny_model / "adapter2"}
    loaded = load_model(FarmSettings(model=str(tiny_model), adapter=str(adapters["default"]),
                                     adapters=f"second={adapters['second']}"), "cpu")
    assert loaded.model.config._attn_implementation == IMPLEMENTATION
    runner = ModelRunner(loaded)
    names = ["base", "default", "second", "default", "base", "second"]
    rows = [runner.new_row(f"r{i}", runner.encode(p), GenerationRequest(prompt=p, max_new_tokens=12, adapter=a,
                                                                        ignore_eos=True))
            for i, (p, a) in enumerate(zip(PROMPTS, names, strict=False))]
    assert _decode_all(runner, rows)
    stock = stock_model(tiny_model, adapters)
    assert stock.config._attn_implementation == "sdpa"
    for row, prompt, name in zip(rows, PROMPTS, names, strict=False):
        ids = torch.tensor([runner.encode(prompt)])
        with torch.inference_mode():
            if name == "base":
                with stock.disable_adapter():
                    out = stock.generate(input_ids=ids, max_new_tokens=12, do_sample=False, eos_token_id=None)
            else:
                stock.set_adapter(name)
                out = stock.generate(input_ids=ids, max_new_tokens=12, do_sample=False, eos_token_id=None)
        assert row.state.tokens == out[0, ids.shape[1]:].tolist(), (prompt, name)


def test_off_it_is_stock_sdpa(tiny_model: Path) -> None:
    loaded = load_model(FarmSettings(model=str(tiny_model), adapter="", adapters="", cpu_decode_attention=0), "cpu")
    assert loaded.model.config._attn_implementation == "sdpa"


def test_a_kernel_that_cannot_be_built_leaves_sdpa(tiny_model: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """No compiler (the seam: the compiler's name): the model keeps SDPA, and why is kept."""
    monkeypatch.setattr(decode_attention, "COMPILER", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(decode_attention, "_state", {})
    model = stock_model(tiny_model)
    assert not decode_attention.enable(model, root=tmp_path)
    assert model.config._attn_implementation == "sdpa"
    assert "no-such-compiler" in decode_attention._state["error"]


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_quantized_models_decode_the_same_with_the_kernel_as_with_sdpa(tiny_model: Path, quant: str) -> None:
    """bitsandbytes layers on the CPU: attention sees float32 activations, so the kernel takes the
    decode steps; greedy tokens equal the same quantized model's with SDPA."""
    from worker.engine.model_runner import ModelRunner

    loaded = load_model(FarmSettings(model=str(tiny_model), adapter="", adapters="", quant=quant), "cpu")
    config = loaded.model.config
    assert config._attn_implementation == IMPLEMENTATION
    runner = ModelRunner(loaded)
    tokens = {}
    for implementation in (IMPLEMENTATION, "sdpa"):
        config._attn_implementation = implementation
        rows = [runner.new_row(f"{quant}-{i}", runner.encode(p), GenerationRequest(prompt=p, max_new_tokens=10,
                                                                                   ignore_eos=True))
                for i, p in enumerate(PROMPTS[:4])]
        assert _decode_all(runner, rows) == (implementation == IMPLEMENTATION)
        tokens[implementation] = [row.state.tokens for row in rows]
    assert tokens[IMPLEMENTATION] == tokens["sdpa"]
