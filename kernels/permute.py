"""Token permutation for MoE dispatch (sort by expert) and its inverse (weighted combine).

Semantics and index convention are those of the model's ``LocalDispatcher``
(``moetrain/model/dispatch.py``), so these functions drop into its ``permute_fn`` / ``unpermute_fn``
seam. Flatten the assignments ``topk_ids [N, K]`` to ``[N*K]`` (position ``p = n*K + k``),
stable-sort them by expert id, and lay the token copies out in that order, so the rows of
``x_sorted`` are grouped by expert (expert 0 first) and, inside one expert, ordered by (token, k)::

    sorted_index        = argsort(topk_ids.flatten(), stable=True)   # [N*K]: row r <- position p
    x_sorted[r]         = x[sorted_index[r] // K]
    tokens_per_expert[e] = #{p : topk_ids.flat[p] == e}

The kernels work from the inverse map ``row_of[p]`` (``row_of[sorted_index[r]] = r``: the row that
holds token n's k-th copy), so that every kernel runs one program per token, touching its K rows,
with no atomics (``permute`` keeps it from its own sort; ``unpermute`` rebuilds it with one on-device
scatter of N*K int64)::

    permute   fwd: x_sorted[row_of[n*K+k]] = x[n]                     (read x once, write K rows)
              bwd: dx[n] = sum_k dx_sorted[row_of[n*K+k]]
    unpermute fwd: y[n] = sum_k topk_weights[n,k] * y_sorted[row_of[n*K+k]]   (fp32 accumulate)
              bwd: dy_sorted[row_of[n*K+k]] = topk_weights[n,k] * dy[n]
                   dtopk_weights[n,k] = <dy[n], y_sorted[row_of[n*K+k]]>

All sums run over k in a fixed order in fp32: results are deterministic. Counts and the maps
(:func:`routing_map`) are computed on the device with no host synchronisation by a counting sort in
three Triton launches (per-chunk expert histograms, a prefix over chunks, then each chunk places its
positions: the comment above ``_rm_count_kernel``); integer counts only, so deterministic, and equal
to :func:`routing_map_ref`'s stable ``torch.sort`` + ``scatter`` inverse + ``scatter_add_`` histogram
(``torch.bincount`` would read ``max()`` back on CUDA).

Shapes and dtypes:
    x              [N, D] float32 | bfloat16 | float16 (any D; masked)
    topk_ids       [N, K] integer, values in [0, n_experts) (checked on CPU only: a check on CUDA
                   would synchronise; out-of-range ids there are undefined behaviour)
    topk_weights   [N, K] float32 (or bf16/fp16); its grad comes back in its dtype
    outputs        x_sorted [N*K, D] x.dtype; tokens_per_expert [E] int64; sorted_index [N*K] int64;
                   y [N, D] y_sorted.dtype (the model's torch unpermute returns fp32 and its caller
                   casts to the activation dtype: the same values, rounded once)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import (new_empty, new_empty_like, check_device, check_dtype, interpreting, next_pow2,
                     num_warps_for)

__all__ = ["permute", "unpermute", "permute_ref", "unpermute_ref", "routing_map", "stable_order", "routing_map_ref",
           "inverse_index", "PermuteFunction", "UnpermuteFunction", "RowOps"]


@triton.jit
def _permute_fwd_kernel(X, ROW_OF, XS, D, stride_x, stride_xs,
                        K: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (n, db): copy x[n, db-block] to rows row_of[n*K : n*K+K] of x_sorted."""
    n = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cm = cols < D
    x = tl.load(X + n * stride_x + cols, mask=cm, other=0.0)
    for k in tl.static_range(K):
        r = tl.load(ROW_OF + n * K + k)
        tl.store(XS + r * stride_xs + cols, x, mask=cm)


@triton.jit
def _gather_sum_kernel(SRC, ROW_OF, WGT, DST, D, stride_src, stride_dst,
                       K: tl.constexpr, BLOCK_D: tl.constexpr, WEIGHTED: tl.constexpr):
    """Program (n, db): dst[n] = sum_k [w[n, k] *] src[row_of[n*K + k]] (fp32, k in order). permute's backward
    (unweighted: dx from dx_sorted) and unpermute's forward (weighted: y from y_sorted)."""
    n = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cm = cols < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for k in tl.static_range(K):
        r = tl.load(ROW_OF + n * K + k)
        w = tl.load(WGT + n * K + k).to(tl.float32) if WEIGHTED else 1.0
        row = tl.load(SRC + r * stride_src + cols, mask=cm, other=0.0).to(tl.float32)
        acc += w * row if WEIGHTED else row
    tl.store(DST + n * stride_dst + cols, acc.to(DST.dtype.element_ty), mask=cm)


@triton.jit
def _unpermute_bwd_kernel(DY, YS, ROW_OF, WGT, DYS, DW, D, stride_dy, stride_ys, stride_dys,
                          K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                          NEED_DW: tl.constexpr):
    """Program n: dy_sorted[row_k] = w[n,k] * dy[n];  dw[n,k] = <dy[n], y_sorted[row_k]>."""
    n = tl.program_id(0).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    km = ks < K
    rows = tl.load(ROW_OF + n * K + ks, mask=km, other=0)
    w = tl.load(WGT + n * K + ks, mask=km, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_K], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        cm = cols < D
        m2 = km[:, None] & cm[None, :]
        dy = tl.load(DY + n * stride_dy + cols, mask=cm, other=0.0).to(tl.float32)
        tl.store(DYS + rows[:, None] * stride_dys + cols[None, :],
                 (w[:, None] * dy[None, :]).to(DYS.dtype.element_ty), mask=m2)
        if NEED_DW:
            ys = tl.load(YS + rows[:, None] * stride_ys + cols[None, :], mask=m2,
                         other=0.0).to(tl.float32)
            dw += tl.sum(ys * dy[None, :], axis=1)
    if NEED_DW:
        tl.store(DW + n * K + ks, dw.to(DW.dtype.element_ty), mask=km)


# ------------------------------------------------------------------------------ routing map
# A deterministic counting sort of the flat ids (no atomics whose order matters, no host sync), in
# three launches over chunks of C consecutive flat positions p (C = CFG["rm_chunk"]):
#   A  _rm_count_kernel  (one program per chunk): counts[c, e] = #{p in chunk c : id[p] == e}
#   S  _rm_scan_kernel   (one program per tile of experts): in place, counts[c, e] <- sum_{c' < c}
#      counts[c', e]; tokens_per_expert[e] = the column total
#   B  _rm_place_kernel  (one program per chunk): start[e] = sum_{e' < e} total[e'] + counts[c, e]
#      (the first row of expert e that chunk c fills), then over the chunk in blocks of R positions:
#      row_of[p] = start[id[p]] + #{q < p in the block : id[q] == id[p]};  sorted_index[row_of[p]] = p;
#      start += histogram of the block.
# Rows of expert e are handed out in (chunk, position) order, i.e. in increasing p: exactly the
# stable argsort. tl.histogram sums integers (in shared memory on the GPU), exact in any order.
@triton.jit
def _rm_count_kernel(IDS, COUNTS, M, C: tl.constexpr, E_PAD: tl.constexpr, H: tl.constexpr):
    """Program c: counts[c, :E_PAD] = histogram of ids[c*C : c*C + C] (int32), H positions at a time."""
    c = tl.program_id(0)
    acc = tl.zeros([E_PAD], dtype=tl.int32)
    for h0 in tl.static_range(0, C, H):
        offs = c * C + h0 + tl.arange(0, H)
        m = offs < M
        e = tl.load(IDS + offs, mask=m, other=0).to(tl.int32)
        acc += tl.histogram(e, E_PAD, mask=m)
    tl.store(COUNTS + c * E_PAD + tl.arange(0, E_PAD), acc)


@triton.jit
def _rm_scan_kernel(COUNTS, TPE, n_chunks, E, E_PAD: tl.constexpr, BC: tl.constexpr,
                    BE: tl.constexpr):
    """Program t (experts t*BE ..): exclusive prefix of counts[:, e] over chunks, in place, and
    tokens_per_expert[e] (int64) = the column total."""
    es = tl.program_id(0) * BE + tl.arange(0, BE)
    carry = tl.zeros([BE], dtype=tl.int32)
    for c0 in range(0, n_chunks, BC):
        cs = c0 + tl.arange(0, BC)
        ptrs = COUNTS + cs[:, None] * E_PAD + es[None, :]
        m2 = (cs < n_chunks)[:, None]
        t = tl.load(ptrs, mask=m2, other=0)
        tl.store(ptrs, carry[None, :] + tl.cumsum(t, axis=0) - t, mask=m2)
        carry += tl.sum(t, axis=0)
    tl.store(TPE + es, carry.to(tl.int64), mask=es < E)


@triton.jit
def _rm_place_kernel(IDS, COUNTS, TPE, ROW_OF, SIDX, M, E, C: tl.constexpr, E_PAD: tl.constexpr,
                     R: tl.constexpr):
    """Program c: row_of and sorted_index for the positions of chunk c (module comment above)."""
    c = tl.program_id(0)
    es = tl.arange(0, E_PAD)
    tot = tl.load(TPE + es, mask=es < E, other=0).to(tl.int32)
    start = tl.cumsum(tot, axis=0) - tot + tl.load(COUNTS + c * E_PAD + es)
    rr = tl.arange(0, R)
    earlier = rr[None, :] < rr[:, None]  # [i, j]: j before i inside the block
    p0 = c * C
    n_here = tl.minimum(M - p0, C)
    offs = p0 + rr
    e_next = tl.load(IDS + offs, mask=offs < M, other=0)
    for r0 in range(0, n_here, R):
        offs = p0 + r0 + rr
        m = rr < n_here - r0
        e = e_next.to(tl.int32)
        # prefetch the next block's ids while this one is placed
        e_next = tl.load(IDS + offs + R, mask=rr < n_here - r0 - R, other=0)
        rank = tl.sum(((e[None, :] == e[:, None]) & earlier).to(tl.int32), axis=1)
        row = tl.gather(start, e, 0) + rank
        tl.store(ROW_OF + offs, row.to(tl.int64), mask=m)
        tl.store(SIDX + row, offs.to(tl.int64), mask=m)
        start += tl.histogram(e, E_PAD, mask=m)


@triton.jit
def _placement_kernel(CNT, PLACE, S, EP, NC, EL, S_BLOCK: tl.constexpr, BLOCK: tl.constexpr):
    """Program a (an arrival segment (c, s, e), a = (c*EP + s)*EL + e, count CNT[s, c, e] of the
    [EP, NC, EL] counts): place[arrival start + j] = expert-major start + j for j < count. The arrival
    start sums the counts of the segments before a in (c, s, e) order, the expert-major start those before
    it in (e, c, s) order (S_BLOCK segments at a time)."""
    a = tl.program_id(0)
    ca, sa, ea = a // (EP * EL), (a // EL) % EP, a % EL
    key_a = (ea * NC + ca) * EP + sa
    arr_start = tl.zeros([S_BLOCK], dtype=tl.int64)
    em_start = tl.zeros([S_BLOCK], dtype=tl.int64)
    for i0 in range(0, S, S_BLOCK):
        i = i0 + tl.arange(0, S_BLOCK)
        c, s, e = i // (EP * EL), (i // EL) % EP, i % EL
        cnt = tl.load(CNT + (s * NC + c) * EL + e, mask=i < S, other=0).to(tl.int64)
        arr_start += tl.where(i < a, cnt, 0)
        em_start += tl.where((e * NC + c) * EP + s < key_a, cnt, 0)
    arr0 = tl.sum(arr_start)
    em0 = tl.sum(em_start)
    n = tl.load(CNT + (sa * NC + ca) * EL + ea)
    for j0 in range(0, n, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        tl.store(PLACE + arr0 + j, em0 + j, mask=j < n)


#: Tunables (H200 measurements in benchmarks/bench_kernels.py): column block of the row-copy
#: kernels (grid N x cdiv(D, BLOCK_D)) and of the per-token tile kernel of unpermute's backward;
#: routing map: positions per chunk (one program of the count and place kernels; powers of two),
#: positions per rank block of the place kernel (an R x R compare) and its warps.
#: H200 sweep (2026-11-30): block_d flat (3.6-4.3 TB/s at any size), tile_elems 2048 3.54 TB/s (4096: 3.32),
#: routing map 512/32/4 55-59 us at 16384 x top-6 of 64 and x top-8 of 256 (torch.sort path 129 / 213 us).
CFG = {"block_d": 1024, "tile_elems": 2048, "rm_chunk": 512, "rm_block": 32, "rm_warps": 4}


def _block_d(D: int) -> int:
    return max(16, min(next_pow2(D), CFG["block_d"]))


def _tile_block_d(D: int, K: int) -> int:
    return max(16, min(next_pow2(D), CFG["tile_elems"] // next_pow2(K), 1024))


def _check_ids(topk_ids: torch.Tensor, n_experts: int) -> None:
    """Integer ids in [0, n_experts): the range is checked on CPU only (on CUDA the check would
    synchronise; out-of-range ids there are undefined behaviour)."""
    if topk_ids.dtype.is_floating_point or topk_ids.dtype == torch.bool:
        raise TypeError(f"topk_ids must be an integer tensor, got {topk_ids.dtype}")
    if n_experts < 1:
        raise ValueError(f"n_experts={n_experts} must be >= 1")
    if topk_ids.device.type == "cpu" and topk_ids.numel() and (
            int(topk_ids.min()) < 0 or int(topk_ids.max()) >= n_experts):
        raise ValueError(f"topk_ids must lie in [0, {n_experts}), got "
                         f"[{int(topk_ids.min())}, {int(topk_ids.max())}]")


def routing_map(topk_ids: torch.Tensor, n_experts: int):
    """On the ids' device, no host sync: (tokens_per_expert [E] int64, sorted_index [N*K] int64,
    row_of [N*K] int64) with ``sorted_index`` the stable argsort of the flattened ids and ``row_of``
    its inverse; the same tensors as :func:`routing_map_ref` (a counting sort in three Triton
    launches, see the comment above ``_rm_count_kernel``). Ids of any integer dtype. Falls back to
    :func:`routing_map_ref` for more than 1024 experts, N*K near 2**31, or CPU tensors without
    Triton's interpreter."""
    n_experts = int(n_experts)
    _check_ids(topk_ids, n_experts)
    return _routing_map(topk_ids, n_experts)


def _routing_map(topk_ids: torch.Tensor, E: int):
    flat = topk_ids.reshape(-1)
    flat = flat if flat.is_contiguous() else flat.contiguous()
    M, dev = flat.numel(), flat.device
    C = next_pow2(CFG["rm_chunk"])
    if M == 0:
        return (torch.zeros(E, dtype=torch.int64, device=dev),
                torch.empty(0, dtype=torch.int64, device=dev), torch.empty(0, dtype=torch.int64, device=dev))
    if M + 2 * C >= 2**31 or E > 1024 or (dev.type != "cuda" and not interpreting()):
        # positions and rows are int32 in the kernels; E_PAD bins live in registers; no Triton here
        return routing_map_ref(topk_ids, E)
    R = min(next_pow2(CFG["rm_block"]), C)
    H = min(C, 1024)
    E_PAD = max(32, next_pow2(E))  # tl.histogram: a power of two, at least a warp of bins
    n_chunks = triton.cdiv(M, C)
    counts = torch.empty((n_chunks, E_PAD), dtype=torch.int32, device=dev)  # scratch, fully written
    tpe = new_empty((E,), torch.int64, dev)
    sorted_index = new_empty((M,), torch.int64, dev)
    row_of = new_empty((M,), torch.int64, dev)
    _rm_count_kernel[(n_chunks,)](flat, counts, M, C=C, E_PAD=E_PAD, H=H,
                                  num_warps=num_warps_for(H, hi=8))
    BE = min(E_PAD, 32)
    BC = max(16, min(next_pow2(n_chunks), 8192 // BE))
    _rm_scan_kernel[(E_PAD // BE,)](counts, tpe, n_chunks, E, E_PAD=E_PAD, BC=BC, BE=BE,
                                    num_warps=num_warps_for(BC * BE, hi=8))
    _rm_place_kernel[(n_chunks,)](flat, counts, tpe, row_of, sorted_index, M, E, C=C, E_PAD=E_PAD,
                                  R=R, num_warps=CFG["rm_warps"])
    return tpe, sorted_index, row_of


def stable_order(keys: torch.Tensor, n_bins: int):
    """``(order, inverse)`` of ``keys [M]`` (ints in ``[0, n_bins)``): the stable argsort and its inverse, as
    ``moetrain.parallel.expert_parallel.stable_order`` computes with ``torch.sort``, here by
    :func:`routing_map`'s counting sort (the expert-parallel dispatcher's regroup of received rows)."""
    _, sorted_index, row_of = routing_map(keys.reshape(-1, 1), n_bins)
    return sorted_index, row_of


def routing_map_ref(topk_ids: torch.Tensor, n_experts: int):
    """Pure-torch :func:`routing_map` (what it replaced): a stable ``torch.sort`` of the flat ids, a
    ``scatter`` for the inverse and an integer ``scatter_add_`` histogram (``torch.bincount`` would
    read ``max()`` back on CUDA). The same three tensors."""
    flat = topk_ids.reshape(-1).to(torch.int64)
    sorted_index = torch.sort(flat, stable=True)[1]
    counts = torch.zeros(int(n_experts), dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    return counts, sorted_index, inverse_index(sorted_index)


def inverse_index(sorted_index: torch.Tensor) -> torch.Tensor:
    """row_of [M] with row_of[sorted_index[r]] = r (one on-device scatter)."""
    M = sorted_index.numel()
    row_of = torch.empty_like(sorted_index)
    row_of.scatter_(0, sorted_index,
                    torch.arange(M, dtype=sorted_index.dtype, device=sorted_index.device))
    return row_of


def _rowmajor(t: torch.Tensor) -> torch.Tensor:
    return t if t.shape[-1] == 0 or t.stride(-1) == 1 else t.contiguous()


def _dst(name: str, t: torch.Tensor, dense: bool = False) -> torch.Tensor:
    """An output written in place: its rows must be contiguous (``dense``: the whole tensor), as a copy would
    not be written back."""
    if not (t.is_contiguous() if dense else t.shape[-1] <= 1 or t.stride(-1) == 1):
        raise ValueError(f"{name} must be {'contiguous' if dense else 'row-major (stride(-1) == 1)'}, "
                         f"got strides {t.stride()}")
    return t


# Launchers. ``row_of`` (int64) and the weights ``w [N, K]`` are read as flat contiguous arrays; x / dy / src rows
# may be strided (any stride(0), e.g. a chunk of a larger tensor). With ``out=`` (and dys= / dw=) they write into a
# caller's buffer, touching only the rows named in row_of (resp. the N rows of a per-token output).
def permute_fwd(x: torch.Tensor, row_of: torch.Tensor, K: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """``out[row_of[n*K + k]] = x[n]`` for x [N, D], row_of [N*K] into ``out [R, D]`` (x.dtype; default a new
    [N*K, D]); other rows of out are not written. Returns out."""
    N, D = x.shape
    xs = new_empty((N * K, D), x.dtype, x.device) if out is None else _dst("out", out)
    if N * K * D == 0:
        return xs
    x = _rowmajor(x)
    BLOCK_D = _block_d(D)
    _permute_fwd_kernel[(N, triton.cdiv(D, BLOCK_D))](
        x, row_of.contiguous(), xs, D, x.stride(0), xs.stride(0),
        K=K, BLOCK_D=BLOCK_D, num_warps=num_warps_for(BLOCK_D, hi=8))
    return xs


def _gather_sum(src, row_of, w, N: int, K: int, out):
    D = src.shape[1]
    out = new_empty((N, D), src.dtype, src.device) if out is None else _dst("out", out)
    if out.numel() == 0:
        return out
    src = _rowmajor(src)
    BLOCK_D = _block_d(D)
    _gather_sum_kernel[(N, triton.cdiv(D, BLOCK_D))](
        src, row_of.contiguous(), src if w is None else w.contiguous(),  # WGT never read when not WEIGHTED
        out, D, src.stride(0), out.stride(0),
        K=K, BLOCK_D=BLOCK_D, WEIGHTED=w is not None, num_warps=num_warps_for(BLOCK_D, hi=8))
    return out


def permute_bwd(dxs: torch.Tensor, row_of: torch.Tensor, N: int, K: int,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """``out[n] = sum_k dxs[row_of[n*K + k]]`` (fp32, k in order, cast on store) for dxs [R, D] into
    ``out [N, D]`` (any float dtype; default a new one in dxs.dtype). Returns out."""
    return _gather_sum(dxs, row_of, None, N, K, out)


def unpermute_fwd(ys: torch.Tensor, row_of: torch.Tensor, w: torch.Tensor, N: int,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """``out[n] = sum_k w[n, k] * ys[row_of[n*K + k]]`` (fp32, k in order, cast on store) for ys [R, D],
    w [N, K] into ``out [N, D]`` (any float dtype; default a new one in ys.dtype). Returns out."""
    return _gather_sum(ys, row_of, w, N, w.shape[1], out)


def unpermute_bwd(dy, ys, row_of, w, need_dw: bool, dys: torch.Tensor | None = None,
                  dw: torch.Tensor | None = None):
    """``dys[row_of[n*K + k]] = w[n, k] * dy[n]`` and, if ``need_dw``, ``dw[n, k] = <dy[n], ys[row_of[n*K + k]]>``
    (fp32, cast on store) for dy [N, D], ys [R, D] (read only for dw), w [N, K]. Into ``dys [R, D]`` (default a
    new tensor like ys; only the N*K named rows written) and ``dw [N, K]`` (contiguous; default a new one in
    w.dtype). Returns (dys, dw or None)."""
    N, K = w.shape
    D = dy.shape[1]
    dys = new_empty_like(ys) if dys is None else _dst("dys", dys)
    if need_dw:
        dw = new_empty((N, K), w.dtype, w.device) if dw is None else _dst("dw", dw, dense=True)
    else:
        dw = None
    if N == 0 or D == 0:
        if need_dw:
            dw.zero_()
        return dys, dw
    dy, ys = _rowmajor(dy), (_rowmajor(ys) if need_dw else ys)
    BLOCK_D = _tile_block_d(D, K)
    _unpermute_bwd_kernel[(N,)](dy, ys, row_of.contiguous(), w.contiguous(), dys, w if dw is None else dw,
                                D, dy.stride(0), ys.stride(0), dys.stride(0),
                                K=K, BLOCK_K=next_pow2(K), BLOCK_D=BLOCK_D, NEED_DW=need_dw,
                                num_warps=num_warps_for(next_pow2(K) * BLOCK_D, hi=8))
    return dys, dw


class RowOps:
    """Triton versions of :class:`moetrain.parallel.row_ops.TorchRowOps` (same semantics, shapes and
    dtypes; staticmethods): the chunk-local row operations of the pipelined expert-parallel exchange.
    They take a chunk of n tokens (``x [n, D]``, ``row_of [n*K]`` int64, ``w [n, K]``: slices of full-size
    tensors, any stride(0)) and read or write rows of a full-size buffer ``[R, D]`` at the rows named in
    ``row_of``; rows not named there are never written. Outputs are written in place and must be row-major
    (stride(-1) == 1; ``dw`` contiguous). Sums run over k in order in fp32 and are cast on store."""

    @staticmethod
    def routing(keys: torch.Tensor, n_bins: int):
        """Stable counting sort of ``keys [N, K]`` (integers in ``[0, n_bins)``): ``(counts [n_bins] int64,
        sorted_index [N*K] int64, row_of [N*K] int64)``, :func:`routing_map`'s result. No host sync on CUDA."""
        return routing_map(keys, n_bins)

    @staticmethod
    def copy_to_rows(x: torch.Tensor, row_of: torch.Tensor, out: torch.Tensor) -> None:
        """``out[row_of[i*K + k]] = x[i]`` for ``x [n, D]``, ``row_of [n*K]``, ``out [R, D]`` (x.dtype),
        ``K = row_of.numel() // n``. Writes only those n*K rows of out."""
        n = x.shape[0]
        if n:
            permute_fwd(x, row_of, row_of.numel() // n, out=out)

    @staticmethod
    def sum_rows(src: torch.Tensor, row_of: torch.Tensor, w: torch.Tensor | None, out: torch.Tensor) -> None:
        """``out[i] = sum_k [w[i, k] *] src[row_of[i*K + k]]`` for ``src [R, D]``, ``w [n, K]`` or None,
        ``out [n, D]`` (any float dtype, e.g. fp32 from a bf16 src). Writes all of out; src is only read."""
        n = out.shape[0]
        if n:
            _gather_sum(src, row_of, w, n, row_of.numel() // n, out)

    @staticmethod
    def sum_rows_bwd(dy: torch.Tensor, ys: torch.Tensor, row_of: torch.Tensor, w: torch.Tensor,
                     dys: torch.Tensor, dw: torch.Tensor | None) -> None:
        """Backward of the weighted :meth:`sum_rows`: ``dys[row_of[i*K + k]] = w[i, k] * dy[i]`` (dys.dtype; only
        those n*K rows of ``dys [R, D]`` written) and, if ``dw [n, K]`` (contiguous) is given,
        ``dw[i, k] = <dy[i], ys[row_of[i*K + k]]>`` (fp32, cast on store). ``dy [n, D]``, ``ys [R, D]`` (read only
        for dw), ``w [n, K]``."""
        unpermute_bwd(dy, ys, row_of, w, dw is not None, dys=dys, dw=dw)


    @staticmethod
    def placement(counts: torch.Tensor, M: int) -> torch.Tensor:
        """``place [M]`` int64: the expert-major row of every received row. ``counts [ep, C, E_local]``
        (integers, on the device; ``M`` their host sum) count the rows that arrive from source rank s in
        chunk c for local expert e; rows arrive in (c, s, e) segments and go to (e, c, s) order. One launch,
        one program per segment; no host sync."""
        ep, C, El = counts.shape
        S = ep * C * El
        place = new_empty((M,), torch.int64, counts.device)
        if M == 0:
            return place
        S_BLOCK = max(16, min(next_pow2(S), 2048))
        _placement_kernel[(S,)](counts.contiguous(), place, S, ep, C, El, S_BLOCK=S_BLOCK, BLOCK=1024,
                                num_warps=num_warps_for(S_BLOCK, hi=8))
        return place


class PermuteFunction(torch.autograd.Function):
    """(x_sorted, tokens_per_expert, sorted_index) = permute(x, topk_ids, n_experts)."""

    @staticmethod
    def forward(ctx, x, topk_ids, n_experts):
        N, K = topk_ids.shape
        counts, sorted_index, row_of = _routing_map(topk_ids, n_experts)
        xs = permute_fwd(x, row_of, K)
        ctx.save_for_backward(row_of)
        ctx.NK = (N, K)
        ctx.mark_non_differentiable(counts, sorted_index)
        return xs, counts, sorted_index

    @staticmethod
    def backward(ctx, dxs, _dcounts, _didx):
        (row_of,) = ctx.saved_tensors
        N, K = ctx.NK
        return permute_bwd(dxs, row_of, N, K), None, None


class UnpermuteFunction(torch.autograd.Function):
    """y = unpermute(y_sorted, sorted_index, topk_weights)."""

    @staticmethod
    def forward(ctx, ys, sorted_index, w):
        N = w.shape[0]
        row_of = inverse_index(sorted_index)
        y = unpermute_fwd(ys, row_of, w, N)
        ctx.save_for_backward(ys, row_of, w)
        return y

    @staticmethod
    def backward(ctx, dy):
        ys, row_of, w = ctx.saved_tensors
        need_dw = ctx.needs_input_grad[2]
        dys, dw = unpermute_bwd(dy, ys, row_of, w, need_dw)
        return (dys if ctx.needs_input_grad[0] else None), None, dw


def permute(x: torch.Tensor, topk_ids: torch.Tensor, n_experts: int):
    """Sort token copies by expert. x [N, D], topk_ids [N, K] ->
    (x_sorted [N*K, D] x.dtype, tokens_per_expert [E] int64, sorted_index [N*K] int64).

    Row r of x_sorted is token ``sorted_index[r] // K`` (its copy number ``sorted_index[r] % K``);
    ``sorted_index`` is the stable argsort of ``topk_ids.flatten()`` (module docstring).
    """
    check_dtype("x", x)
    if x.dim() != 2 or topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0]:
        raise ValueError(f"expected x [N, D] and topk_ids [N, K], got {list(x.shape)} and "
                         f"{list(topk_ids.shape)}")
    n_experts = int(n_experts)
    _check_ids(topk_ids, n_experts)
    if topk_ids.shape[1] < 1:
        raise ValueError("topk_ids must have K >= 1 columns")
    check_device(("x", x), ("topk_ids", topk_ids))
    return PermuteFunction.apply(_rowmajor(x), topk_ids.contiguous(), n_experts)


def unpermute(y_sorted: torch.Tensor, sorted_index: torch.Tensor, topk_weights: torch.Tensor,
              N: int | None = None) -> torch.Tensor:
    """Weighted combine, the inverse of :func:`permute`.

    y_sorted [N*K, D] (rows in x_sorted's order), sorted_index [N*K] int64 (from :func:`permute`),
    topk_weights [N, K] -> y [N, D] in y_sorted.dtype, ``y[n] = sum_k w[n,k] * y_sorted[row of
    (n, k)]`` with fp32 accumulation, k in order. ``N`` defaults to ``topk_weights.shape[0]``.
    """
    check_dtype("y_sorted", y_sorted)
    check_dtype("topk_weights", topk_weights)
    if topk_weights.dim() != 2:
        raise ValueError(f"topk_weights must be [N, K], got {list(topk_weights.shape)}")
    N = topk_weights.shape[0] if N is None else int(N)
    if topk_weights.shape[0] != N:
        raise ValueError(f"topk_weights must be [N={N}, K], got {list(topk_weights.shape)}")
    K = topk_weights.shape[1]
    if y_sorted.dim() != 2 or y_sorted.shape[0] != N * K:
        raise ValueError(f"y_sorted must be [N*K={N * K}, D], got {list(y_sorted.shape)}")
    if sorted_index.shape != (N * K,) or sorted_index.dtype != torch.int64:
        raise ValueError(f"sorted_index must be int64 [N*K={N * K}], got {sorted_index.dtype} "
                         f"{list(sorted_index.shape)}")
    check_device(("y_sorted", y_sorted), ("sorted_index", sorted_index),
                 ("topk_weights", topk_weights))
    return UnpermuteFunction.apply(_rowmajor(y_sorted), sorted_index.contiguous(),
                                   topk_weights.contiguous())


def permute_ref(x: torch.Tensor, topk_ids: torch.Tensor, n_experts: int):
    """Pure-torch reference of :func:`permute` (same three outputs)."""
    N, K = topk_ids.shape
    flat = topk_ids.reshape(-1).long()
    sorted_index = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=n_experts)
    return x[sorted_index // K], counts, sorted_index


def unpermute_ref(y_sorted: torch.Tensor, sorted_index: torch.Tensor, topk_weights: torch.Tensor,
                  N: int | None = None) -> torch.Tensor:
    """Pure-torch reference of :func:`unpermute` (fp32 math, output in y_sorted.dtype)."""
    N = topk_weights.shape[0] if N is None else N
    K = topk_weights.shape[1]
    D = y_sorted.shape[1]
    rows = torch.zeros(N * K, D, dtype=torch.float32, device=y_sorted.device)
    rows = rows.index_copy(0, sorted_index, y_sorted.float()).view(N, K, D)
    return (rows * topk_weights.float()[..., None]).sum(dim=1).to(y_sorted.dtype)
