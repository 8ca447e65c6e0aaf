from __future__ import annotations

import json

import pytest

from moetrain.data import ResumableSampler, shard


def _stream(s, n):
    return [s.next_indices() for _ in range(n)]


def test_deterministic():
    a, b, c = ResumableSampler(50, 8, seed=3), ResumableSampler(50, 8, seed=3), ResumableSampler(50, 8, seed=4)
    sa = _stream(a, 20)
    assert sa == _stream(b, 20)
    assert sa != _stream(c, 20)
    assert all(len(x) == 8 and all(0 <= i < 50 for i in x) for x in sa)


@pytest.mark.parametrize("n,bs", [(37, 5), (40, 8), (7, 16)])
def test_each_epoch_covers_all_windows_once(n, bs):
    s = ResumableSampler(n, bs, seed=0)
    flat = [i for _ in range(3 * n // bs + 3) for i in s.next_indices()]
    for e in range(3):
        assert sorted(flat[e * n:(e + 1) * n]) == list(range(n))
    assert flat[:n] != flat[n:2 * n]  # a fresh permutation per epoch


@pytest.mark.parametrize("k", [0, 1, 4, 7, 8, 13])
def test_resume_continues_the_same_stream(k):
    ref = _stream(ResumableSampler(37, 5, seed=11), k + 12)
    s = ResumableSampler(37, 5, seed=11)
    _stream(s, k)
    state = json.loads(json.dumps(s.state_dict()))  # survives a plain-JSON checkpoint
    assert set(state) == {"seed", "epoch", "position", "n_windows", "global_batch_size", "n_shifts"}
    assert all(type(v) is int for v in state.values())
    r = ResumableSampler(37, 5, seed=999)  # seed comes from the state
    r.load_state_dict(state)
    assert _stream(r, 12) == ref[k:]


def test_load_state_mismatch():
    st = ResumableSampler(37, 5, seed=0).state_dict()
    with pytest.raises(ValueError, match="n_windows"):
        ResumableSampler(38, 5).load_state_dict(st)
    with pytest.raises(ValueError, match="global_batch_size"):
        ResumableSampler(37, 10).load_state_dict(st)


def test_shard_is_world_size_independent():
    batch = ResumableSampler(100, 16, seed=1).next_indices()
    for world in (1, 2, 4):
        parts = [shard(batch, r, world, 2) for r in range(world)]
        assert all(len(mb) == 2 for p in parts for mb in p)
        assert all(len(p) == 16 // (2 * world) for p in parts)
        assert [i for p in parts for mb in p for i in mb] == batch
    with pytest.raises(ValueError, match="divisible"):
        shard(batch, 0, 3, 2)
    with pytest.raises(ValueError, match="divisible"):
        shard(batch, 0, 4, 3)
    with pytest.raises(ValueError, match="rank"):
        shard(batch, 4, 4, 2)


def test_shifted_epochs_cover_every_window_once_with_one_shift_per_epoch():
    n, shifts = 37, 8
    seen_shifts = []
    s = ResumableSampler(n, n, seed=3, n_shifts=shifts)  # one batch = one epoch
    for _ in range(6):
        batch = s.next_indices()
        assert sorted(i % n for i in batch) == list(range(n))
        assert len({i // n for i in batch}) == 1 and 0 <= batch[0] // n < shifts
        seen_shifts.append(batch[0] // n)
    assert len(set(seen_shifts)) > 1  # the cut moves between epochs


def test_shifted_sampler_resumes_and_rejects_other_shift_counts():
    a = ResumableSampler(20, 6, seed=1, n_shifts=4)
    for _ in range(5):
        a.next_indices()
    b = ResumableSampler(20, 6, seed=1, n_shifts=4)
    b.load_state_dict(a.state_dict())
    assert [b.next_indices() for _ in range(7)] == [a.next_indices() for _ in range(7)]
    with pytest.raises(ValueError, match="n_shifts"):
        ResumableSampler(20, 6, seed=1, n_shifts=1).load_state_dict(a.state_dict())
