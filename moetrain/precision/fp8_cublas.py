"""DeepSeek-V3 block-scaled FP8 GEMMs on cuBLAS, through ``torch._scaled_mm`` (dense linears, Hopper).

cuBLAS 12.9 added FP8 GEMMs whose operands carry 1x128 or 128x128 block scales, applied in FP32 at every
128-wide K step (the promotion of DeepSeek-V3 §3.3), on sm90 only; torch exposes them through ``_scaled_mm``
(pytorch PRs #158037 and #166752; ``torch.nn.functional.scaled_mm`` with explicit recipes where present). This
module converts the scales of :mod:`kernels.fp8_quant` (row-major) into the layouts cuBLAS reads and checks,
once per device, that the result equals the dequantised reference before anything uses it.

Layouts, for ``C[M, N] = A[M, K] @ B[K, N]`` with B column-major (the ``.t()`` of a row-major ``[N, K]``),
``Kb = K / 128``, ``L4 = Kb`` rounded up to a multiple of 4 (cuBLAS reads 4 K-blocks at a time):

    1x128 x 128x128   scale_a [M, Kb] stride (1, M)      scale_b [L4, N / 128] stride (1, L4)
    1x128 x 1x128     scale_a [M, Kb] stride (1, M)      scale_b [N, Kb] stride (1, N)

The three GEMMs of a blockwise linear ``y = x W^T`` (x [M, K], W [N, K]):

    forward  y  [M, N] = x(1x128 along K) @ W^T(128x128)                  :func:`fp8_gemm_blockwise`
    dgrad    dx [M, K] = g(1x128 along N) @ W(128x128, the forward's blocks)  :func:`fp8_gemm_dgrad`
    wgrad    dW [N, K] = g^T(1x128 along M) @ x(1x128 along M)              :func:`fp8_gemm_1x128_1x128`

(The blockwise recipe runs its dgrad as :func:`fp8_gemm_blockwise` on W^T's bytes, which the weight's quantisation
writes too, with the scales transposed; :func:`fp8_gemm_dgrad` makes that copy of W itself.)

Each has the signature of its Triton twin in :mod:`kernels.fp8_gemm` and falls back to it for a shape the check did
not cover (M, N, K multiples of 128; multiples of 16 where the check at partial blocks passed too) or when the check
failed (:func:`status` says why).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["status", "available", "check_forms", "fp8_gemm_blockwise", "fp8_gemm_dgrad", "fp8_gemm_1x128_1x128",
           "scale_a_layout", "scale_b_block_layout"]

TILE = 128
_STATUS: dict = {}   # device str -> (form or None, takes dims that are multiples of 16 only, detail)


def scale_a_layout(s: torch.Tensor) -> torch.Tensor:
    """``s [R, Kb]`` (1x128 scales, any strides) -> the same values with stride (1, R) (R-major): cuBLAS's layout
    for A's scales and for B's 1x128 scales ``[N, Kb]``. No copy when ``s`` already has it (the quantisers'
    ``col_major_scales=True``, which the blockwise recipe uses on this backend)."""
    return s.t().contiguous().t()


def scale_b_block_layout(s: torch.Tensor, pad: bool = True) -> torch.Tensor:
    """128x128 scales ``s [N / 128, Kb]`` (output blocks x K blocks, row-major as ``quant_128x128`` writes them)
    -> ``[L4, N / 128]`` with stride (1, L4): K blocks zero-padded to a multiple of 4 (cuBLAS's layout; with
    ``pad=False`` ``[Kb, N / 128]`` stride (1, Kb), the form some torch builds check for instead). Batched
    ``[E, N / 128, Kb]`` -> ``[E, L4, N / 128]`` in one launch (entry e is expert e's layout)."""
    kb = s.shape[-1]
    l4 = -(-kb // 4) * 4 if pad else kb
    return F.pad(s, (0, l4 - kb)).contiguous().transpose(-1, -2)  # one launch (the pad writes zeros and copy)


def _v1(a, b, sa, sb, out_dtype, _recipe_b, out=None):
    if out is None:
        return torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=out_dtype)
    return torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=out_dtype, out=out)


def _v2(a, b, sa, sb, out_dtype, recipe_b, out=None):
    st = F.ScalingType
    rb = st.BlockWise128x128 if recipe_b == "128x128" else st.BlockWise1x128
    if out is not None and _V2_OUT.get("ok", True):
        # F.scaled_mm has no out=; the operator under it has (torch._scaled_mm_v2.out, same arguments as F.scaled_mm
        # passes them). A build without it copies instead (remembered).
        try:
            return torch._scaled_mm_v2(a, b, [sa], [st.BlockWise1x128.value], [], [sb], [rb.value], [], None,
                                       out_dtype, [], False, out=out)
        except (AttributeError, TypeError, RuntimeError) as e:
            _V2_OUT.update(ok=False, why=_why(e))
    y = F.scaled_mm(a, b, sa, st.BlockWise1x128, sb, rb, output_dtype=out_dtype)
    return y if out is None else out.copy_(y)


_V2_OUT: dict = {}   # {"ok": False, "why": ...} once torch._scaled_mm_v2's out= overload failed here


# call forms tried in this order by the one-time check: (name, function, scale_b padded to 4 K-blocks); each
# function(a, b, scale_a, scale_b, out_dtype, recipe_b, out=None) writes into ``out`` (contiguous) when given
_FORMS = (("torch._scaled_mm", _v1, True), ("torch._scaled_mm", _v1, False),
          ("torch.nn.functional.scaled_mm", _v2, True), ("torch.nn.functional.scaled_mm", _v2, False))


# ``form`` = (name, function, pad) from _FORMS; a [M, K] row-major fp8, B passed as the column-major [K, N]
def _fwd(a, a_s, b, b_s, out_dtype, form, out=None):
    _, fn, pad = form
    return fn(a, b.t(), scale_a_layout(a_s), scale_b_block_layout(b_s, pad), out_dtype, "128x128", out=out)


def _dgrad(g, g_s, w, w_s, out_dtype, form, out=None):
    # the forward GEMM on W^T [K, N] (a copy here; the recipe has the quantiser write it), whose blocks are w_s^T
    return _fwd(g, g_s, w.t().contiguous(), w_s.t(), out_dtype, form, out=out)


def _wgrad(a, a_s, b, b_s, out_dtype, form, out=None):
    _, fn, _ = form
    return fn(a, b.t(), scale_a_layout(a_s), scale_a_layout(b_s), out_dtype, "1x128", out=out)


def _probe(device: torch.device):
    """(form, ragged, detail): :func:`check_forms` on ``device`` with :data:`_FORMS`, or (None, False, why)."""
    if device.type != "cuda":
        return None, False, "needs a CUDA device"
    cap = torch.cuda.get_device_capability(device)
    if cap != (9, 0):
        return None, False, f"cuBLAS block-scaled FP8 GEMMs run on sm90 only (this GPU is sm{cap[0]}{cap[1]})"
    return check_forms(_FORMS, device)


def _cases(device: torch.device, M: int, N: int, K: int):
    """Forward (bf16 out), dgrad (bf16) and wgrad (fp32) of a blockwise linear at (M, N, K), with references."""
    from kernels import fp8_gemm as tg
    from kernels import fp8_quant as q
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(M, K, device=device, generator=gen).to(torch.bfloat16)
    w = (torch.randn(N, K, device=device, generator=gen) * 0.05).to(torch.bfloat16)
    g = torch.randn(M, N, device=device, generator=gen).to(torch.bfloat16)
    xq, xs, xtq, xts = q.quant_1x128_with_transpose(x)
    wq, ws = q.quant_128x128(w)
    gq, gs, gtq, gts = q.quant_1x128_with_transpose(g)
    f32, bf16 = torch.float32, torch.bfloat16
    return (("forward", _fwd, (xq, xs, wq, ws), bf16, tg.fp8_gemm_blockwise_ref(xq, xs, wq, ws, f32)),
            ("dgrad", _dgrad, (gq, gs, wq, ws), bf16, tg.fp8_gemm_dgrad_ref(gq, gs, wq, ws, f32)),
            ("wgrad", _wgrad, (gtq, gts, xtq, xts), f32, tg.fp8_gemm_1x128_1x128_ref(gtq, gts, xtq, xts)))


def _run_cases(form, cases) -> None:
    """Raises unless every case of ``form`` equals its reference (max error relative to the largest entry), both
    as a new tensor and written into a given one (``out=``, filled with NaN first)."""
    for case, gemm, args, out_dtype, ref in cases:
        into = torch.full(tuple(ref.shape), float("nan"), dtype=out_dtype, device=ref.device)
        for how, out in (("", gemm(*args, out_dtype, form)), (" (out=)", gemm(*args, out_dtype, form, out=into))):
            if how and out.data_ptr() != into.data_ptr():
                raise ValueError(f"{case}{how} did not write into the given tensor")
            out = out.float()
            err = ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
            tol = 1e-2 if out_dtype == torch.bfloat16 else 1e-3
            if not err <= tol:
                raise ValueError(f"{case}{how} differs from the dequantised reference (max relative error {err:.1e})")


def _why(e: Exception) -> str:
    msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}"


def check_forms(forms, device: torch.device):
    """The first call form whose forward (bf16 out), dgrad (bf16) and wgrad (fp32) equal the dequantised
    reference on a small problem (M=256, N=384, K=640: 5 K-blocks, so the padding to 4 is exercised), and whether
    it also does at dims that are multiples of 16 but not of 128 (M=208, N=336, K=592: partial blocks):
    ``(form, ragged, detail)``, or ``(None, False, why each failed)``. ``forms``: ``(name, fn, pad)`` tuples,
    ``fn(a [M, K], b [K, N] column-major, scale_a, scale_b, out_dtype, recipe_b)``."""
    cases = _cases(device, 256, 384, 640)
    why = []
    for form in forms:
        name, fn, pad = form
        label = f"{name} (scale_b {'padded' if pad else 'unpadded'})"
        if fn is _v2 and not (hasattr(F, "scaled_mm") and hasattr(F, "ScalingType")):
            why.append(f"{label}: absent")
            continue
        try:
            _run_cases(form, cases)
        except Exception as e:  # noqa: BLE001 - any failure means: do not use this form
            why.append(f"{label}: {_why(e)}")
            continue
        try:
            _run_cases(form, _cases(device, 208, 336, 592))
            ragged, note = True, "also at dims that are multiples of 16 only"
        except Exception as e:  # noqa: BLE001
            ragged, note = False, f"dims multiples of 128 only (partial blocks: {_why(e)})"
        return form, ragged, f"{label}; forward, dgrad and wgrad equal the dequantised reference, {note}"
    return None, False, "; ".join(why)


def status(device: torch.device) -> tuple[bool, str]:
    """``(usable, detail)`` for ``device``: whether the cuBLAS block-scaled GEMMs passed the one-time check
    (run on first use, cached per device), with the call form used or why not."""
    form, _, detail = _checked(device)
    return form is not None, detail


def _checked(device) -> tuple:
    """The one-time check's result for ``device`` (run on first use): ``(form or None, ragged, detail)``."""
    key = str(torch.device(device))
    if key not in _STATUS:
        _STATUS[key] = _probe(torch.device(device))
    return _STATUS[key]


def available(device: torch.device) -> bool:
    """True when :func:`status` says the cuBLAS path is usable on ``device``."""
    return status(device)[0]


def form_for(device, dims) -> tuple | None:
    """The call form that passed the one-time check on ``device`` when every one of ``dims`` fits it (a positive
    multiple of 128, or of 16 where the check at partial blocks passed), else None."""
    form, ragged, _ = _checked(device)
    if form is None or not all(d > 0 and d % (16 if ragged else TILE) == 0 for d in dims):
        return None
    return form


def _cublas_or_triton(cublas, triton_name: str, dims: tuple, *args):
    """``cublas(*args, form)`` when :func:`form_for` ``args[0]``'s device and ``dims`` gives a form, else
    ``kernels.fp8_gemm.<triton_name>(*args)``."""
    form = form_for(args[0].device, dims)
    if form is None:
        from kernels import fp8_gemm
        return getattr(fp8_gemm, triton_name)(*args)
    return cublas(*args, form)


def fp8_gemm_blockwise(a_fp8: torch.Tensor, a_scales: torch.Tensor, b_fp8: torch.Tensor, b_scales: torch.Tensor,
                       out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``C[M, N] = A @ B^T``, A ``[M, K]`` e4m3 with 1x128 scales ``[M, K/128]``, B ``[N, K]`` e4m3 with 128x128
    scales ``[N/128, K/128]`` (fp32, as ``kernels.fp8_quant`` writes them); ``out_dtype`` result. cuBLAS when
    usable and M, N, K fit it (module docstring), else ``kernels.fp8_gemm.fp8_gemm_blockwise``."""
    return _cublas_or_triton(_fwd, "fp8_gemm_blockwise", (a_fp8.shape[0], b_fp8.shape[0], a_fp8.shape[1]),
                             a_fp8, a_scales, b_fp8, b_scales, out_dtype)


def fp8_gemm_dgrad(g_fp8: torch.Tensor, g_scales: torch.Tensor, w_fp8: torch.Tensor, w_scales: torch.Tensor,
                   out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``dX[M, K] = G[M, N] @ W[N, K]``: G 1x128 along N (``[M, N/128]``), W with the forward's 128x128 scales
    ``[N/128, K/128]``. cuBLAS or ``kernels.fp8_gemm.fp8_gemm_dgrad`` (as :func:`fp8_gemm_blockwise`)."""
    return _cublas_or_triton(_dgrad, "fp8_gemm_dgrad", (g_fp8.shape[0], w_fp8.shape[1], g_fp8.shape[1]),
                             g_fp8, g_scales, w_fp8, w_scales, out_dtype)


def fp8_gemm_1x128_1x128(a_fp8: torch.Tensor, a_scales: torch.Tensor, b_fp8: torch.Tensor, b_scales: torch.Tensor,
                         out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``C[M, N] = A @ B^T`` with both operands 1x128 along K (``[M, K/128]``, ``[N, K/128]``): the weight
    gradient ``dW = G^T X`` with tokens as K. cuBLAS or ``kernels.fp8_gemm.fp8_gemm_1x128_1x128``."""
    return _cublas_or_triton(_wgrad, "fp8_gemm_1x128_1x128", (a_fp8.shape[0], b_fp8.shape[0], a_fp8.shape[1]),
                             a_fp8, a_scales, b_fp8, b_scales, out_dtype)
