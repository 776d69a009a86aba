"""oneDNN weight prepacking for CPU inference (``FARM_CPU_PREPACK=1``, the default).

torch's CPU ``linear`` calls MKL's sgemm on the row-major weight at every step. For the few rows
of a decode step (one per request in the batch) that runs far below the core's peak: measured on
this 2-core AVX-512 machine, 36 weights of the 100M bench model with 16 rows took 39 ms on one
thread with MKL and 22 ms with the weight reordered once into oneDNN's blocked layout (27 vs 14 ms
on two threads; 1.3x faster for a 478-token prefill). This is the same packing torch's own
inductor does when it freezes a model for the CPU; here it is applied to an eager model, so
peft's LoRA layers, adapters loaded at run time and ``generate`` keep working unchanged.

Inputs of up to ``PACKED_MAX_ROWS`` rows use the packed weight (every decode step of up to 64
requests); longer ones, such as long prompts' prefill, take stock matmul, which bounds the memory
of oneDNN's per-shape kernel caches. Each plain ``nn.Linear`` with float32 weights on the CPU
keeps its parameters (peft, state dicts and adapter loading read them) and gets a packed copy
that its ``forward`` uses: the packed layers' weights are held twice in RAM. Quantized layers
(bitsandbytes subclasses), other dtypes and GPU devices are left alone. Results equal stock
``linear`` to float32 rounding (~1e-6); a layer whose packed result differs more stays stock.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

PACKED_MAX_ROWS = 64
"""Inputs of at most this many rows (tokens) use the packed weight: decode steps, small prefills.
oneDNN keeps a compiled kernel (~0.6 MB here) per input shape in two LRU caches of 1024 entries
each; prompts of every length would fill them with ~1 GB (measured), while rows up to 64 bound
them to ~64 shapes per weight shape. Larger inputs gain less (1.3x) and take stock matmul."""

TOLERANCE = 1e-4
"""Largest relative difference from stock ``linear`` accepted in the self-check of each layer."""


def available() -> bool:
    """Whether this torch build can pack linear weights for oneDNN."""
    ops = torch.ops.mkldnn
    return bool(torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")
                and hasattr(ops, "_linear_pointwise"))


def prepack_linears(model: torch.nn.Module) -> int:
    """Give every eligible ``nn.Linear`` of ``model`` a oneDNN-packed forward; returns how many."""
    if not available():
        log.info("oneDNN linear packing is not available in this torch build; stock matmul")
        return 0
    packed = 0
    for name, module in model.named_modules():
        if not _eligible(module):
            continue
        if _pack(module):
            packed += 1
        else:
            log.warning("layer %s left unpacked: its packed result differs from stock linear", name)
    return packed


def is_packed(module: torch.nn.Module) -> bool:
    return isinstance(module.__dict__.get("forward"), _PackedForward)


def _eligible(module: torch.nn.Module) -> bool:
    # Exactly nn.Linear: bitsandbytes' Linear8bitLt/Linear4bit subclass it and must keep their own.
    if type(module) is not torch.nn.Linear or is_packed(module):
        return False
    weight = module.weight
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.dim() == 2


def _pack(module: torch.nn.Linear) -> bool:
    with torch.inference_mode():
        forward = _PackedForward(module, torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), None))
        probe = torch.randn(3, module.in_features, generator=torch.Generator().manual_seed(0))
        expected = torch.nn.functional.linear(probe, module.weight, module.bias)
        error = (forward(probe) - expected).abs().max() / expected.abs().max().clamp_min(1e-12)
    if not bool(error <= TOLERANCE):
        return False
    module.forward = forward  # type: ignore[method-assign]
    return True


class _PackedForward:
    """``forward`` of one packed ``nn.Linear``: oneDNN on the packed weight, the module's bias."""

    def __init__(self, module: torch.nn.Linear, packed: torch.Tensor) -> None:
        self.module, self.packed = module, packed

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        rows = x.numel() // max(1, x.shape[-1])
        if rows > PACKED_MAX_ROWS or x.dtype != torch.float32 or x.device.type != "cpu" or torch.is_grad_enabled():
            # Only small float32 inference inputs use the packed weight (training, a cast input or
            # a long prefill: stock).
            return torch.nn.functional.linear(x, self.module.weight, self.module.bias)
        bias = self.module.bias.detach() if self.module.bias is not None else None
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")
