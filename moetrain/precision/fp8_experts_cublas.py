"""Routed experts in blockwise FP8 on cuBLAS: one block-scaled ``_scaled_mm`` per expert (Hopper).

cuBLAS runs DeepSeek-V3's block-scaled GEMMs (1x128 activations, 128x128 weights, FP32 promotion every 128 of K:
DeepSeek-V3 §3.3) on sm90 through ``torch._scaled_mm`` (:mod:`moetrain.precision.fp8_cublas`), but has no grouped
form there (``torch._scaled_grouped_mm`` is rowwise only). This module runs the experts' three GEMMs as one cuBLAS
call per expert with tokens, in place of the Triton grouped kernels of :mod:`kernels.fp8_gemm`:

    forward  y_e [M_e, N]  = x_e(1x128 along K) @ W_e^T(128x128)
    dgrad    dx_e [M_e, K] = g_e(1x128 along N) @ W_e(128x128; W_e^T's bytes from the weight's quantisation)
    wgrad    dW_e [N, K]   = g_e^T(1x128 along tokens) @ x_e(1x128 along tokens)

The quantisers write each expert's rows in the tile-padded row layout
(``quant_1x128_with_transpose_grouped(pad_rows=True)``): expert e's rows start at a multiple of 128 and its row
count is padded to one (zeros), so every GEMM has whole 128-row blocks; the token dimension of the wgrad is
tile-padded the same way. The results are gathered back to the unpadded rows.

Costs against the grouped Triton kernels: the per-expert counts are read on the host (one device synchronisation
per MoE layer's forward: :func:`expert_plan`), a launch per expert and GEMM, the padded-row gather of each
output, a small copy of each expert's activation scales into cuBLAS's layout, and a stack of the per-expert
weight gradients. Numerically it computes the same products (same quantisation, FP32 accumulation) up to the
accumulation order. Measured on an H200 (benchmarks/README.md, seventh GPU session, ``configs/fp8-v3-layers.yaml``):
the experts' GEMMs took 14 ms less a step than the grouped Triton kernels, the whole step 3% more (the host sync
exposes the launches that follow it; the gathers and the stack add copies), so it is opt-in
(``precision.fp8_expert_gemm=per_expert``).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from moetrain.precision import fp8_cublas

TILE = 128


class ExpertPlan(NamedTuple):
    """The per-expert layout of one MoE layer's rows (rows sorted by expert), shared by its GEMMs.

    tiles: ``kernels.fp8_quant.grouped_tiles`` of the counts; counts: rows per expert (host ints);
    tile_off: the first 128-row tile of each expert, and the total (host, E + 1 entries: expert e owns padded
    rows tile_off[e]*128 .. tile_off[e+1]*128); pad_index: [M] long, the padded row of each row.
    """

    tiles: object
    counts: list
    tile_off: list
    pad_index: torch.Tensor


def expert_plan(tokens_per_expert: torch.Tensor, M: int) -> ExpertPlan:
    """Reads ``tokens_per_expert`` [E] on the host (a device synchronisation) and builds the :class:`ExpertPlan`.

    Raises ValueError when the counts are negative or do not sum to ``M``."""
    from kernels.fp8_quant import grouped_tiles
    counts = [int(c) for c in tokens_per_expert.tolist()]
    if any(c < 0 for c in counts) or sum(counts) != M:
        raise ValueError(f"tokens_per_expert {counts} must be >= 0 and sum to the {M} rows")
    tile_off, row_off = [0], [0]
    for c in counts:
        tile_off.append(tile_off[-1] + -(-c // TILE))
        row_off.append(row_off[-1] + c)
    dev = tokens_per_expert.device
    shift = torch.tensor([t * TILE - r for t, r in zip(tile_off[:-1], row_off[:-1])], dtype=torch.long, device=dev)
    reps = torch.tensor(counts, dtype=torch.long, device=dev)
    pad_index = torch.arange(M, device=dev) + torch.repeat_interleave(shift, reps, output_size=M)
    return ExpertPlan(grouped_tiles(tokens_per_expert, M), counts, tile_off, pad_index)


def usable(device: torch.device, dims) -> bool:
    """True when cuBLAS's block-scaled GEMMs passed their one-time check on ``device`` (``fp8_cublas.status``) and
    take every one of ``dims`` (the experts' N and K; ``fp8_cublas.form_for``)."""
    return fp8_cublas.form_for(device, dims) is not None


def _rows(plan: ExpertPlan, e: int) -> slice:
    return slice(plan.tile_off[e] * TILE, plan.tile_off[e + 1] * TILE)


def _per_expert_rows(plan, q, s, b, b_scales, out_dtype, form, n_out):
    """For each expert with tokens, its padded rows of q (1x128 scales s) times b[e] (128x128 block scales already
    in cuBLAS's layout, ``fp8_cublas.scale_b_block_layout`` of all experts at once), one cuBLAS call each; the results concatenated and gathered back to the unpadded rows: [M, n_out] ``out_dtype``."""
    _, fn, _ = form
    outs = [fn(q[_rows(plan, e)], b[e].t(), fp8_cublas.scale_a_layout(s[_rows(plan, e)]), b_scales[e],
               out_dtype, "128x128") for e, c in enumerate(plan.counts) if c]
    if not outs:
        return q.new_zeros((0, n_out), dtype=out_dtype)
    y_pad = torch.cat(outs) if len(outs) > 1 else outs[0]
    return y_pad.index_select(0, plan.pad_index)


class PerExpertBlockwiseFn(torch.autograd.Function):
    """``y[rows of e] = x[rows of e] @ weight[e]^T`` per expert, blockwise FP8, one cuBLAS GEMM per expert.

    x [M, K] (rows sorted by expert, bf16/fp32), weight [E, N, K] (master dtype), plan from :func:`expert_plan`;
    returns [M, N] ``out_dtype``. Gradients for x and weight (fp32 wgrad, cast to the weight's dtype)."""

    @staticmethod
    def forward(ctx, x, weight, plan: ExpertPlan, out_dtype: torch.dtype):
        from moetrain.precision.fp8 import save_grouped_blockwise_operands
        form = fp8_cublas._checked(x.device)[0]
        xq, xs, wq, ws = save_grouped_blockwise_operands(ctx, x, weight, plan.tiles, col_major_scales=True,
                                                         pad_rows=True)
        ctx.plan, ctx.form = plan, form
        return _per_expert_rows(plan, xq, xs, wq, fp8_cublas.scale_b_block_layout(ws, form[2]), out_dtype, form,
                                weight.shape[1])

    @staticmethod
    def backward(ctx, grad):
        from kernels import fp8_quant as q
        xtq, xts, wtq, ws = ctx.saved_tensors
        plan, form = ctx.plan, ctx.form
        gq, gs, gtq, gts = q.quant_1x128_with_transpose_grouped(grad.contiguous(), plan.tiles,
                                                                col_major_scales=True, pad_rows=True)
        dx = dw = None
        if wtq is not None:
            dx = _per_expert_rows(plan, gq, gs, wtq, fp8_cublas.scale_b_block_layout(ws.transpose(1, 2), form[2]),
                                  ctx.x_dtype, form, wtq.shape[1])
        if xtq is not None:
            E, N, K = len(plan.counts), gtq.shape[0], xtq.shape[0]
            parts = []
            for e, c in enumerate(plan.counts):
                if not c:
                    parts.append(gtq.new_zeros((N, K), dtype=torch.float32))
                    continue
                cols, ts = _rows(plan, e), slice(plan.tile_off[e], plan.tile_off[e + 1])
                # tokens are K here: the tile-padded columns of expert e (contiguous copies: whole rows for cuBLAS)
                parts.append(fp8_cublas._wgrad(gtq[:, cols].contiguous(), gts[:, ts], xtq[:, cols].contiguous(),
                                               xts[:, ts], torch.float32, form))
            dw = torch.stack(parts).to(ctx.w_dtype) if E else None
        return dx, dw, None, None
