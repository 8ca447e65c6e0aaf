"""Grouped FP8 GEMMs for routed experts, tensorwise / rowwise recipes, on ``torch._scaled_grouped_mm``.

``Fp8GroupedExperts`` (``moetrain.precision.fp8``) runs its three expert GEMMs here on CUDA sm90 instead of one
``torch._scaled_mm`` per expert after a host sync: one grouped launch per GEMM, no ``.tolist()``.

The operator (torch 2.11 and 2.13 ``aten::_scaled_grouped_mm(mat_a, mat_b, scale_a, scale_b, offs=None,
bias=None, scale_result=None, out_dtype=None, use_fast_accum=False)``) as checked by torch (meta function
``torch/_meta_registrations.py::_meta_grouped_mm_common``, CUDA ``aten/src/ATen/native/cuda/GroupedBlas.cpp
::_scaled_grouped_mm_cuda``, kernel ``ScaledGroupMM.cu`` / ``GroupMMCommon.cuh``):
  * mat_a and mat_b both ``float8_e4m3fn`` (E5M2 is rejected); mat_a row-major, mat_b column-major, strides
    and data pointers 16-byte aligned; ``mat_a.size(-1)``, ``mat_b.size(-2)``, ``mat_b.size(-1)`` multiples of 16;
  * scales float32 ("rowwise"; there is no tensorwise mode: a tensor scale is broadcast into the vectors):
    2D x 3D (``a [M, K]``, ``b [G, K, N]``, ``offs [G]``): ``scale_a [M]``, ``scale_b [G, N]``, output ``[M, N]``;
    2D x 2D (``a [M, Ktot]``, ``b [Ktot, N]``, groups along Ktot): ``scale_a [G*M]``, ``scale_b [G*N]``,
    output ``[G, M, N]``;
  * ``offs`` int32 cumulative group ends; bias / scale_result unsupported; out_dtype bfloat16 only;
    fewer than 1024 groups; device compute capability major 9 or 10 is accepted by the check, but the rowwise
    kernel is a CUTLASS ``Sm90`` (wgmma) kernel, so only sm90 (H100 / H200) is selected here;
  * groups on a dynamic dim: CUTLASS cannot take an empty group along K (2D x 2D), and TMA needs 16-byte
    aligned group starts along a dynamic K; torch versions differ in what they assert for 2D x 3D row groups.
    So every group here is padded on the device to a multiple of 16 rows and to at least 16 rows (an expert
    with no tokens gets 16 zero rows) -- safe for all of these checks (torchtitan / torchao align token groups
    to 16 for the same FP8 operator; DeepSeek-V3 §3.3 for the FP8 recipe itself).

Padding without a host sync: ``group_plan`` computes, on the device, each row's expert (``eid``) and its row
(``dest``) in a buffer of a static size ``rows = round_up(M, 16) + 16 * E`` (an upper bound on the padded total),
plus the padded group ends ``offs``. Operands are scattered into a zeroed buffer with ``dest`` (FP8 through a
uint8 view), the GEMM output is gathered back with the same ``dest``. Buffer rows past ``offs[-1]`` belong to no
group: the kernel never writes them and nothing reads them. ``tokens_per_expert`` must sum to M (not checked,
it would need a sync; group ends are clamped to the buffer so a bad count cannot make the kernel read out of
bounds).

Quantisation (scales are dequantisation multipliers ``amax / 448`` in float32, ``fp8._scale`` conventions):
  rowwise:    x per row over K, W per output row over K (forward); grad_out per row over N, W per input column
              over N (dgrad) -- the same scales as the per-expert ``_scaled_mm`` rowwise path.
  tensorwise: one scale per expert's rows of x / grad_out (amax over the group, a device scatter-max) and one
              per expert weight, broadcast into the row / column vectors -- the same scales as the per-expert
              path, which quantises each expert's tensors separately.
  grad_out is always E4M3 here (``_scaled_grouped_mm`` rejects E5M2), whatever ``Fp8Config.grad_dtype`` says.
  On CUDA the quantisation runs ``kernels.fp8_rowwise`` (``fp8._rowwise_kernels``): row-scaled operands are
  written straight into the padded buffer (padding rows zeroed by the same launch, no index_copy), wgrad operands
  straight into the padded transpose; bit-identical to the eager functions here, which remain the CPU path.

wgrad (``dW_e = G_e^T X_e``, reduction over the expert's tokens):
  ``"bf16"`` (default): ``torch._grouped_mm`` 2D x 2D (``G_pad^T [N, rows]`` x ``X_pad [rows, K]``, offs over
              the token dim) in BF16, unquantised operands.
  ``"fp8"``:  ``torch._scaled_grouped_mm`` 2D x 2D with ``G^T`` and ``X`` quantised per (expert, channel) over
              the expert's tokens (rowwise; tensorwise: per expert), the rowwise recipe's wgrad scaling.
Weight gradients come out of the GEMM in bf16 and are cast to the weight's dtype; outputs to ``out_dtype``.

``scaled_grouped_mm_ref`` is a pure-torch reference of the operator (dequantise, matmul per group in fp32) that
runs torch's own meta checks on the arguments and the kernel-side checks listed above; tests monkeypatch
``_grouped_op`` (the one indirection every call here goes through) with it.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from moetrain.precision.fp8 import E4M3, _cast, _rowwise_kernels, _scale

__all__ = [
    "ALIGN", "GroupPlan", "group_plan", "pad_rows", "unpad_rows", "scaled_grouped_linear",
    "scaled_grouped_mm_supported", "scaled_grouped_mm_ref", "WGRAD_MODES",
]

ALIGN = 16            # rows per group are padded to a multiple of this (and to at least this many)
MAX_GROUPS = 1023     # ScaledGroupMM.cu: "Can't process more than 1024 groups" (group_count < 1024)
WGRAD_MODES = ("bf16", "fp8")
_FP8_MAX = float(torch.finfo(E4M3).max)

# The operators every GEMM here goes through (module-level so tests can swap in the references).
_grouped_op = getattr(torch, "_scaled_grouped_mm", None)
_bf16_grouped_op = getattr(torch, "_grouped_mm", None)


# ----------------------------------------------------------------------------------------------------------
# support check
# ----------------------------------------------------------------------------------------------------------
def _arch_ok(capability: tuple[int, int]) -> bool:
    """The FP8 rowwise grouped kernel is built for Sm90 only (torch accepts major 9 and 10 in its device check,
    but the CUTLASS kernel behind it is an sm90 wgmma kernel)."""
    return capability[0] == 9


def _shape_ok(x: torch.Tensor, n_groups: int, dims) -> bool:
    return (x.dim() == 2 and x.shape[0] > 0 and 0 < n_groups <= MAX_GROUPS
            and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and all(d > 0 and d % 16 == 0 for d in dims))


def scaled_grouped_mm_supported(x: torch.Tensor, n_groups: int, *dims: int) -> bool:
    """Whether the grouped FP8 path runs for ``x [M, K]`` over ``n_groups`` experts with GEMM dims ``dims``:
    ``torch._scaled_grouped_mm`` and ``torch._grouped_mm`` exist, x is on a CUDA device of compute capability
    9.x, x is bf16/fp16/fp32 with M > 0, 1 <= n_groups <= 1023 and every dim a positive multiple of 16."""
    if _grouped_op is None or _bf16_grouped_op is None or x.device.type != "cuda":
        return False
    return _shape_ok(x, n_groups, dims) and _arch_ok(torch.cuda.get_device_capability(x.device))


# ----------------------------------------------------------------------------------------------------------
# padding plan (device only)
# ----------------------------------------------------------------------------------------------------------
class GroupPlan(NamedTuple):
    """Where each row of a [M, C] operand sorted by expert goes in the padded buffer.

    dest [M] int64: buffer row of each row. eid [M] int64: expert of each row. offs [E] int32: padded group
    ends (cumulative; group e is buffer rows [offs[e-1], offs[e]), a multiple of 16 and >= 16 rows long).
    rows: buffer rows (host int, static: round_up(M, 16) + 16 E). n_groups: E. src [rows] int32: the inverse of
    dest (src[dest[i]] = i, -1 for padding rows), what the fused quantisation kernels read (``kernels.fp8_rowwise``)."""

    dest: torch.Tensor
    eid: torch.Tensor
    offs: torch.Tensor
    rows: int
    n_groups: int
    src: torch.Tensor


def group_plan(tokens_per_expert: torch.Tensor, n_rows: int) -> GroupPlan:
    """The padding plan for ``n_rows`` rows sorted by expert, ``tokens_per_expert [E]`` (int, on x's device,
    summing to n_rows; not checked). No host sync."""
    counts = tokens_per_expert.to(torch.int64)
    E = counts.numel()
    dev = counts.device
    rows = -(-n_rows // ALIGN) * ALIGN + ALIGN * E
    padded = ((counts + ALIGN - 1) // ALIGN * ALIGN).clamp_min(ALIGN)
    pad_end = torch.cumsum(padded, 0)
    pad_start = pad_end - padded
    end = torch.cumsum(counts, 0)
    start = end - counts
    r = torch.arange(n_rows, device=dev)
    eid = torch.searchsorted(end, r, right=True).clamp_max(E - 1)
    dest = (pad_start[eid] + r - start[eid]).clamp(0, rows - 1)
    offs = pad_end.clamp_max(rows).to(torch.int32)
    src = torch.full((rows,), -1, dtype=torch.int32, device=dev)
    src.index_copy_(0, dest, torch.arange(n_rows, dtype=torch.int32, device=dev))
    return GroupPlan(dest, eid, offs, rows, E, src)


def pad_rows(t: torch.Tensor, plan: GroupPlan, fill: float = 0.0) -> torch.Tensor:
    """t [M, ...] -> [plan.rows, ...] contiguous: row i at plan.dest[i], every other row ``fill`` (fp8 tensors
    go through a uint8 view, so ``fill`` must be 0 for them)."""
    if t.element_size() == 1 and t.dtype.is_floating_point:
        if fill != 0:
            raise ValueError("pad_rows: fp8 tensors are padded with zeros only")
        buf = torch.zeros((plan.rows, *t.shape[1:]), dtype=torch.uint8, device=t.device)
        return buf.index_copy_(0, plan.dest, t.contiguous().view(torch.uint8)).view(t.dtype)
    buf = torch.full((plan.rows, *t.shape[1:]), fill, dtype=t.dtype, device=t.device)
    return buf.index_copy_(0, plan.dest, t.contiguous())


def unpad_rows(t: torch.Tensor, plan: GroupPlan) -> torch.Tensor:
    """The inverse of ``pad_rows``: [plan.rows, ...] -> [M, ...] (rows plan.dest)."""
    return t.index_select(0, plan.dest)


# ----------------------------------------------------------------------------------------------------------
# quantisation
# ----------------------------------------------------------------------------------------------------------
def _group_amax(v: torch.Tensor, eid: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Per-expert amax of non-negative v [M] or [M, C] -> [E] or [E, C] (0 for experts without rows)."""
    idx = eid if v.dim() == 1 else eid[:, None].expand_as(v)
    out = torch.zeros((n_groups, *v.shape[1:]), dtype=torch.float32, device=v.device)
    return out.scatter_reduce_(0, idx, v.float(), reduce="amax", include_self=True)


def _quant_rows(t: torch.Tensor, plan: GroupPlan, recipe: str):
    """t [M, C] sorted by expert -> (E4M3 [M, C], row scales [M] fp32): rowwise one scale per row (amax over
    C); tensorwise one per expert (amax over the expert's rows), repeated on its rows."""
    amax = t.detach().abs().amax(dim=1).float()
    if recipe == "tensorwise":
        s = _scale(_group_amax(amax, plan.eid, plan.n_groups), _FP8_MAX)[plan.eid]
    else:
        s = _scale(amax, _FP8_MAX)
    return _cast(t, s[:, None], E4M3), s


def _quant_rows_padded(t: torch.Tensor, plan: GroupPlan, recipe: str):
    """``_quant_rows`` then ``pad_rows`` of values (zeros) and scales (ones): t [M, C] -> (E4M3 [plan.rows, C],
    scales [plan.rows]). Fused kernels (rows written at plan.dest, padding rows zeroed by the same launch) where
    ``fp8._rowwise_kernels`` applies, else eager."""
    k = _rowwise_kernels(t)
    if k is not None and t.dim() == 2:
        if recipe == "tensorwise":
            q, s, _ = k.quant_rows_grouped_tensorwise(t, plan.eid, plan.src, plan.n_groups, E4M3)
            return q, s
        return k.quant_rows(t, E4M3, src=plan.src)
    q, s = _quant_rows(t, plan, recipe)
    return pad_rows(q, plan), pad_rows(s, plan, fill=1.0)


def _quant_weight(w: torch.Tensor, recipe: str):
    """w [E, R, C] (any strides) -> (E4M3 [E, R, C] contiguous, scales [E, R] fp32): rowwise one scale per row
    of each expert (amax over C); tensorwise one per expert, repeated over R."""
    k = _rowwise_kernels(w)
    if k is not None and w.dim() == 3:
        E, R, C = w.shape
        if recipe == "tensorwise":
            q, s = k.quant_tensor(w, E4M3)
            return q, s[:, None].expand(-1, R).contiguous()
        if w.stride(1) == 1 and w.stride(2) != 1 and C > 1:   # a transposed view (dgrad W^T): per column of w
            return k.quant_cols(w.transpose(1, 2), E4M3)
        q, s = k.quant_rows(w.reshape(E * R, C), E4M3)
        return q.view(E, R, C), s.view(E, R)
    if recipe == "tensorwise":
        s = _scale(w.detach().abs().amax(dim=(1, 2)), _FP8_MAX)[:, None].expand(-1, w.shape[1])
    else:
        s = _scale(w.detach().abs().amax(dim=2), _FP8_MAX)
    return _cast(w, s[:, :, None], E4M3).contiguous(), s.contiguous()


def _quant_cols_per_group(t: torch.Tensor, plan: GroupPlan, recipe: str):
    """t [M, C] -> (E4M3 [M, C], scales [E, C] fp32) with one scale per (expert, column) over the expert's
    rows (rowwise), or one per expert (tensorwise, repeated over C): the wgrad operands' scaling."""
    a = t.detach().abs()
    if recipe == "tensorwise":
        s = _scale(_group_amax(a.amax(dim=1), plan.eid, plan.n_groups), _FP8_MAX)[:, None].expand(-1, t.shape[1])
    else:
        s = _scale(_group_amax(a, plan.eid, plan.n_groups), _FP8_MAX)
    s = s.contiguous()
    return _cast(t, s[plan.eid], E4M3), s


# ----------------------------------------------------------------------------------------------------------
# grouped GEMMs
# ----------------------------------------------------------------------------------------------------------
def _grouped_gemm_padded(a_pad, sa_pad, bq, sb, plan: GroupPlan, fast_accum: bool) -> torch.Tensor:
    """out[rows of e] = (a * sa)[rows of e] @ (bq[e] * sb[e])^T with the row operand in the padded layout of
    ``_quant_rows_padded`` (a_pad [plan.rows, C] E4M3, sa_pad [plan.rows]); bq [E, R, C] E4M3 contiguous,
    sb [E, R] -> [M, R] bf16 (padding rows dropped)."""
    out = _grouped_op(a_pad, bq.transpose(1, 2), sa_pad, sb, offs=plan.offs, out_dtype=torch.bfloat16,
                      use_fast_accum=fast_accum)
    return unpad_rows(out, plan)


def _transpose_fp8(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8).t().contiguous().view(t.dtype)


def _quant_cols_padded_t(t: torch.Tensor, plan: GroupPlan, recipe: str):
    """``_quant_cols_per_group`` then ``pad_rows`` and the fp8 transpose: t [M, C] -> (E4M3 [C, plan.rows]
    row-major, scales [E, C]). Fused (column amax per expert, then one cast writing the padded transpose) where
    ``fp8._rowwise_kernels`` applies, else eager."""
    k = _rowwise_kernels(t)
    if k is not None and t.dim() == 2:
        return k.quant_cols_grouped_t(t, plan.eid, plan.src, plan.n_groups, E4M3, tensorwise=recipe == "tensorwise")
    q, s = _quant_cols_per_group(t, plan, recipe)
    return _transpose_fp8(pad_rows(q, plan)), s


def _wgrad(g: torch.Tensor, x: torch.Tensor, plan: GroupPlan, recipe: str, mode: str) -> torch.Tensor:
    """dW[e] = g[rows of e]^T x[rows of e]: g [M, N], x [M, K] -> [E, N, K] bf16."""
    if mode == "bf16":
        g_pad = pad_rows(g.to(torch.bfloat16), plan)
        x_pad = pad_rows(x.to(torch.bfloat16), plan)
        return _bf16_grouped_op(g_pad.t(), x_pad, offs=plan.offs, out_dtype=torch.bfloat16)
    gt, sg = _quant_cols_padded_t(g, plan, recipe)          # [N, rows] row-major, [E, N]
    xt, sx = _quant_cols_padded_t(x, plan, recipe)          # [K, rows]: .t() is [rows, K] column-major; [E, K]
    return _grouped_op(gt, xt.t(), sg.reshape(-1), sx.reshape(-1), offs=plan.offs, out_dtype=torch.bfloat16,
                       use_fast_accum=False)


class _ScaledGroupedLinearFn(torch.autograd.Function):
    """y[rows of e] = x[rows of e] @ w[e]^T in FP8 on ``_scaled_grouped_mm`` (forward, dgrad), wgrad per mode."""

    @staticmethod
    def forward(ctx, x, w, plan: GroupPlan, recipe: str, fast_accum: bool, wgrad: str, out_dtype: torch.dtype):
        xq, sx = _quant_rows_padded(x, plan, recipe)               # [rows, K] padded, [rows]
        wq, sw = _quant_weight(w, recipe)
        y = _grouped_gemm_padded(xq, sx, wq, sw, plan, fast_accum)
        ctx.save_for_backward(x, w)
        ctx.plan, ctx.recipe, ctx.wgrad = plan, recipe, wgrad
        return y.to(out_dtype)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        plan, recipe = ctx.plan, ctx.recipe
        g = g.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            gq, sg = _quant_rows_padded(g, plan, recipe)              # per row over N (E4M3), padded
            wtq, swt = _quant_weight(w.transpose(1, 2), recipe)      # [E, K, N]: per input column over N
            dx = _grouped_gemm_padded(gq, sg, wtq, swt, plan, False).to(x.dtype)
        if ctx.needs_input_grad[1]:
            dw = _wgrad(g, x, plan, recipe, ctx.wgrad).to(w.dtype)
        return dx, dw, None, None, None, None, None


def scaled_grouped_linear(x: torch.Tensor, w: torch.Tensor, plan: GroupPlan, recipe: str = "rowwise",
                          fast_accum: bool = True, out_dtype: torch.dtype | None = None,
                          wgrad: str = "bf16") -> torch.Tensor:
    """Per-expert ``y_e = x_e w_e^T`` in FP8 through ``torch._scaled_grouped_mm``, no host sync.

    x [M, K] rows sorted by expert (float), w [E, N, K], plan from ``group_plan(tokens_per_expert, M)``;
    K and N multiples of 16 (the operator's requirement; see ``scaled_grouped_mm_supported``).
    recipe "tensorwise" | "rowwise"; fast_accum for the forward GEMM; wgrad "bf16" | "fp8" (module docstring).
    Returns [M, N] in ``out_dtype`` (default x.dtype). Differentiable in x and w (grads in their dtypes).
    Raises ValueError for an unknown recipe / wgrad mode or mismatched shapes."""
    if recipe not in ("tensorwise", "rowwise"):
        raise ValueError(f"scaled_grouped_linear: recipe must be 'tensorwise' or 'rowwise', got {recipe!r}")
    if wgrad not in WGRAD_MODES:
        raise ValueError(f"scaled_grouped_linear: wgrad must be one of {WGRAD_MODES}, got {wgrad!r}")
    if x.dim() != 2 or w.dim() != 3 or x.shape[1] != w.shape[2] or w.shape[0] != plan.n_groups:
        raise ValueError(f"scaled_grouped_linear: x {tuple(x.shape)} / w {tuple(w.shape)} / {plan.n_groups} "
                         "groups do not match (x [M, K], w [E, N, K])")
    if _grouped_op is None:
        raise RuntimeError("scaled_grouped_linear: this torch has no torch._scaled_grouped_mm")
    return _ScaledGroupedLinearFn.apply(x, w, plan, recipe, fast_accum, wgrad, out_dtype or x.dtype)


# ----------------------------------------------------------------------------------------------------------
# pure-torch reference of torch._scaled_grouped_mm (tests, debugging on CPU)
# ----------------------------------------------------------------------------------------------------------
def _meta_like(t: torch.Tensor | None):
    if t is None:
        return None
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


def scaled_grouped_mm_ref(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
                          offs: torch.Tensor | None = None, bias=None, scale_result=None,
                          out_dtype: torch.dtype | None = None, use_fast_accum: bool = False) -> torch.Tensor:
    """``torch._scaled_grouped_mm`` in pure torch: per group, dequantise (``a * scale_a``, ``b * scale_b``) and
    matmul in fp32, cast to bf16. Supports 2D x 3D (groups of rows of a) and 2D x 2D (groups along the
    reduction dim); the argument checks are torch's own meta function (run on meta copies: dtypes, layouts,
    16-byte strides, scale shapes, offs int32, out_dtype bf16), the CUDA-side ones (dims multiples of 16,
    < 1024 groups) and the group invariants this module's padding guarantees, which are at least as strict as
    any torch version's kernel asserts: group sizes multiples of 16 (2D x 2D: also > 0), offs non-decreasing and
    within the operand. Raises RuntimeError (torch's checks) or ValueError (the others).
    Output rows that belong to no group are NaN (the real op leaves them uninitialised)."""
    torch._scaled_grouped_mm(_meta_like(a), _meta_like(b), _meta_like(scale_a), _meta_like(scale_b),
                             offs=_meta_like(offs), bias=bias, scale_result=scale_result, out_dtype=out_dtype,
                             use_fast_accum=use_fast_accum)
    if a.shape[-1] % 16 or b.shape[-2] % 16 or b.shape[-1] % 16:
        raise ValueError(f"scaled_grouped_mm_ref: dims must be multiples of 16, got a {tuple(a.shape)}, "
                         f"b {tuple(b.shape)}")
    if a.dim() != 2 or offs is None:
        raise ValueError("scaled_grouped_mm_ref: only the 2D x 3D and 2D x 2D cases with offs are modelled")
    ends = [int(v) for v in offs.tolist()]
    if len(ends) > MAX_GROUPS:
        raise ValueError("scaled_grouped_mm_ref: more than 1023 groups")
    starts = [0] + ends[:-1]
    dyn = a.shape[0] if b.dim() == 3 else a.shape[1]
    for s, e in zip(starts, ends):
        if e < s or (e - s) % ALIGN or e > dyn or (b.dim() == 2 and e == s):
            raise ValueError(f"scaled_grouped_mm_ref: bad group [{s}, {e}) of a dynamic dim of {dyn} "
                             f"(offs {ends})")
    af, bf = a.float(), b.float()
    if b.dim() == 3:
        out = torch.full((a.shape[0], b.shape[-1]), float("nan"), dtype=torch.float32, device=a.device)
        for g, (s, e) in enumerate(zip(starts, ends)):
            out[s:e] = (af[s:e] * scale_a[s:e, None]) @ (bf[g] * scale_b[g][None, :])
    else:
        M, N = a.shape[0], b.shape[1]
        out = torch.full((len(ends), M, N), float("nan"), dtype=torch.float32, device=a.device)
        for g, (s, e) in enumerate(zip(starts, ends)):
            out[g] = (af[:, s:e] * scale_a[g * M:(g + 1) * M, None]) @ (bf[s:e] * scale_b[None, g * N:(g + 1) * N])
    return out.to(torch.bfloat16)
