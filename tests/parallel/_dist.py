"""Spawn helper for the distributed CPU tests: N gloo processes, each with a deadline.

``run_workers(fn, world_size, *args, timeout=...)`` starts ``world_size`` processes (``spawn``), each of
which joins a gloo process group (file:// rendezvous in a fresh temp dir, 120 s collective timeout), runs
``fn(rank, world_size, *args)`` and reports its return value or traceback. The parent fails the test if
any rank raises (then kills the others at once), exits without reporting, or the whole run exceeds
``timeout`` seconds (a hang becomes a failure, never a stuck CI job). ``fn`` must be a module-level
function (spawn pickles it by reference).
"""
from __future__ import annotations

import datetime
import os
import queue as queue_mod
import tempfile
import time
import traceback

import torch
import torch.multiprocessing as mp


def _entry(fn, rank, world_size, init_file, q, args):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    import torch.distributed as dist
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=120))
        out = fn(rank, world_size, *args)
        q.put((rank, True, out))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        q.put((rank, False, traceback.format_exc()))
    finally:
        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass


def run_workers(fn, world_size: int, *args, timeout: float = 120.0) -> list:
    """Runs ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; returns the results by rank.

    Raises:
        AssertionError: a rank failed (its traceback is in the message), died, or the run timed out.
    """
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_entry, args=(fn, r, world_size, init_file, q, args), daemon=True)
                 for r in range(world_size)]
        for p in procs:
            p.start()
        results: dict = {}
        deadline = time.monotonic() + timeout
        failure = None
        try:
            while len(results) < world_size and failure is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    failure = f"timed out after {timeout:.0f}s (ranks done: {sorted(results)})"
                    break
                try:
                    rank, ok, out = q.get(timeout=min(left, 1.0))
                except queue_mod.Empty:
                    dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results]
                    if dead:
                        failure = f"rank(s) {dead} died (exit codes {[procs[r].exitcode for r in dead]})"
                    continue
                if not ok:
                    failure = f"rank {rank} failed:\n{out}"
                results[rank] = out
        finally:
            for p in procs:
                p.join(timeout=10 if failure is None else 0.1)
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join(timeout=5)
        if failure:
            raise AssertionError(failure)
        return [results[r] for r in range(world_size)]
