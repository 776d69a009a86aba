"""oneDNN weight prepacking for CPU inference (``FARM_CPU_PREPACK=1``, the default).

torch's CPU ``linear`` calls MKL's sgemm on the row-major weight at every step. For the few rows
of a decode step (one per request in the batch) that runs far below the core's peak: measured on
this 2-core AVX-512 machine, 36 weights of the 100M bench model with 16 rows took 39 ms on one
thread with MKL and 22 ms with the weight reordered once into oneDNN's blocked layout (27 vs 14 ms
on two threads; 1.3x faster for a 478-token prefill). The ops are the ones torch's inductor calls
for a oneDNN linear (``mkldnn._reorder_linear_weight`` / ``mkldnn._linear_pointwise``); here they
serve an eager model, so peft's LoRA layers, adapters loaded at run time and ``generate`` keep
working unchanged.

Each plain ``nn.Linear`` with float32 weights on the CPU becomes a ``PackedLinear`` (a subclass:
peft and ``isinstance`` see a Linear), keeping its parameters and holding a packed copy of the
weight that inference inputs of ``PACKED_MIN_ROWS`` to ``PACKED_MAX_ROWS`` rows use (every decode
step of 4 to 64 requests); longer inputs, such as long prompts' prefill, take stock matmul, which
bounds the memory of oneDNN's per-shape kernel caches, and so do the 1-3 rows of a lone user's
decode step, where MKL's own kernel is faster. Packed layers hold their weights twice in RAM. Quantized layers
(bitsandbytes subclasses), other dtypes, GPU devices and layers with hooks on ``forward`` are left
alone. A copy or pickle of a packed layer carries no packed weight and runs stock; so does a layer
whose weight was replaced or written in place through autograd-visible ops after packing (writes
through ``.data``, such as peft's ``merge_adapter``, are not seen: call ``prepack_linears`` again
after merging, which repacks packed layers from their weights). Results equal stock ``linear`` to
float32 rounding (~2e-6); a layer whose packed result differs by more than ``TOLERANCE`` on its
self-check stays stock.

Sibling linears (``SIBLINGS``: attention's q/k/v projections, a gated MLP's gate and up
projections), which a module calls one after another on the same input, share one packed weight:
the first call computes all their outputs in one oneDNN call, the others take their columns
(``_Siblings``). One wide matmul streams the same bytes as three narrow ones in less time (16 rows,
2 threads: the bench model's q/k/v 566 against 710 us per layer, the demo model's 213 against 328).
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import Any

import torch
from protocol.settings import PACKED_MIN_ROWS_LIMIT

log = logging.getLogger(__name__)

PACKED_MAX_ROWS = PACKED_MIN_ROWS_LIMIT  # 64, also the bound of FARM_PACKED_MIN_ROWS
"""Inputs of at most this many rows (tokens) use the packed weight: decode steps, small prefills.
oneDNN compiles a kernel (~0.6 MB here) per input shape and keeps it in two LRU caches of 1024
entries each: prompts of every length filled them to 1.6 GB in a test loop. Inputs are therefore
padded to a few row counts (``row_bucket``) and longer ones, which gain less (1.3x), take stock
matmul: at most 22 kernels per weight shape."""

PACKED_MIN_ROWS = 4
"""Inputs of fewer rows take stock matmul unless a measurement says otherwise (``FARM_PACKED_MIN_ROWS``,
``calibrate_min_rows``). On the host of 12-02 (CPU not recorded) MKL's kernel for 1-3 rows beat the packed one on every
model of the bench sweep (a whole decode step, 2 threads, 2026-12-02: 1 row 17.8 against 21.7 ms
on the bench model, 20.5 against 24.3 on llama32k, 31.1 against 38.3 on the demo model; 3 rows
20.4/26.4, 23.6/28.9, 34.6/43.0), and lost from 4 rows on (4 rows 29.4/26.1, 34.3/29.6,
48.5/45.4; 16 rows 45.4/40.2 on the bench model). On an AMD EPYC host (2026-12-04) MKL lost at
every row count: one row through the demo model's 49,152 x 576 output layer 11.3 against 4.7 ms."""

CALIBRATION_ROUNDS = 3
"""Forward passes per row count and kernel in ``calibrate_min_rows`` (the fastest of each counts)."""

EXACT_ROWS = 16
"""Row counts up to this run as they are (every decode step of the default ``FARM_MAX_BATCH_SIZE``:
padding costs ~20 us per layer call, 4% of a step)."""

ROW_STEP = 8
"""Larger row counts are padded up to a multiple of this (a few zero rows cost little: a small
input's time is in streaming the weight, not in its rows)."""

SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
"""Attribute names of linears one module calls in turn on one input (transformers' Llama, Qwen,
Mistral, Gemma... attention and MLP): packed together when all of a group are packed."""

TOLERANCE = 1e-4
"""Largest relative difference from stock ``linear`` accepted in the self-check of each layer."""


def available() -> bool:
    """Whether this torch build can pack linear weights for oneDNN."""
    ops = torch.ops.mkldnn
    return bool(torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")
                and hasattr(ops, "_linear_pointwise"))


def prepack_linears(model: torch.nn.Module) -> int:
    """Pack every eligible ``nn.Linear`` of ``model`` for oneDNN (layers packed before are packed
    again from their current weights); returns how many are packed."""
    if not available():
        log.info("oneDNN linear packing is not available in this torch build; stock matmul")
        return 0
    packed = 0
    for name, module in model.named_modules():
        if not _eligible(module):
            continue
        if PackedLinear.pack(module):
            packed += 1
        else:
            log.warning("layer %s left unpacked: its packed result differs from stock linear", name)
    groups = sum(_Siblings.join(members) for members in _sibling_groups(model))
    log.debug("%d packed layers, %d sibling groups", packed, groups)
    return packed


def set_min_rows(model: torch.nn.Module, rows: int) -> None:
    """Inputs of fewer than ``rows`` rows take stock matmul in every packed layer of ``model``."""
    for module in model.modules():
        if isinstance(module, PackedLinear):
            module._min_rows = rows


def choose_min_rows(times: dict[int, tuple[float, float]]) -> int:
    """Row count -> (stock, packed) time of a forward pass: the fewest rows from which the packed
    weights are at least as fast at every measured row count (``PACKED_MIN_ROWS`` past them all)."""
    chosen = PACKED_MIN_ROWS
    for rows in sorted(times, reverse=True):
        stock, packed = times[rows]
        if packed > stock:
            break
        chosen = min(chosen, rows)
    return chosen


def calibrate_min_rows(model: torch.nn.Module, forward: Any, rows: tuple[int, ...] = (1, 2, 3)) -> int:
    """Time ``forward(n)`` (a pass of ``n`` rows) with stock and packed weights for each of ``rows``,
    interleaved, and set the packed layers' row threshold from the fastest of each
    (``choose_min_rows``); returns it. Whether MKL or oneDNN runs a few rows faster depends on the
    CPU (see ``PACKED_MIN_ROWS``)."""
    best: dict[int, list[float]] = {n: [float("inf"), float("inf")] for n in rows}
    with torch.inference_mode():
        for _ in range(CALIBRATION_ROUNDS):
            for n in rows:
                for kernel, threshold in ((0, n + 1), (1, n)):
                    set_min_rows(model, threshold)
                    started = time.perf_counter()
                    forward(n)
                    best[n][kernel] = min(best[n][kernel], time.perf_counter() - started)
    chosen = choose_min_rows({n: (stock, packed) for n, (stock, packed) in best.items()})
    set_min_rows(model, chosen)
    log.info("packed weights from %d rows (fastest forward pass, stock/packed ms: %s)", chosen,
             ", ".join(f"{n} rows {s * 1e3:.1f}/{p * 1e3:.1f}" for n, (s, p) in best.items()))
    return chosen


def is_packed(module: torch.nn.Module) -> bool:
    return isinstance(module, PackedLinear) and module.__dict__.get("_packed") is not None


def siblings_of(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The layers that share ``module``'s packed weight (itself included); empty if none do."""
    group = module.__dict__.get("_siblings")
    return list(group.members) if group is not None else []


def _sibling_groups(model: torch.nn.Module) -> list[list[PackedLinear]]:
    groups = []
    for module in model.modules():
        for names in SIBLINGS:
            members = [_base_layer(getattr(module, name, None)) for name in names]
            if all(isinstance(m, torch.nn.Module) and is_packed(m) for m in members):
                groups.append(members)
    return groups


def _base_layer(module: Any) -> Any:
    # peft's LoRA layers wrap the base linear (``base_layer``) and call it first on the same input.
    while isinstance(module, torch.nn.Module) and isinstance(getattr(module, "base_layer", None), torch.nn.Module):
        module = module.base_layer
    return module


def _packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, rows: int) -> torch.Tensor:
    bucket = row_bucket(rows)
    if bucket == rows:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    flat = torch.nn.functional.pad(x.reshape(rows, x.shape[-1]), (0, 0, 0, bucket - rows))
    out = torch.ops.mkldnn._linear_pointwise(flat, packed, bias, "none", [], "")
    return out[:rows].reshape(*x.shape[:-1], out.shape[-1])


def _matches(packed: torch.Tensor, bias: torch.Tensor | None, expect: Any, in_features: int) -> bool:
    """Whether ``packed`` gives ``expect(probe)`` to ``TOLERANCE`` on probes of a few row counts."""
    for rows in (PACKED_MIN_ROWS, ROW_STEP, PACKED_MAX_ROWS):
        probe = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows))
        expected = expect(probe)
        got = torch.ops.mkldnn._linear_pointwise(probe, packed, bias, "none", [], "")
        if not bool((got - expected).abs().max() <= TOLERANCE * expected.abs().max().clamp_min(1e-12)):
            return False
    return True


def _version(x: torch.Tensor) -> int:
    # Inference tensors (torch.inference_mode) keep no version counter.
    return -1 if x.is_inference() else x._version


def _eligible(module: torch.nn.Module) -> bool:
    # Exactly nn.Linear: bitsandbytes' Linear8bitLt/Linear4bit subclass it and must keep their own.
    # A forward set on the instance (accelerate's hooks) would bypass the packed one: left alone.
    if type(module) not in (torch.nn.Linear, PackedLinear) or "forward" in module.__dict__:
        return False
    return module.weight.device.type == "cpu" and module.weight.dtype == torch.float32


class PackedLinear(torch.nn.Linear):
    """An ``nn.Linear`` that also holds its weight packed for oneDNN and uses it for inference."""

    _packed: torch.Tensor | None
    _min_rows: int
    """Inputs of fewer rows take stock matmul (``PACKED_MIN_ROWS``, ``set_min_rows``)."""
    _packed_from: tuple[torch.Tensor, int, int]
    """The weight, its version and data pointer when packed: the packed copy is stale otherwise."""

    @classmethod
    def pack(cls, module: torch.nn.Linear) -> bool:
        """Turn ``module`` into a ``PackedLinear`` if its packed results match stock ``linear``."""
        weight = module.weight
        with torch.inference_mode():
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
            if not _matches(packed, module.bias, lambda x: torch.nn.functional.linear(x, weight, module.bias),
                            module.in_features):
                return False
        module.__dict__.pop("_siblings", None)
        module.__class__ = cls
        module._min_rows = module.__dict__.get("_min_rows", PACKED_MIN_ROWS)
        module._packed = packed
        module._packed_from = (weight, weight._version, weight.data_ptr())
        return True

    def _fresh(self) -> bool:
        weight, (packed_from, version, pointer) = self._parameters["weight"], self._packed_from
        return weight is packed_from and weight._version == version and weight.data_ptr() == pointer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # On every layer of every step: plain attribute reads and C calls only (~20 us per call
        # with more Python here was 4% of a decode step).
        packed, weight = self.__dict__.get("_packed"), self._parameters["weight"]
        rows = x.numel() // x.shape[-1]
        if (packed is None or not self._min_rows <= rows <= PACKED_MAX_ROWS or not x.is_cpu or x.dtype != torch.float32
                or torch.is_grad_enabled() or torch.is_autocast_enabled("cpu") or not torch._C._get_mkldnn_enabled()
                or not self._fresh()):
            # Training, autocast, a cast input, oneDNN switched off (torch.backends.mkldnn.flags),
            # a long prefill or a lone row, or a weight replaced or written since packing: stock matmul.
            return torch.nn.functional.linear(x, weight, self.bias)
        siblings = self.__dict__.get("_siblings")
        if siblings is not None:
            return siblings.take(self, x, rows)
        # Grad is off here (checked above), so the bias parameter goes in as it is.
        return _packed_linear(x, packed, self.bias, rows)

    def __getstate__(self) -> dict[str, Any]:
        # deepcopy (peft's modules_to_save, layer replication) and pickle: the copy runs stock, as
        # its weight may be trained or loaded apart from this one's packed copy.
        state = self.__dict__.copy()
        state.pop("_packed", None)
        state.pop("_packed_from", None)
        state.pop("_siblings", None)
        return state


class _Siblings:
    """Packed linears that one module calls in turn on one input, computed in one oneDNN call.

    Each member's own packed weight is dropped (its ``_packed`` is the shared one, so the memory
    stays one packed copy). The first member called with an input computes every member's output
    and keeps it with that input; each other member called with the same input (the same tensor,
    unwritten since: its version, which inference tensors do not keep) takes its columns, a view,
    once. Any other call computes anew. A member whose weight was replaced or written runs stock
    (``PackedLinear.forward`` checks its own weight); the others find it at their next computation
    and leave the group, packed on their own again."""

    def __init__(self, members: list[PackedLinear], packed: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.members = members
        self.packed, self.bias = packed, bias
        bounds = [0, *itertools.accumulate(m.out_features for m in members)]
        self.columns = {id(m): (start, stop) for m, start, stop in zip(members, bounds[:-1], bounds[1:], strict=True)}
        self._input: torch.Tensor | None = None
        self._version = 0
        self._out: torch.Tensor | None = None
        self._waiting: set[int] = set()

    @classmethod
    def join(cls, members: list[PackedLinear]) -> bool:
        """Pack ``members`` as one weight if they read the same input size and the packed result
        matches theirs; returns whether they were joined."""
        if len({m.in_features for m in members}) != 1 or len({id(m) for m in members}) != len(members):
            return False
        with torch.inference_mode():
            weight = torch.cat([m.weight for m in members])
            bias = None if all(m.bias is None for m in members) else torch.cat(
                [m.bias if m.bias is not None else m.weight.new_zeros(m.out_features) for m in members])
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)

            def stock(x: torch.Tensor) -> torch.Tensor:
                return torch.cat([torch.nn.functional.linear(x, m.weight, m.bias) for m in members], dim=-1)
            if not _matches(packed, bias, stock, members[0].in_features):
                return False
        group = cls(members, packed, bias)
        for member in members:
            member._packed = packed
            member.__dict__["_siblings"] = group
        return True

    def take(self, member: PackedLinear, x: torch.Tensor, rows: int) -> torch.Tensor:
        key = id(member)
        if x is self._input and key in self._waiting and _version(x) == self._version:
            out = self._out
            self._waiting.discard(key)
            if not self._waiting:
                self._input = self._out = None
        else:
            if not all(m._fresh() for m in self.members):
                self.leave()
                return member.forward(x)
            out = _packed_linear(x, self.packed, self.bias, rows)
            self._input, self._version, self._out = x, _version(x), out
            self._waiting = set(self.columns) - {key}
        start, stop = self.columns[key]
        return out[..., start:stop]

    def leave(self) -> None:
        """Break the group up: members whose weights are unchanged are packed on their own again."""
        self._input = self._out = None
        for member in self.members:
            member.__dict__.pop("_siblings", None)
            with torch.inference_mode():
                member._packed = (torch.ops.mkldnn._reorder_linear_weight(member.weight, None)
                                  if member._fresh() else None)


def row_bucket(rows: int) -> int:
    """The row count a packed layer computes for ``rows`` input rows: up to 16 (a decode step of
    the default batch size) as they are, more rounded up to a multiple of ``ROW_STEP``: at most 22
    shapes up to ``PACKED_MAX_ROWS``."""
    return rows if rows <= EXACT_ROWS else -(-rows // ROW_STEP) * ROW_STEP
