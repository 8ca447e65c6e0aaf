"""benchmarks/kernel_resources.py: the FP8 with-transpose quantisers compiled for sm_90 on this CPU machine (Triton's
compiler and bundled ptxas; nothing runs). Guards what the tenth session measured as the cause of their slowness:
the transposition must go through ldmatrix on the 16-bit input, never byte-wise shared-memory loads of fp8."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_resources.py"), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)


def test_with_transpose_quantisers_on_sm90():
    r = _run("--warps", "4", "8", "--ch", "128")
    if r.returncode == 2 and ("tools are missing" in r.stderr or "compiler API" in r.stderr):
        pytest.skip(r.stderr.strip().splitlines()[-1])   # a Triton without the sm_90 toolchain: nothing to check
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line for line in r.stdout.splitlines() if re.match(r"\s*quant_1x128_t(_grouped)?\s+\d", line)]
    assert len(rows) == 4, r.stdout
    for row in rows:
        name, warps, ch, regs, spill, blocks, wsm = row.split()[:7]
        warps, regs, blocks, wsm = int(warps), int(regs), int(blocks), int(wsm)
        assert 0 < regs <= 255 and int(spill) == 0 and ch == "128"
        assert 1 <= blocks <= 64 // warps and wsm == blocks * warps
        assert re.search(r"ldmatrix\S*\.trans\S*\.b16", row)          # the transpose on 16-bit data
        assert "ld.shared.b8" not in row and "ld.shared.u8" not in row      # no byte-wise fp8 transposition
        assert "ld.global.v4" in row and "st.global.v4" in row              # 16-byte global accesses


def test_bad_pass_width_is_one_line_exit_2():
    r = _run("--ch", "48")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == "kernel_resources: kernels.fp8_quant.CFG: chunk 48 must be 16, 32, 64 or 128"
