"""A decode step's attention on the CPU in one small C++ kernel (``FARM_CPU_DECODE_ATTENTION=1``,
the default).

At a decode step every row has one query token, and attention reads that row's whole KV cache
once per layer: for 16 rows of the bench model at ~80 columns, 94 MB of float32 keys and values
per step, a quarter of what the weights stream. torch's ``scaled_dot_product_attention`` (its
CPU flash kernel) runs that at ~11 GB/s, two small GEMM calls per (row, head) with their setup;
it took 24 % of a 16-row step of the bench model (0.66-0.70 ms per layer, on a 2-core AMD EPYC
Zen 4 host, 2026-12-07). ``csrc/decode_attention.cpp`` does each (row, head) as one task that
streams its keys, then its values, in order: 0.38-0.41 ms per layer for the same 12 layers read
from memory (0.6-0.66 for SDPA in the same loop; 0.73 against 1.11-1.15 on one thread).

The kernel is built on first use with the machine's compiler (``g++ -O3 -march=native``, 13-25 s)
into ``.farm/build/`` under a name that hashes its source, torch's version and the CPU's flags,
and loaded with ``torch.ops.load_library``: no ninja, no pybind, nothing to install. Where it
cannot be built or loaded the worker logs why once and keeps torch's SDPA.

``enable(model)`` makes the model's attention ``batchfarm_sdpa``: an implementation registered with
transformers' ``AttentionInterface`` (and, for its masks, ``sdpa``'s mask function) that takes the
kernel for one-token float32 queries on the CPU with a boolean padding mask or none, and hands
everything else to transformers' own ``sdpa_attention_forward`` unchanged: prefill, chunked and
packed prefill (several query tokens), GPU tensors, half precision, sliding windows, attention
sinks, soft-capping, dropout in training. Outputs equal SDPA's to float32 rounding (~4e-7).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

log = logging.getLogger(__name__)

IMPLEMENTATION = "batchfarm_sdpa"
"""The attention implementation name ``enable`` sets on a model's config."""

SOURCE = Path(__file__).resolve().parent / "csrc" / "decode_attention.cpp"
COMPILER = os.environ.get("CXX", "g++")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")

_lock = threading.Lock()
_state: dict[str, Any] = {}
"""``loaded``: whether the kernel is usable; ``error``: why not."""


def library_path(root: Path) -> Path:
    """Where the kernel built for this source, torch and CPU lives under ``root``."""
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), torch.__version__.encode(), " ".join(FLAGS).encode(),
                 _cpu_flags().encode(), platform.machine().encode()):
        digest.update(part)
    return root / ".farm" / "build" / f"decode_attention-{digest.hexdigest()[:16]}.so"


def _cpu_flags() -> str:
    """The CPU's feature flags (``-march=native`` compiles for them): a kernel built on one CPU is
    never loaded on another."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _build(target: Path) -> None:
    from torch.utils.cpp_extension import include_paths, library_paths

    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    command = [COMPILER, *FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={abi}", str(SOURCE), "-o", str(partial),
               *(f"-I{path}" for path in include_paths()), *(f"-L{path}" for path in library_paths()),
               "-lc10", "-ltorch_cpu"]
    try:
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)
    except subprocess.CalledProcessError as error:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"{COMPILER} failed: {error.stderr.strip()[-2000:]}") from error
    os.replace(partial, target)  # several workers may build at once: each lands a whole file


def load(root: Path | None = None) -> bool:
    """Build (first use) and load the kernel; whether ``torch.ops.batchfarm.decode_attention``
    is usable. A failure is logged once and remembered."""
    with _lock:
        if "loaded" not in _state:
            _state["loaded"] = _load(root)
        return bool(_state["loaded"])


def _load(root: Path | None) -> bool:
    if sys.platform != "linux":
        _state["error"] = f"built on Linux only (this is {sys.platform})"
        return False
    from protocol.settings import project_root

    target = library_path(root or project_root())
    try:
        if not target.exists():
            log.info("building the CPU decode-attention kernel into %s (once per machine)", target)
            _build(target)
        torch.ops.load_library(str(target))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        _state["error"] = str(error)
        log.warning("CPU decode-attention kernel unavailable, attention stays torch's SDPA: %s", error)
        return False
    return True


def usable(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
           dropout: float, kwargs: dict[str, Any]) -> bool:
    """Whether the kernel computes this call: one float32 query token per row on the CPU, keys and
    values with contiguous last dimensions, a boolean mask of one row per batch row and one column
    per key, shared by every head (or none), and no attention feature the kernel lacks."""
    if query.shape[2] != 1 or dropout or query.shape[1] % key.shape[1]:
        return False
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in (query, key, value)):
        return False
    if any(t.stride(-1) != 1 or t.shape[-1] != query.shape[-1] for t in (key, value)):
        return False
    if any(kwargs.get(name) is not None for name in ("sliding_window", "s_aux", "softcap")):
        return False
    return mask is None or (mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1] == 1
                            and mask.shape[2] == 1 and mask.shape[0] == query.shape[0]
                            and mask.shape[3] == key.shape[2])


def batchfarm_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                   **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: query [B, H, Q, D], key/value [B, Hkv, S, D], returns
    [B, Q, H, D]. The kernel for a decode step, ``sdpa_attention_forward`` for anything else."""
    if _state.get("loaded") and usable(query, key, value, attention_mask, dropout, kwargs):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        mask = None if attention_mask is None else attention_mask[:, 0, 0, :]
        return torch.ops.batchfarm.decode_attention(query[:, :, 0, :], key, value, mask, scale), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, batchfarm_sdpa)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


def enable(model: torch.nn.Module, root: Path | None = None) -> bool:
    """Give ``model`` (a transformers model on the CPU using ``sdpa``) the kernel's attention;
    whether it did. Other implementations (eager, flash) and models whose kernel cannot be built
    are left as they are."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    if next(model.parameters()).device.type != "cpu" or not load(root):
        return False
    _register()
    config._attn_implementation = IMPLEMENTATION  # transformers' setter sets it on sub-configs too
    return True


def sdpa_like(config: Any) -> bool:
    """Whether a config's attention takes SDPA's masks (``sdpa`` itself or ``batchfarm_sdpa``)."""
    return getattr(config, "_attn_implementation", None) in ("sdpa", IMPLEMENTATION)
