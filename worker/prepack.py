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
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

PACKED_MAX_ROWS = 64
"""Inputs of at most this many rows (tokens) use the packed weight: decode steps, small prefills.
oneDNN compiles a kernel (~0.6 MB here) per input shape and keeps it in two LRU caches of 1024
entries each: prompts of every length filled them to 1.6 GB in a test loop. Inputs are therefore
padded to a few row counts (``row_bucket``) and longer ones, which gain less (1.3x), take stock
matmul: at most 22 kernels per weight shape."""

PACKED_MIN_ROWS = 4
"""Inputs of fewer rows take stock matmul: MKL's kernel for 1-3 rows beat the packed one on every
model of the bench sweep (a whole decode step, 2 threads, 2026-12-02: 1 row 17.8 against 21.7 ms
on the bench model, 20.5 against 24.3 on llama32k, 31.1 against 38.3 on the demo model; 3 rows
20.4/26.4, 23.6/28.9, 34.6/43.0), and lost from 4 rows on (4 rows 29.4/26.1, 34.3/29.6,
48.5/45.4; 16 rows 45.4/40.2 on the bench model)."""

EXACT_ROWS = 16
"""Row counts up to this run as they are (every decode step of the default ``FARM_MAX_BATCH_SIZE``:
padding costs ~20 us per layer call, 4% of a step)."""

ROW_STEP = 8
"""Larger row counts are padded up to a multiple of this (a few zero rows cost little: a small
input's time is in streaming the weight, not in its rows)."""

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
    return packed


def is_packed(module: torch.nn.Module) -> bool:
    return isinstance(module, PackedLinear) and module.__dict__.get("_packed") is not None


def _eligible(module: torch.nn.Module) -> bool:
    # Exactly nn.Linear: bitsandbytes' Linear8bitLt/Linear4bit subclass it and must keep their own.
    # A forward set on the instance (accelerate's hooks) would bypass the packed one: left alone.
    if type(module) not in (torch.nn.Linear, PackedLinear) or "forward" in module.__dict__:
        return False
    return module.weight.device.type == "cpu" and module.weight.dtype == torch.float32


class PackedLinear(torch.nn.Linear):
    """An ``nn.Linear`` that also holds its weight packed for oneDNN and uses it for inference."""

    _packed: torch.Tensor | None
    _packed_from: tuple[torch.Tensor, int, int]
    """The weight, its version and data pointer when packed: the packed copy is stale otherwise."""

    @classmethod
    def pack(cls, module: torch.nn.Linear) -> bool:
        """Turn ``module`` into a ``PackedLinear`` if its packed results match stock ``linear``."""
        weight = module.weight
        with torch.inference_mode():
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
            for rows in (PACKED_MIN_ROWS, ROW_STEP, PACKED_MAX_ROWS):
                probe = torch.randn(rows, module.in_features, generator=torch.Generator().manual_seed(rows))
                expected = torch.nn.functional.linear(probe, weight, module.bias)
                got = torch.ops.mkldnn._linear_pointwise(probe, packed, module.bias, "none", [], "")
                if not bool((got - expected).abs().max() <= TOLERANCE * expected.abs().max().clamp_min(1e-12)):
                    return False
        module.__class__ = cls
        module._packed = packed
        module._packed_from = (weight, weight._version, weight.data_ptr())
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # On every layer of every step: plain attribute reads and C calls only (~20 us per call
        # with more Python here was 4% of a decode step).
        packed, weight = self.__dict__.get("_packed"), self._parameters["weight"]
        rows = x.numel() // x.shape[-1]
        if (packed is None or not PACKED_MIN_ROWS <= rows <= PACKED_MAX_ROWS or not x.is_cpu or x.dtype != torch.float32
                or torch.is_grad_enabled() or torch.is_autocast_enabled("cpu") or not torch._C._get_mkldnn_enabled()
                or weight is not self._packed_from[0] or weight._version != self._packed_from[1]
                or weight.data_ptr() != self._packed_from[2]):
            # Training, autocast, a cast input, oneDNN switched off (torch.backends.mkldnn.flags),
            # a long prefill or a lone row, or a weight replaced or written since packing: stock matmul.
            return torch.nn.functional.linear(x, weight, self.bias)
        # Grad is off here (checked above), so the bias parameter goes in as it is.
        bias, bucket = self.bias, row_bucket(rows)
        if bucket == rows:
            return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
        flat = torch.nn.functional.pad(x.reshape(rows, x.shape[-1]), (0, 0, 0, bucket - rows))
        out = torch.ops.mkldnn._linear_pointwise(flat, packed, bias, "none", [], "")
        return out[:rows].reshape(*x.shape[:-1], out.shape[-1])

    def __getstate__(self) -> dict[str, Any]:
        # deepcopy (peft's modules_to_save, layer replication) and pickle: the copy runs stock, as
        # its weight may be trained or loaded apart from this one's packed copy.
        state = self.__dict__.copy()
        state.pop("_packed", None)
        state.pop("_packed_from", None)
        return state


def row_bucket(rows: int) -> int:
    """The row count a packed layer computes for ``rows`` input rows: up to 16 (a decode step of
    the default batch size) as they are, more rounded up to a multiple of ``ROW_STEP``: at most 22
    shapes up to ``PACKED_MAX_ROWS``."""
    return rows if rows <= EXACT_ROWS else -(-rows // ROW_STEP) * ROW_STEP
