"""Shared helpers for the Triton ops in ``kernels/`` (never imports moetrain).

Everything here is host-side Python: block-size and warp heuristics, dtype checks and the
"interpreter" switch. Kernels follow one numeric rule (DESIGN.md, Testing): load in the storage
dtype, upcast to fp32, compute in fp32, cast on store. That rule is also what makes the kernels
correct under ``TRITON_INTERPRET=1``, whose bf16 arithmetic is wrong.
"""

from __future__ import annotations

import functools
import os

import torch
import triton

#: Storage dtypes accepted for activations by every op in this package.
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

#: Largest last dimension an op keeps in registers in one block (rmsnorm holds a whole row).
MAX_FUSED_DIM = 65536


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def next_pow2(n: int) -> int:
    """Smallest power of two >= max(n, 1)."""
    return triton.next_power_of_2(max(int(n), 1))


def num_warps_for(block_elems: int, lo: int = 1, hi: int = 16) -> int:
    """Warps for a program that touches ``block_elems`` elements (about 256 elements per warp)."""
    w = max(lo, min(hi, block_elems // 256))
    return next_pow2(w) if w & (w - 1) else w


def check_dtype(name: str, t: torch.Tensor, allowed=SUPPORTED_DTYPES) -> None:
    """Raise TypeError unless ``t.dtype`` is one of ``allowed``."""
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{name}: dtype {t.dtype} is not supported (expected one of {names})")


def check_device(*named: tuple[str, torch.Tensor]) -> torch.device:
    """Raise ValueError unless all tensors share one device; return it.

    Without the interpreter the device must be CUDA (Triton compiles for the GPU).
    """
    dev = named[0][1].device
    for name, t in named[1:]:
        if t.device != dev:
            raise ValueError(f"{name} is on {t.device} but {named[0][0]} is on {dev}")
    if dev.type != "cuda" and not interpreting():
        raise ValueError(
            f"{named[0][0]} is on {dev}: Triton kernels need CUDA tensors "
            "(or TRITON_INTERPRET=1 set before kernels/ is imported, for CPU tests)"
        )
    return dev


def max_shared_mem(device: torch.device) -> int:
    """Shared memory one program may use, in bytes (Triton's driver query, cached per GPU: the first query
    builds Triton's driver helper, ~200 ms on the H200 machine; 227 KB on an H100/H200). Large on CPU / under
    the interpreter (no such limit)."""
    if device.type != "cuda":
        return 1 << 30
    return _max_shared_mem_cuda(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _max_shared_mem_cuda(idx: int) -> int:
    try:
        from triton.runtime import driver
        return int(driver.active.utils.get_device_properties(idx)["max_shared_mem"])
    except Exception:  # noqa: BLE001 - an older or different driver API: assume the smallest current GPU's
        return 99 * 1024


def sm_count(device: torch.device) -> int:
    """Number of streaming multiprocessors (a small constant on CPU / under the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


# ----------------------------------------------------------------------------------------------
# output allocation (poisonable for tests)
# ----------------------------------------------------------------------------------------------
#: When True, launchers fill their outputs with NaN (floats) / the dtype's minimum (integers) before
#: the kernel runs, so an element a kernel fails to write shows up in tests. Off in production.
POISON_OUTPUTS = os.environ.get("MOETRAIN_KERNEL_POISON", "0") == "1"


def new_empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """``torch.empty`` unless :data:`POISON_OUTPUTS` is set (then NaN / integer minimum)."""
    if not POISON_OUTPUTS:
        return torch.empty(shape, dtype=dtype, device=device)
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.full(shape, torch.iinfo(dtype).min, dtype=dtype, device=device)


def new_empty_like(t: torch.Tensor) -> torch.Tensor:
    """:func:`new_empty` with ``t``'s shape, dtype and device (contiguous)."""
    return new_empty(t.shape, t.dtype, t.device)


def poisoned(t: torch.Tensor) -> torch.Tensor:
    """Return the freshly allocated ``t``, filled in place with NaN (floats) / the dtype's minimum (integers)
    when :data:`POISON_OUTPUTS` is set. Unlike :func:`new_empty` it keeps ``t``'s strides, so a strided
    allocation (e.g. an empty_like or a transposed [B, T, H, D] buffer) is poisoned without changing layout."""
    if POISON_OUTPUTS and t.numel():
        t.fill_(float("nan") if t.dtype.is_floating_point else torch.iinfo(t.dtype).min)
    return t
