"""What a Triton kernel costs on Hopper in registers and memory instructions, found without a GPU.

    python benchmarks/kernel_resources.py                          # the FP8 with-transpose quantisers, their CFG
    python benchmarks/kernel_resources.py --warps 4 8 --ch 32 128  # other launch configs

Each kernel is compiled by Triton's own compiler for an sm_90 target (H100 / H200), as a launch there would compile
it: pointer and integer arguments marked divisible by 16 and unit strides as constants (the specialisations a launch
of contiguous tensors gets), Triton's bundled ptxas and its options. The cubin it produces is read with the bundled
``cuobjdump -res-usage``. Printed per kernel and config: registers per thread, local memory (spills), the thread blocks
per SM that the register file allows (65,536 registers; the warps per SM that gives), and the memory instructions of
the PTX by kind: global loads / stores by vector width, shared-memory loads by width (one-byte ones mark an fp8
transposition done byte by byte), ldmatrix. This is how the tenth session found why the with-transpose quantiser ran
at half of a copy's bandwidth (249 registers and 128 one-byte shared loads per thread; benchmarks/README.md).

Only a compile: nothing runs, so the numbers are the compiler's (this machine's Triton, which may differ from the
GPU machine's: Triton 3.9 here, 3.6 on the H200s so far), not timings. Exit 2 with one line when the installed Triton
has no NVIDIA backend tools (ptxas / cuobjdump) or lacks the compiler API used.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)   # compile for the GPU even where the tests set the interpreter
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")   # Triton's current default, stated (silences its warning)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REGISTERS_PER_SM = 65536
MAX_WARPS_PER_SM = 64


class ToolsMissing(RuntimeError):
    """This Triton cannot compile for sm_90 here (no NVIDIA backend tools, or an older compiler API)."""


def _tools():
    try:
        from triton import knobs
        return knobs.nvidia.cuobjdump.path
    except Exception as e:  # noqa: BLE001  the lookup raises where the backend ships no binaries
        raise ToolsMissing(f"Triton's NVIDIA tools are missing ({type(e).__name__}: {e})") from None


def compile_sm90(fn, signature: dict, constexprs: dict, num_warps: int, unit: tuple = ()):
    """Compile JIT function ``fn`` for cuda:90. ``signature``: argument name -> Triton type ("*bf16", "i32", ...);
    ``unit``: integer arguments that a launch passes as 1 (made constants); every other pointer / integer argument is
    marked divisible by 16. Returns Triton's compiled kernel (``.asm["ptx"]``, ``.asm["cubin"]``)."""
    import triton
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as e:
        raise ToolsMissing(f"this Triton ({triton.__version__}) lacks the compiler API used here: {e}") from None

    sig, cx = dict(signature), dict(constexprs)
    for n in unit:
        sig[n], cx[n] = "constexpr", 1
    sig.update({k: "constexpr" for k in constexprs})
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if n in sig and sig[n] != "constexpr" and (sig[n].startswith("*") or sig[n] == "i32")}
    src = ASTSource(fn=fn, signature=sig, constexprs=cx, attrs=attrs)
    try:
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))
    except (FileNotFoundError, RuntimeError) as e:
        if "ptxas" in str(e) or isinstance(e, FileNotFoundError):
            raise ToolsMissing(f"Triton could not run ptxas ({type(e).__name__}: {str(e)[:200]})") from None
        raise


def resources(compiled, num_warps: int) -> dict:
    """Registers, local memory (bytes per thread), blocks and warps per SM by registers, PTX memory instructions."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "k.cubin"
        path.write_bytes(compiled.asm["cubin"])
        out = subprocess.run([_tools(), "-res-usage", str(path)], capture_output=True, text=True, check=True).stdout
    res = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out)}
    regs = res.get("REG", 0)
    threads = 32 * num_warps
    # registers are allocated per warp in units of 256 (8 per thread)
    per_block = -(-regs // 8) * 8 * threads
    blocks = min(REGISTERS_PER_SM // per_block if per_block else 0, MAX_WARPS_PER_SM // num_warps)
    ops = collections.Counter(re.findall(r"\b(ld\.global(?:\.[a-z0-9]+)*|st\.global(?:\.[a-z0-9]+)*|"
                                         r"ld\.shared(?:\.[a-z0-9]+)*|st\.shared(?:\.[a-z0-9]+)*|ldmatrix[a-z0-9.]*)",
                                         compiled.asm["ptx"]))
    return dict(registers=regs, stack_bytes=res.get("STACK", 0), blocks_per_sm=blocks, warps_per_sm=blocks * num_warps,
                ops=dict(sorted(ops.items())))


def fp8_quant_t_kernels():
    """(name, jit function, signature, unit-stride arguments, constexprs other than the tunables) of the FP8
    with-transpose quantisers, bf16 input, as ``kernels.fp8_quant`` launches them."""
    import kernels.fp8_quant as fq

    i32 = "i32"
    dense = dict(x_ptr="*bf16", q_ptr="*fp8e4nv", s_ptr="*fp32", qt_ptr="*fp8e4nv", st_ptr="*fp32", M=i32, K=i32,
                 stride_xm=i32, stride_xk=i32, stride_qm=i32, stride_sm=i32, stride_sk=i32, stride_qtk=i32,
                 stride_stk=i32, stride_stm=i32)
    grouped = dict(x_ptr="*bf16", q_ptr="*fp8e4nv", s_ptr="*fp32", qt_ptr="*fp8e4nv", st_ptr="*fp32", ts_ptr="*i32",
                   te_ptr="*i32", tg_ptr="*i32", gts_ptr="*i32", K=i32, E=i32, T=i32, stride_xm=i32, stride_xk=i32,
                   stride_qm=i32, stride_sm=i32, stride_sk=i32, stride_qtk=i32, stride_stk=i32, stride_stt=i32)
    return [("quant_1x128_t", fq._quant_1x128_t_kernel, dense, ("stride_xk", "stride_sk", "stride_stm"),
             dict(EXACT_CAST=False, K_FASTEST=True), "t"),
            ("quant_1x128_t_grouped", fq._quant_1x128_t_grouped_kernel, grouped, ("stride_xk", "stride_stk"),
             dict(EXACT_CAST=False, K_FASTEST=True, GROUP_MAJOR=True), "tg")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--warps", type=int, nargs="+", default=None, help="num_warps (default: kernels.fp8_quant.CFG's)")
    p.add_argument("--ch", type=int, nargs="+", default=None, help="rows / columns per pass (default: CFG's)")
    a = p.parse_args(argv)
    bad = [w for w in a.warps or [] if w not in (1, 2, 4, 8, 16, 32)]
    if bad:
        raise ValueError(f"--warps {bad[0]}: num_warps must be a power of two from 1 to 32")
    import kernels.fp8_quant as fq

    print(f"{'kernel':>22s} {'warps':>5s} {'ch':>4s} {'regs':>5s} {'spill B':>7s} {'blocks/SM':>9s} "
          f"{'warps/SM':>8s}  memory instructions in the PTX")
    for name, fn, sig, unit, cx, suffix in fp8_quant_t_kernels():
        for warps in a.warps or [fq.CFG[f"warps_{suffix}"]]:
            for ch in a.ch or [fq.CFG[f"ch_{suffix}"]]:
                r = resources(compile_sm90(fn, sig, dict(cx, CH=fq._chunk(ch)), warps, unit), warps)
                ops = ", ".join(f"{k} x{v}" for k, v in r["ops"].items())
                print(f"{name:>22s} {warps:5d} {ch:4d} {r['registers']:5d} {r['stack_bytes']:7d} "
                      f"{r['blocks_per_sm']:9d} {r['warps_per_sm']:8d}  {ops}", flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, ToolsMissing) as e:   # a bad --ch, or no sm_90 toolchain in this Triton
        print(f"kernel_resources: {e}", file=sys.stderr)
        sys.exit(2)
