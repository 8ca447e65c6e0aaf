"""Routed experts in blockwise FP8 on cuBLAS: one block-scaled ``_scaled_mm`` per expert (Hopper).

cuBLAS runs DeepSeek-V3's block-scaled GEMMs (1x128 activations, 128x128 weights, FP32 promotion every 128 of K:
DeepSeek-V3 §3.3) on sm90 through ``torch._scaled_mm`` (:mod:`moetrain.precision.fp8_cublas`), but has no grouped
form there (``torch._scaled_grouped_mm`` is rowwise only). This module runs the experts' three GEMMs as one cuBLAS
call per expert with tokens, in place of the Triton grouped kernels of :mod:`kernels.fp8_gemm`:

    forward  y_e [M_e, N]  = x_e(1x128 along K) @ W_e^T(128x128)
    dgrad    dx_e [M_e, K] = g_e(1x128 along N) @ W_e(128x128; W_e^T's bytes from the weight's quantisation)
    wgrad    dW_e [N, K]   = g_e^T(1x128 along tokens) @ x_e(1x128 along tokens)

The quantisers write each expert's rows in the tile-padded row layout, each expert's operands one contiguous block
(``quant_1x128_with_transpose_grouped(group_major=True)``): expert e's rows start at a multiple of
128 and its row count is padded to one (zeros), so every GEMM has whole 128-row blocks and reads its operands and
their scales in place (the token dimension of the wgrad is tile-padded the same way). Each GEMM writes its result
in place (``out=``): expert e's output rows (whole blocks) start at its first unpadded row, and the next expert's
GEMM, queued after it, overwrites the zero rows that spill past them; the weight gradient of expert e is written
into ``dW[e]``. No gather, concatenation or stack.

Costs against the grouped Triton kernels: the per-expert counts on the host (:func:`expert_plan`; free when the
dispatcher attached them, ``moetrain.model.dispatch.host_counts``, else one device synchronisation per MoE layer's
forward) and a launch per expert and GEMM. Numerically it computes the same products (same quantisation, FP32
accumulation) up to the accumulation order. Measured on an H200 (benchmarks/README.md, eighth GPU session, 16
experts of D 7168 x I 2048): the expert module's forward + backward 1.17-1.37x bf16 where the grouped kernels gave
0.91-1.04x, under balanced, collapsed and skewed routing; the ``configs/fp8-v3-layers.yaml`` training step 1.08x
(4096 tokens) to 1.14x (16,384 tokens) the grouped kernels'. ``precision.fp8_expert_gemm=auto`` (the default) takes
this path at ep = 1, where the dispatcher prefetches the counts.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from moetrain.precision import fp8_cublas

TILE = 128


class ExpertPlan(NamedTuple):
    """The per-expert layout of one MoE layer's rows (rows sorted by expert), shared by its GEMMs.

    tiles: ``kernels.fp8_quant.grouped_tiles`` of the counts; counts: rows per expert (host ints); tile_off: the
    first 128-row tile of each expert, and the total (host, E + 1 entries: expert e owns padded rows
    tile_off[e]*128 .. tile_off[e+1]*128; equal to ``tiles.group_tile_start``); row_off: the first unpadded row of
    each expert, and M (host, E + 1 entries).
    """

    tiles: object
    counts: list
    tile_off: list
    row_off: list


def expert_plan(tokens_per_expert: torch.Tensor, M: int) -> ExpertPlan:
    """The :class:`ExpertPlan` of ``tokens_per_expert`` [E]: its host copy when the dispatcher attached one
    (``moetrain.model.dispatch.host_counts``), else read from the device (a synchronisation).

    Raises ValueError when the counts are negative or do not sum to ``M``."""
    from kernels.fp8_quant import grouped_tiles
    from moetrain.model.dispatch import host_counts
    counts = host_counts(tokens_per_expert)
    counts = [int(c) for c in (tokens_per_expert.tolist() if counts is None else counts)]
    if any(c < 0 for c in counts) or sum(counts) != M or len(counts) != tokens_per_expert.numel():
        raise ValueError(f"tokens_per_expert {counts} must be >= 0 and sum to the {M} rows")
    tile_off, row_off = [0], [0]
    for c in counts:
        tile_off.append(tile_off[-1] + -(-c // TILE))
        row_off.append(row_off[-1] + c)
    return ExpertPlan(grouped_tiles(tokens_per_expert, M), counts, tile_off, row_off)


def usable(device: torch.device, dims) -> bool:
    """True when cuBLAS's block-scaled GEMMs passed their one-time check on ``device`` (``fp8_cublas.status``) and
    take every one of ``dims`` (the experts' N and K; ``fp8_cublas.form_for``)."""
    return fp8_cublas.form_for(device, dims) is not None


def _rows(plan: ExpertPlan, e: int) -> slice:
    return slice(plan.tile_off[e] * TILE, plan.tile_off[e + 1] * TILE)


def _per_expert_rows(plan, q, s, b, b_scales, out_dtype, form, n_out):
    """For each expert with tokens, its padded rows of q (``group_major`` 1x128 scales s, flat) times b[e] (128x128
    block scales already in cuBLAS's layout, ``fp8_cublas.scale_b_block_layout`` of all experts at once), one cuBLAS
    call each, written in place: [M, n_out] ``out_dtype`` (a view of a buffer with 128 spare rows, which take the
    last expert's padding rows)."""
    from kernels.fp8_quant import group_block
    _, fn, _ = form
    M, kt = plan.row_off[-1], -(-q.shape[1] // TILE)
    y = torch.empty((M + TILE, n_out), dtype=out_dtype, device=q.device)
    for e, c in enumerate(plan.counts):   # in expert order: each GEMM overwrites the previous one's padding rows
        if c:
            rows, r0 = _rows(plan, e), plan.row_off[e]
            fn(q[rows], b[e].t(), group_block(s, plan.tile_off, e, kt).t(), b_scales[e], out_dtype, "128x128",
               out=y[r0:r0 + rows.stop - rows.start])
    return y[:M]


class PerExpertBlockwiseFn(torch.autograd.Function):
    """``y[rows of e] = x[rows of e] @ weight[e]^T`` per expert, blockwise FP8, one cuBLAS GEMM per expert.

    x [M, K] (rows sorted by expert, bf16/fp32), weight [E, N, K] (master dtype; with weight2 [E, N, K], N a
    multiple of 128: W = cat([weight, weight2], 1), the experts' W1 and W3, else weight2 None), plan from
    :func:`expert_plan`; returns [M, N] (2N for a pair) ``out_dtype``. Gradients for x and the weights (fp32
    wgrad, cast to the weights' dtype)."""

    @staticmethod
    def forward(ctx, x, weight, weight2, plan: ExpertPlan, out_dtype: torch.dtype):
        from moetrain.precision.fp8 import save_grouped_blockwise_operands
        form = fp8_cublas._checked(x.device)[0]
        xq, xs, wq, ws = save_grouped_blockwise_operands(ctx, x, weight, weight2, plan.tiles, group_major=True)
        ctx.plan, ctx.form = plan, form
        return _per_expert_rows(plan, xq, xs, wq, fp8_cublas.scale_b_block_layout(ws, form[2]), out_dtype, form,
                                wq.shape[1])

    @staticmethod
    def backward(ctx, grad):
        from kernels import fp8_quant as q
        from moetrain.precision.fp8 import split_pair_grad
        xtq, xts, wtq, ws = ctx.saved_tensors
        plan, form = ctx.plan, ctx.form
        gq, gs, gtq, gts = q.quant_1x128_with_transpose_grouped(grad.contiguous(), plan.tiles, group_major=True)
        dx = dw = None
        if wtq is not None:
            dx = _per_expert_rows(plan, gq, gs, wtq, fp8_cublas.scale_b_block_layout(ws.transpose(1, 2), form[2]),
                                  ctx.x_dtype, form, wtq.shape[1])
        if xtq is not None:
            N, K = gq.shape[1], xts.shape[0]
            dw = torch.empty((len(plan.counts), N, K), dtype=torch.float32, device=grad.device)
            for e, c in enumerate(plan.counts):
                if not c:
                    dw[e].zero_()
                    continue
                # tokens are K here: expert e's tile-padded token columns, one contiguous block each
                ts = slice(plan.tile_off[e], plan.tile_off[e + 1])
                fp8_cublas._wgrad(q.group_block(gtq, plan.tile_off, e, N), gts[:, ts],
                                  q.group_block(xtq, plan.tile_off, e, K), xts[:, ts], torch.float32, form, out=dw[e])
            dw = dw.to(ctx.w_dtype)
        return (dx, *split_pair_grad(ctx, dw), None, None)
