"""FP8 training by module swaps, applied from outside to a plain model (``apply_fp8``).

Recipes (``Fp8Config.recipe``):

``"tensorwise"``  one scale per tensor (x, W, grad_out), ``torch._scaled_mm`` on CUDA sm89+.
``"rowwise"``     one scale per row of each GEMM operand along its reduction dim (x per token, W per output
                  channel forward; W per input channel, grad per token / per channel backward: every operand
                  is requantised along the dim its GEMM reduces over), ``torch._scaled_mm`` rowwise.
``"blockwise"``   DeepSeek-V3 §3.3 fine-grained quantisation: activations and grad_out 1x128 tiles, weights
                  128x128 blocks, all E4M3; block-scaled GEMMs with FP32 promotion every 128 K: forward
                  y = x W^T, dgrad dX = G W (W's blocks reused transposed), wgrad dW = G^T X with G^T and X^T
                  quantised 1x128 along tokens (X^T is quantised in the forward, in the same pass as X, and
                  saved in FP8). Quantisation and the routed experts' grouped GEMMs are Triton kernels
                  (``kernels.fp8_quant``, ``kernels.fp8_gemm``); the dense GEMMs are cuBLAS's block-scaled
                  ``torch._scaled_mm`` where it passed its check on this GPU (``moetrain.precision.fp8_cublas``:
                  Hopper, dims multiples of 128, or of 16 if partial blocks passed too), else the Triton GEMMs.

Scales are dequantisation multipliers ``amax / fp8_max`` in float32 (``kernels.fp8_quant`` conventions:
amax == 0 -> scale 1, tiny amax clamped to 1e-12, non-finite input -> NaN scale, which propagates).

Numerics of the backends (chosen per call from the device, ``Fp8Config.backend="auto"``):
  * ``scaled_mm``  (tensorwise/rowwise, CUDA with compute capability >= 8.9): ``torch._scaled_mm``.
    Rows / the reduction dim are zero-padded to multiples of 16 where _scaled_mm needs it (token counts).
    Routed experts on sm90: ``torch._scaled_grouped_mm`` (``moetrain.precision.fp8_grouped``; grad_out E4M3).
    Blockwise on CUDA sm90 when ``fp8_cublas.status`` passed: cuBLAS block-scaled GEMMs for the dense linears
    (Triton quantisation, Triton grouped GEMMs for the routed experts). ``MOETRAIN_FP8_CUBLAS=0`` in the
    environment keeps blockwise on ``triton`` (benchmarking).
  * ``triton``     (blockwise, CUDA, or CPU when kernels/ was imported with TRITON_INTERPRET=1).
  * ``emulate``    (anything else, e.g. CPU tests): quantise to the same fp8 values with the same scales,
    dequantise, matmul in fp32 -- identical to the scaled GEMMs up to accumulation order.

Tensorwise / rowwise quantisation on CUDA runs the fused Triton kernels of ``kernels.fp8_rowwise`` (one launch per
row-scaled operand, two for column / tensor scales, transposed operands written straight into the layout their
GEMM reads), bit-identical to the eager torch code (``_quant_tensorwise`` / ``_quant_rowwise``), which stays the
CPU / emulate path and the reference (``FUSED_QUANT``).

Gradient formats: blockwise always E4M3 (DeepSeek-V3); tensorwise/rowwise ``grad_dtype`` "e4m3" | "e5m2"
(default e5m2, the classic hybrid format). Weights stay in their master dtype and are quantised on the fly
every forward (no FP8 weight cache). Outputs are in x's dtype (or the autocast dtype when autocast is on);
weight grads in the weight's dtype.

``apply_fp8(model, recipe, skip=...)`` turns each eligible plain ``nn.Linear`` into an ``Fp8Linear`` and each
routed ``GroupedExperts`` (params w1/w2/w3 [E, out, in]) into an ``Fp8GroupedExperts``, in place (a class
swap: the same module objects, Parameters, hooks and state_dict keys, so optimizers and checkpoints are
unchanged; ``isinstance(m, nn.Linear)`` / ``isinstance(m, GroupedExperts)`` stay True). Apply it before
FSDP / torch.compile wrapping. The MoE ``Gate`` (not an nn.Linear), norms, the embedding and the head
``output`` are never touched. Routed experts: blockwise on the Triton backend runs grouped kernels with no host
sync; tensorwise / rowwise on the scaled_mm backend run ``torch._scaled_grouped_mm`` (``fp8_grouped``) with no
host sync where it is supported (CUDA sm90, dims multiples of 16); everything else loops over experts (one host
sync per MoE layer).

Safety: with ``debug=True`` each swapped module checks its output for inf/nan after every forward (a host sync)
and raises ``FloatingPointError`` naming the module (the qualified name stored at swap time).
"""
from __future__ import annotations

import fnmatch
import functools
import os
from dataclasses import dataclass, replace
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from moetrain.model.moe import GroupedExperts

__all__ = [
    "RECIPES", "GRAD_DTYPES", "Fp8Config", "Fp8Linear", "Fp8GroupedExperts", "apply_fp8",
    "fp8_linear", "resolve_backend", "describe_backend",
]

RECIPES = ("tensorwise", "rowwise", "blockwise")
GRAD_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
BACKENDS = ("auto", "scaled_mm", "triton", "emulate")
EXPERT_GEMMS = ("auto", "grouped", "per_expert")
#: ``expert_gemm="auto"`` takes the per-expert cuBLAS path only when the experts average at least this many rows:
#: measured faster than the grouped kernels at 2048 and 8192 rows per expert (16 experts, H200,
#: benchmarks/README.md, eighth GPU session); below, one launch per expert and GEMM was not measured
AUTO_MIN_ROWS_PER_EXPERT = 1024
E4M3 = torch.float8_e4m3fn
_AMAX_EPS = 1e-12


@dataclass(frozen=True)
class Fp8Config:
    """How one swapped module computes its GEMMs.

    recipe: "tensorwise" | "rowwise" | "blockwise".
    grad_dtype: "e4m3" | "e5m2", the grad_out format for tensorwise/rowwise (blockwise: always e4m3).
    use_fast_accum: _scaled_mm fast accumulation for the forward GEMM (tensorwise/rowwise on CUDA).
    backend: "auto" (by device, see module docstring) | "scaled_mm" | "triton" | "emulate".
    debug: check outputs for inf/nan after every forward and raise naming the module.
    expert_gemm: blockwise routed experts on the scaled_mm backend: "grouped" (the Triton grouped kernels, no
      host sync) | "per_expert" (one cuBLAS block-scaled GEMM per expert, ``fp8_experts_cublas``; the counts on
      the host: prefetched by the dispatcher at ep = 1, else read once per layer; the grouped kernels where
      cuBLAS is not usable) | "auto" (per_expert where the dispatcher has the counts on the host already and the
      experts average >= ``AUTO_MIN_ROWS_PER_EXPERT`` rows, so no extra sync; grouped otherwise).
    """

    recipe: str = "blockwise"
    grad_dtype: str = "e5m2"
    use_fast_accum: bool = True
    backend: str = "auto"
    debug: bool = False
    expert_gemm: str = "auto"

    def __post_init__(self):
        if self.recipe not in RECIPES:
            raise ValueError(f"fp8 recipe must be one of {RECIPES}, got {self.recipe!r}")
        if self.grad_dtype not in GRAD_DTYPES:
            raise ValueError(f"fp8 grad_dtype must be one of {tuple(GRAD_DTYPES)}, got {self.grad_dtype!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"fp8 backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.expert_gemm not in EXPERT_GEMMS:
            raise ValueError(f"fp8 expert_gemm must be one of {EXPERT_GEMMS}, got {self.expert_gemm!r}")
        if self.recipe != "blockwise" and self.backend == "triton":
            raise ValueError(f"fp8 {self.recipe} recipe has no triton backend; use 'auto', 'scaled_mm' or 'emulate'")


# ----------------------------------------------------------------------------------------------------------
# backend selection
# ----------------------------------------------------------------------------------------------------------
_KERNELS = None


def _kernels():
    """(kernels.fp8_quant, kernels.fp8_gemm), imported lazily; None when Triton is unavailable."""
    global _KERNELS
    if _KERNELS is None:
        try:
            from kernels import fp8_gemm, fp8_quant
            _KERNELS = (fp8_quant, fp8_gemm)
        except Exception:  # pragma: no cover - triton missing
            _KERNELS = False
    return _KERNELS or None


def _scaled_mm_ok(device: torch.device) -> bool:
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def resolve_backend(cfg: Fp8Config, device: torch.device) -> str:
    """The backend a call on ``device`` uses: "scaled_mm" | "triton" | "emulate"."""
    if cfg.backend != "auto":
        return cfg.backend
    if cfg.recipe == "blockwise":
        k = _kernels()
        if k is None or not (device.type == "cuda" or k[0].INTERPRETED):
            return "emulate"
        if device.type == "cuda" and os.environ.get("MOETRAIN_FP8_CUBLAS", "1") != "0":
            from moetrain.precision import fp8_cublas
            if fp8_cublas.available(device):
                return "scaled_mm"
        return "triton"
    return "scaled_mm" if _scaled_mm_ok(device) else "emulate"


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    try:
        if torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
    except (TypeError, AttributeError, RuntimeError):  # pragma: no cover - older torch
        pass
    return x.dtype


# ----------------------------------------------------------------------------------------------------------
# tensorwise / rowwise quantisation (pure torch) and the scaled GEMM
# ----------------------------------------------------------------------------------------------------------
def _scale(amax: torch.Tensor, fp8_max: float) -> torch.Tensor:
    amax = amax.float()
    s = torch.where(amax > 0, amax.clamp_min(_AMAX_EPS) / fp8_max, torch.ones_like(amax))
    return torch.where(torch.isfinite(amax), s, torch.full_like(s, float("nan")))


def _cast(t: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    m = torch.finfo(dtype).max
    return (t.float() / s).clamp(-m, m).to(dtype)


#: Fused Triton quantisation (``kernels.fp8_rowwise``) for the tensorwise / rowwise recipes, bit-identical to the
#: eager code below: "auto" uses it for CUDA tensors when triton imports, "always" also for CPU tensors (only
#: when kernels/ runs in Triton's interpreter, TRITON_INTERPRET=1: tests), "never" keeps the eager path.
FUSED_QUANT = "auto"
_ROWWISE = None


def _rowwise_kernels(t: torch.Tensor):
    """``kernels.fp8_rowwise`` when the fused quantisation applies to ``t`` (per ``FUSED_QUANT``), else None."""
    global _ROWWISE
    if FUSED_QUANT == "never" or t.numel() == 0 or (t.device.type != "cuda" and FUSED_QUANT != "always"):
        return None
    if _ROWWISE is None:
        try:
            from kernels import fp8_rowwise
            _ROWWISE = fp8_rowwise
        except Exception:  # pragma: no cover - triton missing
            _ROWWISE = False
    if not _ROWWISE or (t.device.type != "cuda" and not _ROWWISE.INTERPRETED):
        return None
    if t.dim() not in (2, 3) or t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None
    return _ROWWISE


def _quant_tensorwise(t: torch.Tensor, dtype: torch.dtype = E4M3):
    """t -> (t_fp8 same shape, scale: 0-dim fp32)."""
    k = _rowwise_kernels(t)
    if k is not None and t.dim() == 2:
        return k.quant_tensor(t, dtype)
    s = _scale(t.detach().abs().amax(), torch.finfo(dtype).max)
    return _cast(t, s, dtype), s


def _quant_rowwise(t: torch.Tensor, dtype: torch.dtype = E4M3):
    """t [R, C] -> (t_fp8 [R, C] contiguous, scales [R, 1] fp32): one scale per row (amax over C)."""
    k = _rowwise_kernels(t)
    if k is not None and t.dim() == 2:
        if t.stride(0) == 1 and t.stride(1) != 1 and t.shape[1] > 1:
            q, s = k.quant_cols(t.t(), dtype)   # t is a transposed view (W^T, g^T, x^T): read it row-major
        else:
            q, s = k.quant_rows(t, dtype)
        return q, s[:, None]
    s = _scale(t.detach().abs().amax(dim=1, keepdim=True), torch.finfo(dtype).max)
    return _cast(t, s, dtype).contiguous(), s


def _pad_dim(t: torch.Tensor, dim: int, mult: int = 16) -> torch.Tensor:
    """Zero-pad ``t`` along ``dim`` to a multiple of ``mult`` (fp8 tensors are padded through a uint8 view)."""
    r = (-t.shape[dim]) % mult
    if r == 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim) + [0, r]
    if t.element_size() == 1 and t.dtype.is_floating_point:
        return F.pad(t.view(torch.uint8), pad).view(t.dtype)
    return F.pad(t, pad)


def _scaled_gemm(a, sa, b, sb, out_dtype, backend, fast_accum=False):
    """C[M, N] = (a * sa) @ (b * sb)^T for fp8 a [M, K], b [N, K]; sa, sb 0-dim (tensorwise) or [M,1]/[N,1]."""
    if backend == "emulate":
        return ((a.float() * sa) @ (b.float() * sb).t()).to(out_dtype)
    M, N = a.shape[0], b.shape[0]
    rowwise = sa.dim() > 0
    # _scaled_mm: a row-major, b column-major; dims multiples of 16 (pad rows/reduction with zeros).
    a_p = _pad_dim(_pad_dim(a, 0), 1)
    b_p = _pad_dim(_pad_dim(b, 0), 1)
    if rowwise:
        sa_p = _pad_dim(sa, 0) if a_p.shape[0] != M else sa
        sb_p = _pad_dim(sb, 0) if b_p.shape[0] != N else sb
        sa_p, sb_p = sa_p.contiguous(), sb_p.t().contiguous()
        mm_dtype = torch.bfloat16
    else:
        sa_p, sb_p = sa, sb
        mm_dtype = out_dtype
    out = torch._scaled_mm(a_p.contiguous(), b_p.contiguous().t(), scale_a=sa_p, scale_b=sb_p,
                           out_dtype=mm_dtype, use_fast_accum=fast_accum)
    return out[:M, :N].to(out_dtype)


class _ScaledLinearFn(torch.autograd.Function):
    """y = x W^T with tensorwise or rowwise FP8 GEMMs (forward, dgrad, wgrad)."""

    @staticmethod
    def forward(ctx, x, weight, cfg: Fp8Config, backend: str, out_dtype: torch.dtype):
        if cfg.recipe == "tensorwise":
            xq, sx = _quant_tensorwise(x)
            wq, sw = _quant_tensorwise(weight)
            ctx.save_for_backward(xq, sx, wq, sw)
        else:
            xq, sx = _quant_rowwise(x)
            wq, sw = _quant_rowwise(weight)
            ctx.save_for_backward(x, weight)
        ctx.cfg, ctx.backend = cfg, backend
        ctx.x_dtype, ctx.w_dtype = x.dtype, weight.dtype
        return _scaled_gemm(xq, sx, wq, sw, out_dtype, backend, cfg.use_fast_accum)

    @staticmethod
    def backward(ctx, g):
        cfg, backend = ctx.cfg, ctx.backend
        gdt = GRAD_DTYPES[cfg.grad_dtype]
        dx = dw = None
        if cfg.recipe == "tensorwise":
            xq, sx, wq, sw = ctx.saved_tensors
            gq, sg = _quant_tensorwise(g, gdt)
            if ctx.needs_input_grad[0]:
                dx = _scaled_gemm(gq, sg, wq.t().contiguous(), sw, ctx.x_dtype, backend)
            if ctx.needs_input_grad[1]:
                dw = _scaled_gemm(gq.t().contiguous(), sg, xq.t().contiguous(), sx, torch.float32, backend)
        else:
            x, weight = ctx.saved_tensors
            if ctx.needs_input_grad[0]:
                gq, sg = _quant_rowwise(g, gdt)                 # [T, N] per token over N
                wtq, swt = _quant_rowwise(weight.t())           # [K, N] per input channel over N
                dx = _scaled_gemm(gq, sg, wtq, swt, ctx.x_dtype, backend)
            if ctx.needs_input_grad[1]:
                gtq, sgt = _quant_rowwise(g.t(), gdt)           # [N, T] per output channel over tokens
                xtq, sxt = _quant_rowwise(x.t())                # [K, T] per input channel over tokens
                dw = _scaled_gemm(gtq, sgt, xtq, sxt, torch.float32, backend)
        if dw is not None:
            dw = dw.to(ctx.w_dtype)
        return dx, dw, None, None, None


def describe_backend(cfg: Fp8Config, device: torch.device) -> str:
    """One line for the run log: which GEMMs run where for ``cfg`` on ``device`` (runs the cuBLAS check)."""
    backend = resolve_backend(cfg, device)
    line = _describe_gemms(cfg, backend, device)
    if cfg.expert_gemm == "per_expert" and not (cfg.recipe == "blockwise" and backend == "scaled_mm"):
        why = ("it applies to the blockwise recipe only" if cfg.recipe != "blockwise"
               else "it needs cuBLAS's block-scaled GEMMs (Hopper)")
        line += f"; fp8_expert_gemm=per_expert has no effect here: {why}"
    return line


def _describe_gemms(cfg: Fp8Config, backend: str, device: torch.device) -> str:
    if cfg.recipe == "blockwise":
        if backend == "scaled_mm":
            from moetrain.precision import fp8_cublas
            experts = {"per_expert": "one cuBLAS block-scaled GEMM per expert (counts on the host: prefetched by "
                                     "the dispatcher at ep = 1, else read once a layer)",
                       "auto": "one cuBLAS block-scaled GEMM per expert where the dispatcher has the counts on the "
                               f"host (ep = 1) and the experts average >= {AUTO_MIN_ROWS_PER_EXPERT} rows, else "
                               "Triton grouped GEMMs"}.get(cfg.expert_gemm, "Triton grouped GEMMs")
            return (f"dense GEMMs on cuBLAS block-scaled {fp8_cublas.status(device)[1]} (other shapes: Triton); "
                    f"routed experts on {experts}")
        if backend == "triton":
            why = ""
            if device.type == "cuda":
                from moetrain.precision import fp8_cublas
                ok, detail = fp8_cublas.status(device)
                why = (" (cuBLAS block-scaled GEMMs off: MOETRAIN_FP8_CUBLAS=0)" if ok
                       else f" (cuBLAS block-scaled GEMMs not used: {detail})")
            return "Triton block-scaled GEMMs" + why
        return "emulated (dequantise + fp32 matmul: no FP8 speed-up on this device)"
    return {"scaled_mm": "torch._scaled_mm", "emulate": "emulated (dequantise + fp32 matmul: no FP8 speed-up "
            "on this device)"}.get(backend, backend)


# ----------------------------------------------------------------------------------------------------------
# blockwise (DeepSeek-V3): Triton kernels or their pure-torch references
# ----------------------------------------------------------------------------------------------------------
def _block_ops(backend: str):
    """The quantisers and GEMMs of one blockwise backend: ``scaled_mm`` (cuBLAS GEMMs, each falling back to Triton
    for shapes it does not take; the 1x128 scales are written in cuBLAS's layout, strides (1, rows), so no scale
    copy precedes a GEMM), ``triton`` (kernels/), or the pure-torch references (``emulated``)."""
    k = _kernels()
    if k is None:
        raise RuntimeError("fp8 blockwise needs the Triton kernels in kernels/ (import failed: is triton installed?)")
    q, g = k
    if backend == "scaled_mm":
        from moetrain.precision import fp8_cublas as c
        return dict(q1=functools.partial(q.quant_1x128, col_major_scales=True),
                    q1t=functools.partial(q.quant_1x128_with_transpose, col_major_scales=True), qb=q.quant_128x128,
                    fwd=c.fp8_gemm_blockwise, wgrad=c.fp8_gemm_1x128_1x128)
    if backend == "triton":
        return dict(q1=q.quant_1x128, q1t=q.quant_1x128_with_transpose, qb=q.quant_128x128,
                    fwd=g.fp8_gemm_blockwise, wgrad=g.fp8_gemm_1x128_1x128)
    return dict(q1=q.quant_1x128_ref, q1t=q.quant_1x128_with_transpose_ref, qb=q.quant_128x128_ref,
                fwd=g.fp8_gemm_blockwise_ref, wgrad=g.fp8_gemm_1x128_1x128_ref)


def _gemm_dtype(dt: torch.dtype) -> torch.dtype:
    return dt if dt in (torch.bfloat16, torch.float32, torch.float16) else torch.float32


def _weight_operands(quant_128x128, weight: torch.Tensor, dgrad: bool, weight2: torch.Tensor | None = None):
    """``(w_fp8, w_scales, wt_fp8 or None)``: the weight's 128x128 quantisation, plus W^T's bytes (written by the
    same launch) when the dgrad ``dX = G W`` will need them. With ``weight2`` (same shape [E, N, K], N a multiple of
    128): the operands of ``cat([weight, weight2], -2)`` (the experts' W1 and W3 as one GEMM), each weight quantised
    straight into its half (the same blocks as quantising the concatenation, without an fp32 copy of it)."""
    if weight2 is None:
        if dgrad:
            return quant_128x128(weight, with_transpose=True)
        return (*quant_128x128(weight), None)
    E, N, K = weight.shape
    nb, kb = N // 128, -(-K // 128)
    q = torch.empty((E, 2 * N, K), dtype=torch.float8_e4m3fn, device=weight.device)
    s = torch.empty((E, 2 * nb, kb), dtype=torch.float32, device=weight.device)
    qt = torch.empty((E, K, 2 * N), dtype=torch.float8_e4m3fn, device=weight.device) if dgrad else None
    for i, w in enumerate((weight, weight2)):
        out = (q[:, i * N:(i + 1) * N], s[:, i * nb:(i + 1) * nb]) + ((qt[..., i * N:(i + 1) * N],) if dgrad else ())
        quant_128x128(w, with_transpose=dgrad, out=out)
    return q, s, qt


class _BlockwiseLinearFn(torch.autograd.Function):
    """y = x W^T, DeepSeek-V3 fine-grained FP8: x 1x128, W 128x128, grad 1x128, all E4M3.

    The weight's quantisation also writes W^T's bytes (``quant_128x128(with_transpose=True)``), so the dgrad
    ``dX = G W`` runs as the forward GEMM on (G, W^T) with the scales transposed: no transposed copy of W."""

    @staticmethod
    def forward(ctx, x, weight, backend: str, out_dtype: torch.dtype):
        ops = _block_ops(backend)
        if ctx.needs_input_grad[1]:  # (grad mode is off inside forward; needs_input_grad is not)
            xq, xs, xtq, xts = ops["q1t"](x)
        else:
            (xq, xs), xtq, xts = ops["q1"](x), None, None
        wq, ws, wtq = _weight_operands(ops["qb"], weight, ctx.needs_input_grad[0])
        ctx.save_for_backward(xtq, xts, wtq, ws)
        ctx.backend, ctx.x_dtype, ctx.w_dtype = backend, x.dtype, weight.dtype
        return ops["fwd"](xq, xs, wq, ws, out_dtype=_gemm_dtype(out_dtype)).to(out_dtype)

    @staticmethod
    def backward(ctx, g):
        ops = _block_ops(ctx.backend)
        xtq, xts, wtq, ws = ctx.saved_tensors
        dx = dw = None
        need_dx, need_dw = wtq is not None, ctx.needs_input_grad[1] and xtq is not None
        if need_dw:
            gq, gs, gtq, gts = ops["q1t"](g)
        else:
            gq, gs = ops["q1"](g)
        if need_dx:
            dx = ops["fwd"](gq, gs, wtq, ws.t(), out_dtype=_gemm_dtype(ctx.x_dtype)).to(ctx.x_dtype)
        if need_dw:
            dw = ops["wgrad"](gtq, gts, xtq, xts, out_dtype=torch.float32).to(ctx.w_dtype)
        return dx, dw, None, None


def save_grouped_blockwise_operands(ctx, x: torch.Tensor, weight: torch.Tensor, weight2, tiles, **quant_kw):
    """The forward of a grouped blockwise GEMM (x [M, K] rows sorted by expert, weight [E, N, K], or the pair
    ``cat([weight, weight2], 1)`` when ``weight2`` is not None; the Function's inputs are (x, weight, weight2, ...)):
    quantises x (1x128 along K, and along tokens for the wgrad: ``quant_1x128_with_transpose_grouped(x, tiles,
    **quant_kw)``) and the weight (128x128, plus W^T's bytes for the dgrad), saves on ``ctx`` what the backward
    needs (``saved_tensors`` = x^T fp8 and scales or None, W^T fp8 or None, the weight scales; ``x_dtype``,
    ``w_dtype``, ``pair``) and returns ``(x_fp8, x_scales, w_fp8, w_scales)`` for the forward GEMM."""
    q, _ = _kernels()
    xq, xs, xtq, xts = q.quant_1x128_with_transpose_grouped(x, tiles, **quant_kw)
    wq, ws, wtq = _weight_operands(q.quant_128x128, weight, ctx.needs_input_grad[0], weight2)
    if not any(ctx.needs_input_grad[1:3]):
        xtq = xts = None
    ctx.save_for_backward(xtq, xts, wtq, ws)
    ctx.x_dtype, ctx.w_dtype, ctx.pair = x.dtype, weight.dtype, weight2 is not None
    return xq, xs, wq, ws


def split_pair_grad(ctx, dw: torch.Tensor | None):
    """The weight gradients a grouped blockwise Function returns for (weight, weight2): ``dw`` and None, or for a
    pair (``ctx.pair``) the two halves of ``dw`` [E, 2N, K] along dim 1."""
    if dw is None or not ctx.pair:
        return dw, None
    return dw.chunk(2, dim=1)


class _GroupedBlockwiseFn(torch.autograd.Function):
    """Per-expert y_e = x_e W_e^T for rows sorted by expert, blockwise FP8, Triton grouped kernels, no host sync.

    x [M, K], weight [E, N, K] (with weight2 [E, N, K], N a multiple of 128: W = cat([weight, weight2], 1), the
    experts' W1 and W3; else weight2 None); ``tiles`` from kernels.fp8_quant.grouped_tiles(counts, M)."""

    @staticmethod
    def forward(ctx, x, weight, weight2, tiles, out_dtype: torch.dtype):
        _, g = _kernels()
        xq, xs, wq, ws = save_grouped_blockwise_operands(ctx, x, weight, weight2, tiles)
        ctx.tiles = tiles
        return g.fp8_gemm_grouped(xq, xs, wq, ws, tiles, out_dtype=_gemm_dtype(out_dtype)).to(out_dtype)

    @staticmethod
    def backward(ctx, grad):
        q, g = _kernels()
        xtq, xts, wtq, ws = ctx.saved_tensors
        tiles = ctx.tiles
        gq, gs, gtq, gts = q.quant_1x128_with_transpose_grouped(grad.contiguous(), tiles)
        dx = dw = None
        if wtq is not None:
            dx = g.fp8_gemm_grouped(gq, gs, wtq, ws.transpose(1, 2).contiguous(),
                                    tiles, out_dtype=_gemm_dtype(ctx.x_dtype)).to(ctx.x_dtype)
        if xtq is not None:
            dw = g.fp8_gemm_grouped_wgrad(gtq, gts, xtq, xts, tiles, out_dtype=torch.float32).to(ctx.w_dtype)
        return (dx, *split_pair_grad(ctx, dw), None, None)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               cfg: Fp8Config = Fp8Config()) -> torch.Tensor:
    """Functional FP8 ``F.linear``: x [..., K] @ weight[N, K]^T (+ bias[N]) -> [..., N].

    Differentiable in x, weight and bias. Output dtype: x's (or the autocast dtype)."""
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"fp8_linear: x [..., {x.shape[-1]}] does not match weight {tuple(weight.shape)}")
    out_dtype = _out_dtype(x)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    backend = resolve_backend(cfg, x.device)
    if cfg.recipe == "blockwise":
        y = _BlockwiseLinearFn.apply(x2, weight, backend, out_dtype)
    else:
        y = _ScaledLinearFn.apply(x2, weight, cfg, backend, out_dtype)
    y = y.reshape(*lead, weight.shape[0])
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y


def _check_finite(name: str, kind: str, y: torch.Tensor, recipe: str) -> None:
    if not bool(torch.isfinite(y).all()):
        n_bad = int((~torch.isfinite(y)).sum())
        raise FloatingPointError(
            f"{kind} '{name}' (fp8 {recipe}): {n_bad} non-finite output values of {y.numel()}; the input or "
            "weight holds inf/nan or overflowed (check the learning rate / loss scale, or disable fp8 for this "
            "module via apply_fp8(skip=...))")


# ----------------------------------------------------------------------------------------------------------
# modules
# ----------------------------------------------------------------------------------------------------------
class Fp8Linear(nn.Linear):
    """``nn.Linear`` whose matmuls run in FP8 (see the module docstring for recipes and backends).

    Same parameters (``weight`` [out, in] in its master dtype, optional ``bias``), same state_dict keys.
    Build with ``Fp8Linear.from_linear(linear, cfg, name)``, which shares the Parameter objects.
    Attributes: ``fp8_config`` (Fp8Config), ``fp8_name`` (qualified name, for error messages).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 config: Fp8Config | None = None, name: str = ""):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.fp8_config = config or Fp8Config()
        self.fp8_name = name

    @classmethod
    def convert(cls, linear: nn.Linear, config: Fp8Config | str, name: str = "") -> "Fp8Linear":
        """Turn ``linear`` into an Fp8Linear in place (class swap: parameters, hooks and references held
        elsewhere stay valid). Used by ``apply_fp8``."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"Fp8Linear.convert: {name or 'module'} is a {type(linear).__name__}, not nn.Linear")
        if type(linear) is not nn.Linear and not isinstance(linear, cls):
            raise TypeError(f"Fp8Linear.convert: {name or 'module'} is a subclass {type(linear).__name__} of "
                            "nn.Linear; use from_linear or skip it")
        linear.__class__ = cls
        linear.fp8_config = Fp8Config(recipe=config) if isinstance(config, str) else config
        linear.fp8_name = name
        return linear  # type: ignore[return-value]

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: Fp8Config | str, name: str = "") -> "Fp8Linear":
        """A new Fp8Linear sharing ``linear``'s Parameter objects (``linear`` itself is unchanged)."""
        cfg = Fp8Config(recipe=config) if isinstance(config, str) else config
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta",
                  config=cfg, name=name)
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fp8_linear(x, self.weight, self.bias, self.fp8_config)
        if self.fp8_config.debug:
            _check_finite(self.fp8_name, "Fp8Linear", y, self.fp8_config.recipe)
        return y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp8={self.fp8_config.recipe}"


class Fp8GroupedExperts(GroupedExperts):
    """FP8 routed experts: a ``moetrain.model.moe.GroupedExperts`` whose three GEMMs run in FP8.

    ``y_e = act_fn(x_e W1_e^T, x_e W3_e^T) W2_e^T`` per expert (``act_fn`` = SwiGLU by default), with
    ``w1`` [E, I, D], ``w2`` [E, D, I], ``w3`` [E, I, D] in their master dtype.
    ``forward(x[M, D], tokens_per_expert: LongTensor[E]) -> [M, D]`` (x.dtype), rows of x sorted by expert.

    Made by ``Fp8GroupedExperts.convert(experts, cfg, name)``, which changes the class of the module in place
    (parameters, buffers, hooks, ``reset_parameters`` and state_dict keys all stay; ``isinstance(m,
    GroupedExperts)`` stays True). Each expert's rows form their own GEMM group, so quantisation tiles (1x128
    along D for the forward, along tokens for wgrad) never straddle two experts, and any per-expert token count
    works: the blockwise Triton kernels mask partial tiles (no padding copy); the _scaled_mm path zero-pads
    rows and the token reduction dim to multiples of 16. W1 and W3 run as one GEMM ([2I, D]). The hidden
    activation between the GEMMs is requantised (1x128), as in DeepSeek-V3.

    Paths (chosen per call, no ``if fp8`` in the model):
      * blockwise, Triton backend: grouped kernels (kernels.fp8_gemm.fp8_gemm_grouped / fp8_gemm_grouped_wgrad
        over 128-row tiles that never straddle experts, tiled on the device): no host sync, a constant number
        of launches.
      * blockwise, scaled_mm backend, ``expert_gemm="per_expert"`` (or ``"auto"`` with the counts on the host and
        >= ``AUTO_MIN_ROWS_PER_EXPERT`` rows per expert on average) and cuBLAS usable at D and I: one cuBLAS
        block-scaled GEMM per expert with tokens (``moetrain.precision.fp8_experts_cublas``; the counts on the host:
        prefetched by the dispatcher at ep = 1, see ``apply_fp8``, else one host sync per layer).
      * tensorwise / rowwise, scaled_mm backend, where ``fp8_grouped.scaled_grouped_mm_supported`` (CUDA sm90,
        D and I multiples of 16, M > 0, E <= 1023): ``torch._scaled_grouped_mm`` for the forward and dgrad GEMMs
        (grad_out in E4M3 whatever ``grad_dtype`` says: the operator rejects E5M2), wgrad per
        ``scaled_grouped_wgrad`` ("bf16": ``torch._grouped_mm``; "fp8": ``_scaled_grouped_mm`` 2D x 2D); each
        expert's rows are padded on the device to multiples of 16 (see ``moetrain.precision.fp8_grouped``). No
        host sync; ``tokens_per_expert`` must sum to M (not checked on this path).
      * everything else (CPU / emulate, other GPUs, odd dims, empty input, ``grouped_kernels = False``): a loop
        over experts on the host (``tokens_per_expert.tolist()``: one device sync, one fp8_linear per expert and
        weight; checks that the counts sum to M).
    """

    fp8_config: Fp8Config
    fp8_name: str
    grouped_kernels: bool = True  # grouped paths where supported (False: always the per-expert loop)
    scaled_grouped_wgrad: str = "bf16"  # tensorwise/rowwise grouped path: wgrad GEMM "bf16" | "fp8"

    @classmethod
    def convert(cls, experts: GroupedExperts, config: Fp8Config | str, name: str = "") -> "Fp8GroupedExperts":
        if not isinstance(experts, GroupedExperts):
            raise TypeError(f"Fp8GroupedExperts.convert: {name or 'module'} is a {type(experts).__name__}, "
                            "not a GroupedExperts")
        base = type(experts)
        if not issubclass(base, cls):
            experts.__class__ = cls if base is GroupedExperts else type(f"Fp8{base.__name__}", (cls, base), {})
        experts.fp8_config = Fp8Config(recipe=config) if isinstance(config, str) else config
        experts.fp8_name = name
        return experts  # type: ignore[return-value]

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        E = self.w1.shape[0]
        if tokens_per_expert.numel() != E:
            raise ValueError(f"{self.fp8_name}: tokens_per_expert has {tokens_per_expert.numel()} entries, "
                             f"expected {E} experts")
        cfg = self.fp8_config
        backend = resolve_backend(cfg, x.device)
        if cfg.recipe == "blockwise" and self.grouped_kernels and self._per_expert_cublas_ok(x, backend,
                                                                                             tokens_per_expert):
            y = self._forward_per_expert_cublas(x, tokens_per_expert)
        elif cfg.recipe == "blockwise" and self.grouped_kernels and backend in ("triton", "scaled_mm"):
            y = self._forward_grouped(x, tokens_per_expert)
        elif self._scaled_grouped_ok(x, backend):
            y = self._forward_scaled_grouped(x, tokens_per_expert)
        else:
            y = self._forward_looped(x, tokens_per_expert)
        if cfg.debug:
            _check_finite(self.fp8_name, "Fp8GroupedExperts", y, cfg.recipe)
        return y

    def _swiglu_experts(self, x: torch.Tensor, linear, pair=None) -> torch.Tensor:
        """``w2(act(w1 x, w3 x))`` per expert with ``linear(x, w [E, N, K]) -> [M, N]`` a grouped FP8 GEMM; W1 and
        W3 run as one GEMM ([E, 2I, D]: one quantisation of x): ``pair(x, w1, w3)`` where given and I is a multiple
        of 128 (the weights quantised into their halves directly), else ``linear`` on their concatenation."""
        inter = self.w1.shape[1]
        if pair is not None and inter % 128 == 0:
            h = pair(x.contiguous(), self.w1, self.w3)
        else:
            h = linear(x.contiguous(), torch.cat([self.w1, self.w3], dim=1))
        packed = getattr(self, "act_packed_fn", None)   # a fused kernel on [M, 2I]: the packed gradient, no slices
        h = packed(h) if packed is not None else self.act_fn(h[:, :inter], h[:, inter:])
        return linear(h.contiguous(), self.w2)

    def _forward_grouped(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """Blockwise recipe on the Triton grouped kernels: no host sync (the row tiling is built on the device;
        ``tokens_per_expert`` must sum to x.shape[0], which is not checked)."""
        q, _ = _kernels()
        out_dtype = _out_dtype(x)
        tiles = q.grouped_tiles(tokens_per_expert, x.shape[0])
        return self._swiglu_experts(x, lambda a, w: _GroupedBlockwiseFn.apply(a, w, None, tiles, out_dtype),
                                    lambda a, w1, w3: _GroupedBlockwiseFn.apply(a, w1, w3, tiles, out_dtype))

    def _per_expert_cublas_ok(self, x: torch.Tensor, backend: str, tokens_per_expert=None) -> bool:
        """The per-expert cuBLAS path applies: ``expert_gemm`` "per_expert", or "auto" with the counts attached on
        the host (``moetrain.model.dispatch.host_counts`` of ``tokens_per_expert``) and enough rows per expert; the
        scaled_mm backend, rows present, and cuBLAS usable at D and I."""
        mode = self.fp8_config.expert_gemm
        if mode == "grouped" or x.shape[0] == 0:
            return False
        if mode == "auto":
            from moetrain.model.dispatch import host_counts
            if (tokens_per_expert is None or host_counts(tokens_per_expert) is None
                    or x.shape[0] < AUTO_MIN_ROWS_PER_EXPERT * self.w1.shape[0]):
                return False
        return self._per_expert_possible(x.device, backend)

    def _per_expert_possible(self, device: torch.device, backend: str) -> bool:
        """cuBLAS's block-scaled GEMMs usable on ``device`` at D and I with the scaled_mm backend (blockwise)."""
        if self.fp8_config.recipe != "blockwise" or backend != "scaled_mm":
            return False
        from moetrain.precision import fp8_experts_cublas
        return fp8_experts_cublas.usable(device, self.w1.shape[1:])

    def _forward_per_expert_cublas(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """Blockwise recipe, one cuBLAS block-scaled GEMM per expert (``fp8_experts_cublas``): the counts on the
        host (attached by the dispatcher, else read here: one sync), the plan shared by both GEMMs; raises
        ValueError when they do not sum to x's rows."""
        from moetrain.precision import fp8_experts_cublas as pe
        out_dtype = _out_dtype(x)
        plan = pe.expert_plan(tokens_per_expert, x.shape[0])
        return self._swiglu_experts(x, lambda a, w: pe.PerExpertBlockwiseFn.apply(a, w, None, plan, out_dtype),
                                    lambda a, w1, w3: pe.PerExpertBlockwiseFn.apply(a, w1, w3, plan, out_dtype))

    def _scaled_grouped_ok(self, x: torch.Tensor, backend: str) -> bool:
        """tensorwise/rowwise on the scaled_mm backend and ``fp8_grouped.scaled_grouped_mm_supported``."""
        if self.fp8_config.recipe == "blockwise" or not self.grouped_kernels or backend != "scaled_mm":
            return False
        from moetrain.precision import fp8_grouped  # lazy: fp8_grouped imports this module
        E, inter, dim = self.w1.shape
        return fp8_grouped.scaled_grouped_mm_supported(x, E, dim, inter)

    def _forward_scaled_grouped(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """tensorwise / rowwise on ``torch._scaled_grouped_mm`` (``fp8_grouped.scaled_grouped_linear``): no host
        sync; the padding plan is built once and shared by both GEMMs."""
        from moetrain.precision import fp8_grouped
        cfg = self.fp8_config
        plan = fp8_grouped.group_plan(tokens_per_expert, x.shape[0])
        kw = dict(recipe=cfg.recipe, fast_accum=cfg.use_fast_accum, out_dtype=_out_dtype(x),
                  wgrad=self.scaled_grouped_wgrad)
        return self._swiglu_experts(x, lambda a, w: fp8_grouped.scaled_grouped_linear(a, w, plan, **kw))

    def _forward_looped(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """One fp8_linear per expert and weight (any recipe / backend); reads the counts on the host."""
        counts = [int(c) for c in tokens_per_expert.tolist()]
        if sum(counts) != x.shape[0]:
            raise ValueError(f"{self.fp8_name}: tokens_per_expert sums to {sum(counts)} but x has {x.shape[0]} rows")
        cfg = self.fp8_config
        inter = self.w1.shape[1]
        w13 = torch.cat([self.w1, self.w3], dim=1)  # [E, 2I, D]: one GEMM (one quantisation of x_e) for W1, W3
        outs = []
        for e, xe in enumerate(torch.split(x, counts, dim=0)):
            if counts[e] == 0:
                continue
            h = fp8_linear(xe, w13[e], None, cfg)
            outs.append(fp8_linear(self.act_fn(h[:, :inter], h[:, inter:]), self.w2[e], None, cfg))
        if not outs:
            return x.new_zeros(x.shape[0], self.w2.shape[1], dtype=_out_dtype(x))
        return torch.cat(outs, dim=0) if len(outs) > 1 else outs[0]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp8={self.fp8_config.recipe}"


# ----------------------------------------------------------------------------------------------------------
# apply_fp8
# ----------------------------------------------------------------------------------------------------------
DEFAULT_SKIP = ("output", "embed", "gate", "norm")


def _skipped(name: str, skip: Iterable[str]) -> bool:
    """A skip entry matches when it is a substring of any dotted component of the qualified name, or an
    fnmatch pattern (with * ? [) matching the whole name. ("norm" skips "layers.0.attn.kv_norm".)"""
    parts = name.split(".")
    for pat in skip:
        if any(c in pat for c in "*?[") and fnmatch.fnmatchcase(name, pat):
            return True
        if any(pat in p for p in parts):
            return True
    return False


def apply_fp8(model: nn.Module, recipe: str | Fp8Config, skip: Iterable[str] = DEFAULT_SKIP, *,
              experts: bool = True, grad_dtype: str = "e5m2", debug: bool | None = None,
              backend: str = "auto", expert_gemm: str = "auto") -> list[str]:
    """Swap every eligible ``nn.Linear`` for ``Fp8Linear`` (and, with ``experts=True``, every grouped-experts
    module for ``Fp8GroupedExperts``) in place; return the qualified names swapped, in module order.

    recipe: "tensorwise" | "rowwise" | "blockwise" | "none" (no-op, returns []) or an ``Fp8Config``.
    skip: name patterns never swapped (see ``_skipped``); the defaults keep the head ``output``, the
      embedding, the MoE gate and all norms in high precision. Modules inside a skipped module are skipped too.
    Linears that are not eligible are left alone: tensorwise/rowwise need in/out features that are multiples
      of 16 (torch._scaled_mm); blockwise takes any shape.
    debug (None: from the env var MOETRAIN_FP8_DEBUG=1): check outputs for inf/nan, raise naming the module.
    expert_gemm: ``Fp8Config.expert_gemm`` (``precision.fp8_expert_gemm``); where the per-expert cuBLAS path can
      run ("per_expert" or "auto", blockwise, cuBLAS usable on the experts' device) it also sets
      ``prefetch_host_counts`` on the MoE layers' dispatchers that have it.
    """
    if isinstance(recipe, Fp8Config):
        cfg = recipe
    else:
        if recipe in (None, "none", ""):
            return []
        if debug is None:
            debug = os.environ.get("MOETRAIN_FP8_DEBUG", "0") == "1"
        cfg = Fp8Config(recipe=recipe, grad_dtype=grad_dtype, debug=bool(debug), backend=backend,
                        expert_gemm=expert_gemm)
    skip = tuple(skip)
    swapped: list[str] = []

    def visit(parent: nn.Module, prefix: str):
        for child_name, child in list(parent.named_children()):
            qname = f"{prefix}.{child_name}" if prefix else child_name
            if _skipped(qname, skip):
                continue
            if type(child) is nn.Linear:
                if cfg.recipe != "blockwise" and (child.in_features % 16 or child.out_features % 16):
                    continue
                Fp8Linear.convert(child, replace(cfg), qname)
                swapped.append(qname)
            elif experts and isinstance(child, GroupedExperts) and not isinstance(child, Fp8GroupedExperts):
                Fp8GroupedExperts.convert(child, replace(cfg), qname)
                swapped.append(qname)
            else:
                visit(child, qname)

    visit(model, "")
    if experts and cfg.expert_gemm != "grouped":
        # one GEMM per expert needs the counts on the host: have the dispatchers that can fetch them early
        # (moetrain.model.dispatch.LocalDispatcher) do so, overlapping the shared experts
        for m in model.modules():
            ex, dispatcher = getattr(m, "experts", None), getattr(m, "dispatcher", None)
            if (isinstance(ex, Fp8GroupedExperts) and hasattr(dispatcher, "prefetch_host_counts")
                    and ex._per_expert_possible(ex.w1.device, resolve_backend(ex.fp8_config, ex.w1.device))):
                dispatcher.prefetch_host_counts = True
    return swapped
