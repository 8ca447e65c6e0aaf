"""A deterministic, resumable sampler of global batches, and the per-rank split of one global batch.

The stream of global batches depends only on ``(n_windows, global_batch_size, seed)``, never on the world
size: every rank runs the same sampler and takes its slice with :func:`shard`, so a run on 1, 2 or 4 ranks
sees the same sequences in each optimizer step.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["ResumableSampler", "shard"]

_STATE_KEYS = ("seed", "epoch", "position", "n_windows", "global_batch_size")  # + "n_shifts" (default 1)


class ResumableSampler:
    """Epoch-wise random permutations of ``range(n_windows)``, cut into global batches.

    Epoch ``e`` is ``torch.randperm(n_windows, generator=torch.Generator().manual_seed(seed + e))``.
    :meth:`next_indices` returns the next ``global_batch_size`` indices; when an epoch runs out the batch
    continues into the next epoch's permutation (so a batch may straddle two epochs, and a batch larger than
    ``n_windows`` spans several). Within one epoch every window appears exactly once.

    With ``n_shifts > 1`` every epoch also draws one shift ``s`` in ``[0, n_shifts)`` from the same
    generator and returns ``window + s * n_windows`` (the index encoding of shifted
    :class:`~moetrain.data.dataset.TokenWindows`), so each epoch cuts the text at new places.

    Args:
        n_windows: number of windows in the dataset (``len(TokenWindows)``), >= 1.
        global_batch_size: sequences per optimizer step over all ranks and micro-batches, >= 1.
        seed: base seed (int).
        n_shifts: ``TokenWindows.n_shifts`` (1 = no shifts).
    """

    def __init__(self, n_windows: int, global_batch_size: int, seed: int = 0, n_shifts: int = 1):
        if int(n_windows) < 1:
            raise ValueError(f"n_windows={n_windows}: must be >= 1")
        if int(global_batch_size) < 1:
            raise ValueError(f"global_batch_size={global_batch_size}: must be >= 1")
        self.n_windows = int(n_windows)
        self.global_batch_size = int(global_batch_size)
        self.seed = int(seed)
        self.n_shifts = max(1, int(n_shifts))
        self.epoch = 0
        self.position = 0          # indices of the current epoch already handed out
        self._perm: list[int] | None = None
        self._perm_epoch = -1

    def _permutation(self) -> list[int]:
        if self._perm_epoch != self.epoch:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            perm = torch.randperm(self.n_windows, generator=g)
            if self.n_shifts > 1:
                perm += int(torch.randint(self.n_shifts, (1,), generator=g)) * self.n_windows
            self._perm = perm.tolist()
            self._perm_epoch = self.epoch
        assert self._perm is not None
        return self._perm

    def next_indices(self) -> list[int]:
        """The next global batch: ``list[int]`` of length ``global_batch_size``, values in ``[0, n_windows * n_shifts)``."""
        out: list[int] = []
        need = self.global_batch_size
        while need:
            if self.position >= self.n_windows:
                self.epoch += 1
                self.position = 0
            perm = self._permutation()
            take = min(need, self.n_windows - self.position)
            out.extend(perm[self.position:self.position + take])
            self.position += take
            need -= take
        return out

    def __iter__(self):
        """Endless iterator of :meth:`next_indices`."""
        while True:
            yield self.next_indices()

    def state_dict(self) -> dict:
        """Plain ints: ``{"seed", "epoch", "position", "n_windows", "global_batch_size"}``."""
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position,
                "n_windows": self.n_windows, "global_batch_size": self.global_batch_size,
                "n_shifts": self.n_shifts}

    def load_state_dict(self, state: dict) -> None:
        """Continue the stream of a saved sampler: the next call returns the first batch it had not yet
        returned (no replay). Adopts the saved ``seed``.

        Raises:
            ValueError: a missing key, or ``n_windows`` / ``global_batch_size`` differing from this sampler's
                (the data or the batch size changed since the checkpoint), or an out-of-range position.
        """
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"sampler state: missing key(s) {', '.join(missing)}")
        for k in ("n_windows", "global_batch_size", "n_shifts"):
            if int(state.get(k, 1)) != getattr(self, k):
                raise ValueError(f"sampler state has {k}={int(state[k])} but this run has {k}={getattr(self, k)}"
                                 + (" (the dataset or train.seq_len changed since the checkpoint)"
                                    if k == "n_windows" else " (train.batch_size changed since the checkpoint)"))
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.n_windows:
            raise ValueError(f"sampler state: epoch={epoch}, position={position} out of range "
                             f"(position must be in [0, {self.n_windows}])")
        self.seed = int(state["seed"])
        self.epoch = epoch
        self.position = position
        self._perm, self._perm_epoch = None, -1

    def __repr__(self) -> str:
        return (f"ResumableSampler(n_windows={self.n_windows}, global_batch_size={self.global_batch_size}, "
                f"seed={self.seed}, epoch={self.epoch}, position={self.position})")


def shard(indices: Sequence[int], rank: int, world: int, micro_batch_size: int) -> list[list[int]]:
    """This rank's micro-batches of one global batch.

    Rank ``r`` takes the contiguous slice ``indices[r * P:(r + 1) * P]`` with ``P = len(indices) // world``,
    cut into ``P // micro_batch_size`` micro-batches of ``micro_batch_size`` in order. Concatenating every
    rank's micro-batches in rank order gives back ``indices`` for any ``world``.

    Returns:
        ``list[list[int]]``: ``len(indices) // (world * micro_batch_size)`` lists of ``micro_batch_size`` ints.
    Raises:
        ValueError: ``len(indices)`` not divisible by ``world * micro_batch_size``, or a bad rank/world/size.
    """
    world, rank, mbs = int(world), int(rank), int(micro_batch_size)
    if world < 1 or mbs < 1:
        raise ValueError(f"world={world}, micro_batch_size={mbs}: both must be >= 1")
    if not 0 <= rank < world:
        raise ValueError(f"rank={rank}: must be in [0, {world})")
    n = len(indices)
    if n == 0 or n % (world * mbs):
        raise ValueError(f"global batch of {n} is not divisible by world * micro_batch_size = {world} * {mbs} "
                         f"= {world * mbs}; make train.batch_size a multiple of {world * mbs}")
    per_rank = n // world
    mine = [int(i) for i in indices[rank * per_rank:(rank + 1) * per_rank]]
    return [mine[i:i + mbs] for i in range(0, per_rank, mbs)]
