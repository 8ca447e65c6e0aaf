"""DCP checkpoints with sharded experts reshard to other layouts: saved at dp=1 x ep=2, loaded at
ep=4, dp=2 x ep=2, dp=4 x ep=1 (4 ranks) and ep=1 in one process; every parameter, Adam moment and gate
bias equal (experts gathered to global shape)."""
import pytest
import torch

from tests.parallel import workers
from tests.parallel._dist import run_workers


@pytest.mark.timeout(420)
def test_save_ep2_load_ep4_dp2ep2_dp4_and_single(tmp_path):
    run_dir = tmp_path / "run"
    ref_file = str(tmp_path / "ref.pt")
    n = run_workers(workers.save_worker, 2, 1, 2, str(run_dir), ref_file, timeout=180)
    ckpt = run_dir / "checkpoints" / "step_0000002"
    assert (ckpt / "trainer.json").is_file() and n[0] > 0
    ref = torch.load(ref_file, weights_only=True)
    assert ref["param:layers.1.ffn.experts.w1"].shape[0] == 8  # global shape saved
    out = run_workers(workers.load_worker, 4, [(1, 4), (2, 2), (4, 1)], str(ckpt), ref_file, timeout=200)
    assert [c[:2] for c in out[0]] == [(1, 4), (2, 2), (4, 1)]
    assert workers.load_single(str(ckpt), ref_file) == n[0]
