"""benchmarks/profile_step.py: the category rules and per-step summary on made-up ops, and ``--smoke --cpu`` end to end
(tiny config, each default variant in its own process, 1 warm-up + 1 profiled step: ~15 s on 2 cores)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.trainer_runs import ROOT, clean_env, load_benchmark


@pytest.fixture(scope="module")
def ps():
    return load_benchmark("profile_step")


@pytest.mark.parametrize("name, cat", [
    ("ncclDevKernel_AllToAll_RING_LL", "NCCL/communication"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", "attention"),
    ("fmha_cutlassB_bf16_aligned_64x64_k128_sm80", "attention"),
    ("_mla_attn_bwd_dkdv_kernel", "attention"),
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT", "GEMM"),
    ("sm90_xmma_gemm_e4m3bf16_e4m3f32_f32_tn_n_tilesize128x128x128", "GEMM"),
    ("_fp8_gemm_grouped_kernel", "GEMM"),
    ("_fp8_wgrad_grouped_kernel", "GEMM"),
    ("aten::mm", "GEMM"),
    ("_quant_1x128_t_kernel", "FP8 quantisation"),
    ("_rmsnorm_bwd_kernel", "Triton rmsnorm"),
    ("_rope_kernel", "Triton rope"),
    ("_swiglu_fwd_kernel", "Triton swiglu"),
    ("_router_fwd_kernel", "Triton router"),
    ("_gather_sum_kernel", "Triton permute"),
    ("_unpermute_bwd_kernel", "Triton permute"),
    ("void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer"),
    ("Memcpy HtoD (Pageable -> Device)", "memcpy/memset"),
    ("aten::permute", "elementwise/other"),
    ("void at::native::vectorized_elementwise_kernel<4, CUDAFunctor_add<float>>", "elementwise/other"),
])
def test_category_rules(ps, name, cat):
    assert ps.category_of(name) == cat


def test_summary_per_step(ps):
    assert ps.union_us([(0, 10), (5, 12), (20, 25)]) == 17
    ops = [("aten::mm", 3000.0), ("aten::mm", 1000.0), ("_rope_kernel", 500.0), ("aten::add", 500.0)] * 2
    s = ps.summarize(ops, busy_us=8000.0, wall_ms=10.0, n_steps=2)
    assert s["top"][0] == {"name": "aten::mm", "calls": 2.0, "ms": 4.0, "pct": 40.0, "category": "GEMM"}
    assert s["categories"]["GEMM"]["ms"] == pytest.approx(4.0)
    assert s["categories"]["Triton rope"]["ms"] == pytest.approx(0.5)
    assert s["categories"]["elementwise/other"]["ms"] == pytest.approx(0.5)
    assert s["busy_ms"] == pytest.approx(4.0)
    assert s["categories"]["idle/host gaps"]["ms"] == pytest.approx(6.0)
    assert set(s["categories"]) == set(ps.CATEGORY_NAMES)


def test_smoke_cpu(tmp_path, ps):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "profile_step.py"), "--smoke", "--cpu",
                           "--out", str(out), "--work", str(tmp_path / "work"), "--deadline-s", "50"],
                          cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=55)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    (path,) = out.glob("profile_*.json")
    data = json.loads(path.read_text())
    assert data["categories"] == list(ps.CATEGORY_NAMES)
    assert [v["variant"] for v in data["variants"]] == list(ps.SMOKE_VARIANTS)
    for v in data["variants"]:
        assert v["status"] == "ok", v
        assert v["step_ms"] > 0 and v["busy_ms"] > 0
        assert set(v["categories"]) == set(ps.CATEGORY_NAMES)
        assert v["categories"]["GEMM"]["ms"] > 0  # aten::mm on CPU
        assert v["categories"]["idle/host gaps"]["ms"] >= 0
        assert 0 < len(v["top"]) <= 25 and all(r["ms"] >= 0 and r["calls"] > 0 for r in v["top"])
        assert Path(v["trace"]).is_file() and Path(v["trace"]).stat().st_size > 0
    assert "fp8-rowwise" in proc.stdout and "idle/host gaps" in proc.stdout


def test_cuda_kernel_extraction_from_kineto_events(ps):
    """The GPU path (no GPU in CI): kernels and memcpys count, record_function ranges mirrored on the GPU timeline
    and synchronisation waits do not; overlapping kernels (two streams) count once in the busy time."""
    from torch.autograd import DeviceType

    class Ev:
        def __init__(self, name, dev, start_us, dur_us, act, annot=False):
            self._v = (name, dev, int(start_us * 1000), int(dur_us * 1000), act, annot)

        def name(self): return self._v[0]
        def device_type(self): return self._v[1]
        def start_ns(self): return self._v[2]
        def duration_ns(self): return self._v[3]
        def activity_type(self): return self._v[4]
        def is_user_annotation(self): return self._v[5]

    cpu, gpu = DeviceType.CPU, DeviceType.CUDA
    evs = [Ev("profile_step/0", cpu, 0, 100, "user_annotation", True),
           Ev("Optimizer.step#AdamW.step", cpu, 80, 10, "user_annotation", True),
           Ev("aten::mm", cpu, 1, 5, "cpu_op"), Ev("cudaLaunchKernel", cpu, 2, 1, "cuda_runtime"),
           Ev("profile_step/0", gpu, 0, 100, "gpu_user_annotation"),
           Ev("Optimizer.step#AdamW.step", gpu, 80, 10, "kernel"),  # a mirrored range, whatever its type says
           Ev("Context Sync", gpu, 0, 100, "cuda_sync"),
           Ev("nvjet_tst_gemm", gpu, 10, 20, "kernel"), Ev("ncclDevKernel_AllToAll", gpu, 20, 20, "kernel"),
           Ev("Memcpy HtoD (Pageable -> Device)", gpu, 50, 5, "gpu_memcpy")]
    prof = type("P", (), {})()
    prof.profiler = type("A", (), {})()
    prof.profiler.kineto_results = type("R", (), {"events": lambda self: evs})()
    ops, busy = ps._kineto_cuda_ops(prof)
    assert sorted(n for n, _ in ops) == ["Memcpy HtoD (Pageable -> Device)", "ncclDevKernel_AllToAll", "nvjet_tst_gemm"]
    assert busy == pytest.approx(35.0)  # [10, 40) + [50, 55)
    s = ps.summarize(ops, busy, wall_ms=0.1, n_steps=1)
    assert s["categories"]["GEMM"]["ms"] == pytest.approx(0.02)
    assert s["categories"]["NCCL/communication"]["ms"] == pytest.approx(0.02)
    assert s["categories"]["idle/host gaps"]["ms"] == pytest.approx(0.065)
