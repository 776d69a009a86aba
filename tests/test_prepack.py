"""oneDNN weight prepacking (``FARM_CPU_PREPACK``): the real tiny model, with and without LoRA
adapters (one, mixed in a batch, loaded at run time), gives the same greedy tokens and, to float
rounding, the same logits as stock transformers/peft."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import pytest
import torch
from protocol.settings import FarmSettings
from tests.helpers import PROMPTS, stock_model
from worker import prepack
from worker.model import load_adapter, load_model
from protocol.errors import SettingsError
from worker.prepack import (PACKED_MAX_ROWS, PACKED_MIN_ROWS, PackedLinear, choose_min_rows, is_packed, prepack_linears,
                            row_bucket, set_min_rows, siblings_of)

CLOSE = {"rtol": 1e-4, "atol": 1e-4}


def _logits(model: torch.nn.Module, ids: dict[str, torch.Tensor], **kwargs: object) -> torch.Tensor:
    with torch.inference_mode():
        return model(**ids, **kwargs).logits


def test_every_base_linear_is_packed_and_greedy_tokens_equal_stock(tiny_model: Path) -> None:
    loaded = load_model(FarmSettings(model=str(tiny_model), adapter="", adapters=""), "cpu")
    stock = stock_model(tiny_model)
    stock_linears = [m for m in stock.modules() if type(m) is torch.nn.Linear]
    assert loaded.packed_layers == len(stock_linears) > 0
    assert all(is_packed(m) for m in loaded.model.modules() if isinstance(m, torch.nn.Linear))
    # Each layer's q/k/v and gate/up projections share one packed weight.
    for layer in loaded.model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        assert siblings_of(attn.q_proj) == [attn.q_proj, attn.k_proj, attn.v_proj]
        assert siblings_of(mlp.up_proj) == [mlp.gate_proj, mlp.up_proj] and siblings_of(attn.o_proj) == []
    for prompt in PROMPTS[:4]:
        ids = loaded.tokenizer(prompt, return_tensors="pt")
        torch.testing.assert_close(_logits(loaded.model, ids), _logits(stock, ids), **CLOSE)
        with torch.inference_mode():
            packed_out = loaded.model.generate(**ids, max_new_tokens=24, do_sample=False, eos_token_id=None)
            stock_out = stock.generate(**ids, max_new_tokens=24, do_sample=False, eos_token_id=None)
        assert packed_out.tolist() == stock_out.tolist()


def test_lora_adapters_alone_mixed_and_loaded_at_run_time_match_stock_peft(tiny_model: Path) -> None:
    adapters = {"default": tiny_model / "adapter", "second": tiny_model / "adapter2"}
    loaded = load_model(FarmSettings(model=str(tiny_model), adapter=str(adapters["default"]), adapters=""), "cpu")
    lora_layers = [m for m in loaded.model.modules() if hasattr(m, "lora_A")]
    assert lora_layers and all(is_packed(m.base_layer) for m in lora_layers)
    assert all(siblings_of(m.base_layer) for m in lora_layers)  # LoRA on q and v: the base layers stay grouped
    # LoRA's own small matrices are added after packing and stay stock.
    assert not any(is_packed(a) for m in lora_layers for a in m.lora_A.values())
    load_adapter(loaded, "second", str(adapters["second"]))  # into the running, packed model
    stock = stock_model(tiny_model, adapters)
    prompts = PROMPTS[:3]
    ids = loaded.tokenizer(prompts, return_tensors="pt", padding=True)
    for name in adapters:
        loaded.model.set_adapter(name)
        stock.set_adapter(name)
        torch.testing.assert_close(_logits(loaded.model, ids), _logits(stock, ids), **CLOSE)
    # One batch, one adapter per row (peft's adapter_names), as the engine runs mixed batches.
    names = ["default", "second", "__base__"]
    mixed = _logits(loaded.model, ids, adapter_names=names)
    torch.testing.assert_close(mixed, _logits(stock, ids, adapter_names=names), **CLOSE)
    with loaded.model.disable_adapter():
        without = _logits(loaded.model, ids)
    assert (mixed[0] - without[0]).abs().max() > 1e-3  # the adapter still acts on the packed base
    torch.testing.assert_close(mixed[2], without[2], **CLOSE)


def test_the_row_threshold_is_measured_at_load_or_set(tiny_model: Path) -> None:
    def thresholds(**settings: int) -> set[int]:
        loaded = load_model(FarmSettings(model=str(tiny_model), adapter="", adapters="", **settings), "cpu")
        return {m._min_rows for m in loaded.model.modules() if isinstance(m, PackedLinear)}

    measured = thresholds()  # one value for the whole model, of the row counts timed or the default
    assert len(measured) == 1 and measured <= {1, 2, 3, PACKED_MIN_ROWS}
    assert thresholds(packed_min_rows=1) == {1} and thresholds(packed_min_rows=9) == {9}
    with pytest.raises(SettingsError, match="FARM_PACKED_MIN_ROWS must be 0 .* to 64"):
        FarmSettings(packed_min_rows=65)


def test_choose_min_rows_takes_the_packed_kernel_from_where_it_stays_faster() -> None:
    # rows -> (stock, packed) seconds of a forward pass
    assert choose_min_rows({1: (2.0, 1.0), 2: (2.0, 1.5), 3: (2.0, 1.9)}) == 1  # faster everywhere
    assert choose_min_rows({1: (1.0, 2.0), 2: (1.0, 2.0), 3: (1.0, 2.0)}) == PACKED_MIN_ROWS  # slower
    assert choose_min_rows({1: (1.0, 1.2), 2: (2.0, 1.5), 3: (2.0, 1.9)}) == 2
    assert choose_min_rows({1: (2.0, 1.0), 2: (1.0, 2.0), 3: (2.0, 1.0)}) == 3  # not faster at 2 rows


def test_prepack_off_leaves_stock_layers(tiny_model: Path) -> None:
    loaded = load_model(FarmSettings(model=str(tiny_model), adapter="", adapters="", cpu_prepack=0), "cpu")
    assert loaded.packed_layers == 0
    assert not any(isinstance(m, PackedLinear) for m in loaded.model.modules())


class _QuantizedLike(torch.nn.Linear):
    """Stands for bitsandbytes' Linear8bitLt / Linear4bit, which subclass ``nn.Linear``."""


def _stock_linear(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(x, layer.weight, layer.bias)


def test_only_plain_float32_linears_are_packed() -> None:
    hooked = torch.nn.Linear(16, 4)
    hooked.forward = lambda x: x  # type: ignore[method-assign]  # e.g. accelerate's hook
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), _QuantizedLike(16, 16),
                                torch.nn.Linear(16, 4, bias=False).to(torch.float64), torch.nn.Linear(16, 4), hooked)
    assert prepack_linears(model) == 2
    assert [is_packed(m) for m in model] == [True, False, False, True, False]
    assert prepack_linears(model) == 2  # packing again repacks the same layers


def test_packed_weight_serves_small_inference_inputs_only() -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 16)
    assert prepack_linears(layer) == 1
    small, tall = torch.randn(3, PACKED_MAX_ROWS // 3, 8), torch.randn(PACKED_MAX_ROWS + 1, 8)
    few = torch.randn(1, PACKED_MIN_ROWS - 1, 8)
    with torch.inference_mode():
        torch.testing.assert_close(layer(small), _stock_linear(layer, small))
        # Which weight serves which input: a packed copy of 2W tells them apart.
        layer._packed = torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach() * 2, None)
        torch.testing.assert_close(layer(small), small @ (2 * layer.weight).T + layer.bias)
        assert torch.equal(layer(tall), _stock_linear(layer, tall))  # a long prefill: stock matmul
        assert torch.equal(layer(few), _stock_linear(layer, few))  # a lone user's step: stock matmul
        set_min_rows(layer, 1)  # a CPU where the packed kernel wins from one row on
        torch.testing.assert_close(layer(few), few @ (2 * layer.weight).T + layer.bias)
        set_min_rows(layer, PACKED_MIN_ROWS)
    # With autograd on, the stock weights run and gradients reach the parameters.
    assert torch.equal(layer(small), _stock_linear(layer, small))
    layer(small).sum().backward()
    assert layer.weight.grad is not None


def test_weights_changed_after_packing_and_copies_run_stock() -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 16)
    prepack_linears(layer)
    x = torch.randn(4, 8)
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert isinstance(clone, torch.nn.Linear) and not is_packed(clone)
        with torch.no_grad():
            clone.weight.mul_(2)
            assert torch.equal(clone(x), _stock_linear(clone, x))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _stock_linear(layer, x))  # the original is untouched
        layer.weight.copy_(torch.randn(16, 8))  # e.g. load_state_dict: the packed copy is stale
        assert torch.equal(layer(x), _stock_linear(layer, x))
        assert prepack_linears(layer) == 1 and is_packed(layer)  # repacked from the new weight
        torch.testing.assert_close(layer(x), _stock_linear(layer, x))
        layer.weight.data += 1  # unseen (as peft's merge_adapter): stale until the caller repacks
        assert not torch.allclose(layer(x), _stock_linear(layer, x))
        assert prepack_linears(layer) == 1
        torch.testing.assert_close(layer(x), _stock_linear(layer, x))


def test_row_counts_are_bucketed_to_few_kernel_shapes() -> None:
    buckets = [row_bucket(rows) for rows in range(1, PACKED_MAX_ROWS + 1)]
    assert buckets[:17] == [*range(1, 17), 24] and buckets[-1] == PACKED_MAX_ROWS
    assert all(b >= r for r, b in enumerate(buckets, start=1)) and len(set(buckets)) == 22


class _Attention(torch.nn.Module):
    """Three projections of one input, as transformers' attention modules call them."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj = torch.nn.Linear(8, 16, bias=False), torch.nn.Linear(8, 4)
        self.v_proj = torch.nn.Linear(8, 4, bias=False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.q_proj(x), self.k_proj(x), self.v_proj(x)]


def _stock_projections(attn: _Attention, x: torch.Tensor) -> list[torch.Tensor]:
    return [_stock_linear(layer, x) for layer in (attn.q_proj, attn.k_proj, attn.v_proj)]


def test_sibling_projections_share_one_packed_weight_and_equal_stock(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    attn = _Attention()
    assert prepack_linears(attn) == 3 and siblings_of(attn.k_proj) == [attn.q_proj, attn.k_proj, attn.v_proj]
    x, other = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    with torch.inference_mode():
        for got, want in zip(attn(x), _stock_projections(attn, x), strict=True):
            torch.testing.assert_close(got, want)
        # One call computes all three: a shared packed copy of 2W shows that k and v use its result.
        q_weight = attn.q_proj.weight
        joint = torch.cat([q_weight, attn.k_proj.weight, attn.v_proj.weight])
        group = attn.q_proj.__dict__["_siblings"]
        group.packed = torch.ops.mkldnn._reorder_linear_weight(joint * 2, None)
        q, k, v = attn(x)
        torch.testing.assert_close(k, x @ (2 * attn.k_proj.weight).T + attn.k_proj.bias)
        torch.testing.assert_close(v, x @ (2 * attn.v_proj.weight).T)
        group.packed = torch.ops.mkldnn._reorder_linear_weight(joint, None)
        calls = []
        real = prepack._packed_linear
        monkeypatch.setattr(prepack, "_packed_linear", lambda *a: calls.append(a[0]) or real(*a))
        attn(x)
        assert len(calls) == 1  # one oneDNN call for the three projections
        # A member called on another input than the first computes anew; out of order is fine too.
        torch.testing.assert_close(attn.v_proj(other), _stock_linear(attn.v_proj, other))
        torch.testing.assert_close(attn.k_proj(x), _stock_linear(attn.k_proj, x))
        torch.testing.assert_close(attn.q_proj(x), _stock_linear(attn.q_proj, x))
        # Writing one output in place (peft adds a mixed batch's LoRA rows so) leaves the others.
        q = attn.q_proj(x)
        q += 100
        torch.testing.assert_close(attn.k_proj(x), _stock_linear(attn.k_proj, x))
        torch.testing.assert_close(attn.v_proj(x), _stock_linear(attn.v_proj, x))
    with torch.no_grad():  # an input written between two members' calls: the second sees the write
        y = torch.randn(2, 4, 8)
        attn.q_proj(y)
        y.mul_(3)
        torch.testing.assert_close(attn.k_proj(y), _stock_linear(attn.k_proj, y))
    clone = copy.deepcopy(attn)
    assert siblings_of(clone.q_proj) == [] and not is_packed(clone.q_proj)
    for got, want in zip(clone(x), _stock_projections(clone, x), strict=True):
        torch.testing.assert_close(got, want)


def test_a_sibling_whose_weight_changes_runs_stock_and_the_others_pack_alone() -> None:
    torch.manual_seed(0)
    attn = _Attention()
    prepack_linears(attn)
    x = torch.randn(1, 6, 8)
    with torch.no_grad():
        attn.k_proj.weight.copy_(torch.randn(4, 8))  # e.g. load_state_dict into one of them
        for got, want in zip(attn(x), _stock_projections(attn, x), strict=True):
            torch.testing.assert_close(got, want)
        assert siblings_of(attn.q_proj) == [] and is_packed(attn.q_proj) and is_packed(attn.v_proj)
        assert not is_packed(attn.k_proj)
        assert prepack_linears(attn) == 3 and len(siblings_of(attn.v_proj)) == 3  # repacked together
        for got, want in zip(attn(x), _stock_projections(attn, x), strict=True):
            torch.testing.assert_close(got, want)
