"""Expert-parallel training matches the single-process model (CPU, gloo, 2 and 4 ranks).

Each rank builds the single-process reference itself (same seed, same global batch; the reference runs
every rank's chunk and averages the losses, the objective the ranks optimise together) and checks, at
every step: the mean loss, every gradient (dense ones directly, expert ones on the local shard and
all-gathered over the ep group), the clipped global grad norm, the routing telemetry; and after the steps
every parameter (gathered) and every gate bias (aux-loss-free updates from world-summed counts).
"""
import pytest

from tests.parallel import workers
from tests.parallel._dist import run_workers

CASES_2 = [
    {"name": "softmax_top2_shared"},
    {"name": "softmax_top2_adamw", "optim": "adamw"},
    {"name": "softmax_top1_no_shared", "model": {"n_activated_experts": 1, "n_shared_experts": 0}},
    {"name": "sigmoid_group_limited_switch_aux",
     "model": {"score_func": "sigmoid", "n_expert_groups": 4, "n_limited_groups": 2, "n_activated_experts": 3,
               "switch_aux_alpha": 1e-2, "router_z_loss_coef": 1e-3}},
    {"name": "capacity_probs", "capacity_factor": 0.5, "capacity_policy": "probs"},
    {"name": "capacity_position_sigmoid", "capacity_factor": 0.75, "capacity_policy": "position",
     "model": {"score_func": "sigmoid"}},
    {"name": "rank1_receives_zero_tokens", "skew": {0: 5.0, 1: 5.0, 2: 5.0, 3: 5.0}},
    {"name": "all_tokens_to_one_expert", "skew": {5: 5.0}, "model": {"n_activated_experts": 1}},
    {"name": "grad_accum_bias_update_no_overlap", "accum": 2, "overlap": False,
     "model": {"bias_update_speed": 0.05}},
    {"name": "per_expert_exchange_capacity", "exchange": "per_expert", "capacity_factor": 0.75},
    {"name": "per_expert_exchange_zero_tokens_no_overlap", "exchange": "per_expert", "overlap": False,
     "skew": {0: 5.0, 1: 5.0, 2: 5.0, 3: 5.0}},
    {"name": "pipelined_exchange_capacity_adamw", "exchange": "pipelined", "chunks": 3, "capacity_factor": 0.75,
     "optim": "adamw"},
    {"name": "pipelined_exchange_zero_tokens_accum", "exchange": "pipelined", "chunks": 2, "accum": 2,
     "skew": {0: 5.0, 1: 5.0, 2: 5.0, 3: 5.0}, "model": {"bias_update_speed": 0.05}},
    {"name": "pipelined_exchange_more_chunks_than_tokens_top1", "exchange": "pipelined", "chunks": 64,
     "model": {"n_activated_experts": 1}},
    {"name": "symmetric_exchange_capacity_adamw", "exchange": "symmetric", "capacity_factor": 0.75, "optim": "adamw"},
    {"name": "symmetric_exchange_zero_tokens_accum_bias", "exchange": "symmetric", "accum": 2,
     "skew": {0: 5.0, 1: 5.0, 2: 5.0, 3: 5.0}, "model": {"bias_update_speed": 0.05}},
    {"name": "symmetric_exchange_all_to_one_expert_top1", "exchange": "symmetric", "skew": {5: 5.0},
     "model": {"n_activated_experts": 1}},
    {"name": "symmetric_exchange_pytorch_transfers", "exchange": "symmetric", "symm_torch": True, "accum": 2,
     "capacity_factor": 0.75},
]

CASES_4 = [
    {"name": "softmax_top2_shared"},
    {"name": "sigmoid_group_limited", "model": {"score_func": "sigmoid", "n_expert_groups": 4,
                                                "n_limited_groups": 2}},
    {"name": "capacity_probs_accum_adamw", "capacity_factor": 0.5, "accum": 2, "optim": "adamw"},
    {"name": "ranks_1_3_receive_zero_tokens", "skew": {0: 5.0, 1: 5.0, 4: 5.0, 5: 5.0}},
    {"name": "all_tokens_to_one_expert_no_shared", "skew": {6: 5.0},
     "model": {"n_activated_experts": 1, "n_shared_experts": 0}},
    {"name": "per_expert_exchange_sigmoid_accum_adamw", "exchange": "per_expert", "accum": 2, "optim": "adamw",
     "model": {"score_func": "sigmoid"}},
    {"name": "pipelined_exchange_group_limited_capacity", "exchange": "pipelined", "chunks": 3,
     "capacity_factor": 0.5, "model": {"score_func": "sigmoid", "n_expert_groups": 4, "n_limited_groups": 2}},
    {"name": "symmetric_exchange_sigmoid_capacity_accum", "exchange": "symmetric", "capacity_factor": 0.5,
     "accum": 2, "model": {"score_func": "sigmoid", "n_expert_groups": 4, "n_limited_groups": 2}},
    {"name": "symmetric_exchange_ranks_1_3_zero_tokens", "exchange": "symmetric",
     "skew": {0: 5.0, 1: 5.0, 4: 5.0, 5: 5.0}},
]


@pytest.mark.timeout(300)
def test_ep2_matches_single_process():
    out = run_workers(workers.run_equivalence_cases, 2, [(1, 2)], CASES_2, timeout=280)
    by_name = {s["name"]: s for s in out[0]}
    assert set(by_name) == {c["name"] for c in CASES_2}
    assert all(d > 0 for d in by_name["capacity_probs"]["dropped"])
    assert all(d == 0 for d in by_name["softmax_top2_shared"]["dropped"])


@pytest.mark.timeout(400)
def test_ep4_and_dp2_ep2_match_single_process():
    out = run_workers(workers.run_equivalence_cases, 4, [(1, 4), (2, 2)], CASES_4, timeout=380)
    assert len(out[0]) == 2 * len(CASES_4)
