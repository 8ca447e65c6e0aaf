"""Chunk-local row operations of the pipelined expert-parallel exchange, in PyTorch.

The pipelined exchange (:mod:`moetrain.parallel.pipelined_exchange`) works on one chunk of tokens at a
time while the previous chunk's all-to-all is in flight, so its local passes take a slice of the tokens
and read or write rows of a full-size buffer through the routing map ``row_of`` (``row_of[i*K + k]`` = the
buffer row of token i's k-th copy, as in :func:`moetrain.model.dispatch.permute`'s inverse). Rows
outside the chunk's are not touched. ``kernels.permute.RowOps`` provides the same functions as
Triton kernels (swapped in with ``kernels.permute=true``); this class is the reference and the CPU path.

Shapes: ``n`` tokens in the chunk, ``K`` copies per token, ``R`` rows in the buffer, ``D`` features.
All sums run over k in order in fp32 and are cast on store.
"""
from __future__ import annotations

from typing import Optional

import torch

from moetrain.model.dispatch import inverse_permutation

__all__ = ["TorchRowOps"]


def _words(t: torch.Tensor) -> Optional[torch.Tensor]:
    """``t [R, D]`` viewed as int64 words ``[R, D * elem / 8]`` when its rows allow it, else None: the index
    kernels then move 8 bytes per element instead of 2 (measured on CUDA: ``index_copy_`` of bf16 rows runs
    far below HBM speed)."""
    if t.dtype == torch.int64:
        return t
    if t.dim() != 2 or t.shape[1] == 0 or t.stride(1) != 1:
        return None
    e = t.element_size()
    if (t.shape[1] * e) % 8 or (t.stride(0) * e) % 8 or (t.storage_offset() * e) % 8:
        return None
    return t.view(torch.int64)


class TorchRowOps:
    """PyTorch implementations (see the module docstring); every method is a staticmethod."""

    @staticmethod
    def routing(keys: torch.Tensor, n_bins: int):
        """Stable counting sort of ``keys [N, K]`` (int64 in ``[0, n_bins)``).

        Returns ``(counts [n_bins] int64, sorted_index [N*K] int64, row_of [N*K] int64)``:
        ``sorted_index`` the stable argsort of ``keys.flatten()`` and ``row_of`` its inverse. No host sync."""
        flat = keys.reshape(-1)
        sorted_index = torch.sort(flat, stable=True)[1]
        counts = torch.zeros(n_bins, dtype=torch.int64, device=flat.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat))
        return counts, sorted_index, inverse_permutation(sorted_index)

    @staticmethod
    def placement(counts: torch.Tensor, M: int) -> torch.Tensor:
        """``place [M]`` int64 for ``counts [ep, C, E_local]`` (integer, rows arriving from source rank s in
        chunk c for local expert e; ``M`` = their sum, a host int): rows arrive in (chunk, source rank, local
        expert) segments; ``place[j]`` is arrival row j's row in (local expert, chunk, source rank) order. No
        host sync."""
        ep, C, El = counts.shape
        counts = counts.to(torch.int64)
        arrival = counts.transpose(0, 1).reshape(-1)                      # [C * ep * El]
        em = counts.permute(2, 1, 0).reshape(-1)                          # (expert, chunk, rank) order
        em_start = (torch.cumsum(em, 0) - em).view(El, C, ep).permute(1, 2, 0).reshape(-1)
        place = torch.repeat_interleave(em_start - (torch.cumsum(arrival, 0) - arrival), arrival, output_size=M)
        return place + torch.arange(M, device=place.device)

    @staticmethod
    def copy_to_rows(x: torch.Tensor, row_of: torch.Tensor, out: torch.Tensor) -> None:
        """``out[row_of[i*K + k]] = x[i]`` for ``x [n, D]``, ``row_of [n*K]``, ``out [R, D]`` (same dtype)."""
        n = x.shape[0]
        if n == 0:
            return
        K = row_of.numel() // n
        src = x if K == 1 else x.repeat_interleave(K, dim=0)
        wide_out, wide_src = _words(out), _words(src)
        if wide_out is not None and wide_src is not None:
            wide_out.index_copy_(0, row_of, wide_src)
        else:
            out.index_copy_(0, row_of, src)

    @staticmethod
    def sum_rows(src: torch.Tensor, row_of: torch.Tensor, w: Optional[torch.Tensor], out: torch.Tensor) -> None:
        """``out[i] = sum_k [w[i, k] *] src[row_of[i*K + k]]`` for ``src [R, D]``, ``w [n, K]`` or None,
        ``out [n, D]`` (any float dtype; fp32 accumulation)."""
        n, D = out.shape
        if n == 0:
            return
        if w is None and row_of.numel() == n and out.dtype == src.dtype:  # K = 1: a plain gather
            torch.index_select(src, 0, row_of, out=out)
            return
        rows = src.index_select(0, row_of).view(n, -1, D).float()
        if w is not None:
            rows = rows * w.float().unsqueeze(-1)
        out.copy_(rows.sum(dim=1))

    @staticmethod
    def sum_rows_bwd(dy: torch.Tensor, ys: torch.Tensor, row_of: torch.Tensor, w: torch.Tensor,
                     dys: torch.Tensor, dw: Optional[torch.Tensor]) -> None:
        """Backward of the weighted :meth:`sum_rows`: ``dys[row_of[i*K + k]] = w[i, k] * dy[i]`` and, if
        ``dw [n, K]`` is given, ``dw[i, k] = <dy[i], ys[row_of[i*K + k]]>`` (fp32, cast on store).
        ``dy [n, D]``, ``ys`` / ``dys [R, D]``, ``w [n, K]``."""
        n, K = w.shape
        if n == 0:
            return
        dyf = dy.float().unsqueeze(1)
        dys.index_copy_(0, row_of, (w.float().unsqueeze(-1) * dyf).reshape(n * K, -1).to(dys.dtype))
        if dw is not None:
            dw.copy_((ys.index_select(0, row_of).view(n, K, -1).float() * dyf).sum(dim=-1))
