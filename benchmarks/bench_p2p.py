"""How fast can token rows cross NVLink without NCCL? A probe for issue 3's next step (GPU only, 2+ ranks).

    torchrun --standalone --nproc-per-node 2 benchmarks/bench_p2p.py [--mb 201] [--reps 20] [--backend NVSHMEM]

The dispatch target (<= 1.25x a raw all_to_all_single) is limited by what surrounds NCCL's transfer: a host
sync for the split sizes and the local passes. A DeepEP-style dispatch would have each rank's kernel write
its rows straight into the peers' receive buffers (symmetric memory), placed and in expert order, with no
host sync. This probe measures the transport such a kernel would use against NCCL, for the bytes one rank
sends to the others in the benchmark of bench_ep.py (16384 tokens x top-6 x 2048 bf16 over 2 ranks: ~201 MB
leave each rank each way):

  nccl      dist.all_to_all_single with equal splits of the whole buffer (what bench_ep.py calls raw)
  p2p_copy  symmetric memory (torch.distributed._symmetric_memory, --backend CUDA or NVSHMEM): each rank copies its
            rows for every peer into that peer's buffer with one copy_ per peer (SM copy kernels writing
            over NVLink), then a barrier; the rows for itself are copied locally
  vdev      torch.ops.symm_mem.all_to_all_vdev (split sizes on the device), with --backend NVSHMEM

and, with --backend CUDA, a prototype of the fused dispatch (forward only, not used by the trainer):

  fused_dispatch   bench_ep.py's routing (16384 tokens x top-6 of 64 experts, 2048 bf16): counts all-gathered,
                   each copy's destination (rank, expert-major row) computed on the device
                   (moetrain.parallel.symm_exchange.destinations), then ONE Triton kernel (kernels.p2p.push_rows)
                   reads every token once and stores its K copies straight into the destination ranks'
                   symmetric receive buffers, between two barriers; checked equal to the pipelined exchange's
                   expert-major rows (chunks=1) and timed against that dispatch alone and a raw all_to_all of
                   the same rows one way

Rank 0 prints ms and GB/s (bytes leaving one rank / time) per method; every method's result is checked
against NCCL's before it is timed. Sets NCCL_NVLS_ENABLE=0 and the multicast switches off like bench_ep.py.
Not part of CI.
"""
from __future__ import annotations

import os

os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
os.environ["NVSHMEM_DISABLE_NVLS"] = "1"

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def fused_dispatch_probe(a, rank: int, world: int, dev, group_name: str, reps: int) -> dict:
    """The fused-dispatch prototype (see the module docstring); returns ms and the check."""
    import torch.distributed._symmetric_memory as symm_mem
    from kernels.p2p import push_rows
    from kernels.permute import RowOps
    from moetrain.parallel.expert_parallel import A2AMeter, AllToAllDispatcher
    from moetrain.parallel.symm_exchange import destinations

    N, K, E, D = 16384, 6, 64, 2048
    El = E // world
    g = torch.Generator().manual_seed(100 + rank)
    ids = torch.rand(N, E, generator=g).topk(K, dim=-1)[1].to(dev)
    w = torch.rand(N, K, generator=g).to(dev)
    x = torch.randn(N, D, device=dev, dtype=torch.bfloat16)
    disp = AllToAllDispatcher(E, dist.group.WORLD, meter=A2AMeter(), exchange="pipelined", chunks=1)
    disp.row_ops = RowOps

    def pipelined_dispatch():
        with torch.no_grad():
            return disp.wait(disp.dispatch(x, ids, w))[0]

    em_ref = pipelined_dispatch()
    buf = symm_mem.empty((world * N * K, D), dtype=torch.bfloat16, device=dev)
    hdl = symm_mem.rendezvous(buf, group_name)
    delta = torch.tensor([(p - buf.data_ptr()) // buf.element_size() for p in hdl.buffer_ptrs], dtype=torch.int64,
                         device=dev)
    c_all = torch.empty(world, E, dtype=torch.int64, device=dev)

    def fused():
        counts, _, row_of = RowOps.routing(ids, E)
        dist.all_gather_into_tensor(c_all, counts)
        rank_of, row_of_dest = destinations(ids, row_of, counts, c_all, rank, E)
        hdl.barrier(channel=0)       # every peer is done with its receive buffer
        push_rows(x, None, rank_of, row_of_dest, delta, buf)
        hdl.barrier(channel=0)       # every peer's rows have landed here
        return c_all.sum(0).view(world, El)[rank].sum()

    M = int(fused())
    torch.cuda.synchronize()
    ok = M == em_ref.shape[0] and torch.equal(buf[:M], em_ref)
    send = torch.randn(N * K, D, device=dev, dtype=torch.bfloat16)
    recv = torch.empty_like(send)
    out = {"rows_received": M, "equal_to_pipelined": bool(ok),
           "fused_ms": _time(fused, reps), "pipelined_dispatch_ms": _time(pipelined_dispatch, reps),
           "raw_a2a_one_way_ms": _time(lambda: dist.all_to_all_single(recv, send), reps)}
    return out


def _time(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        dist.barrier()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=201.0, help="MB each rank sends to the others (default %(default)s)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--backend", choices=["CUDA", "NVSHMEM"], default="CUDA", help="symmetric-memory backend")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_p2p: needs CUDA GPUs", file=sys.stderr)
        return 2
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl", device_id=torch.device("cuda", torch.cuda.current_device()))
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cuda", torch.cuda.current_device())  # an index: NVSHMEM's allocator needs one
    D = 2048
    rows_per_peer = int(a.mb * 1e6 / (D * 2) / max(world - 1, 1))
    n = rows_per_peer * world
    x = torch.randn(n, D, device=dev, dtype=torch.bfloat16) + rank
    ref = torch.empty_like(x)
    dist.all_to_all_single(ref, x)
    res = {}

    def nccl():
        dist.all_to_all_single(ref, x)

    res["nccl"] = _time(nccl, a.reps)
    group_name = dist.group.WORLD.group_name
    import torch.distributed._symmetric_memory as symm_mem
    if a.backend != "CUDA":  # CUDA is the default (torch 2.11 has no allocation backend named "CUDA" to set)
        symm_mem.set_backend(a.backend)
    try:
        buf = symm_mem.empty((n, D), dtype=torch.bfloat16, device=dev)
        hdl = symm_mem.rendezvous(buf, group_name)
        peers = {r: hdl.get_buffer(r, (n, D), torch.bfloat16) for r in range(world)}

        def p2p_copy():
            hdl.barrier(channel=0)  # the peers have finished reading their buffers
            for j in range(world):
                r = (rank + j) % world  # every rank starts with a different peer
                peers[r][rank * rows_per_peer:(rank + 1) * rows_per_peer].copy_(
                    x[r * rows_per_peer:(r + 1) * rows_per_peer])
            hdl.barrier(channel=0)  # every peer's rows have landed here

        p2p_copy()
        torch.cuda.synchronize()
        if not torch.equal(buf, ref):
            raise AssertionError("p2p_copy: received rows differ from NCCL's")
        res["p2p_copy"] = _time(p2p_copy, a.reps)
    except Exception as e:  # noqa: BLE001 - a probe: report and go on
        res["p2p_copy"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    try:
        if a.backend != "NVSHMEM":
            raise RuntimeError("needs --backend NVSHMEM")
        inp = symm_mem.empty((n, D), dtype=torch.bfloat16, device=dev)
        out = symm_mem.empty((n, D), dtype=torch.bfloat16, device=dev)
        splits = symm_mem.empty(world, dtype=torch.int64, device=dev)
        so = symm_mem.empty((2, world), dtype=torch.int64, device=dev)
        inp.copy_(x)
        splits.fill_(rows_per_peer)

        def vdev():
            torch.ops.symm_mem.all_to_all_vdev(inp, out, splits, so, group_name)

        vdev()
        torch.cuda.synchronize()
        if not torch.equal(out, ref):
            raise AssertionError("vdev: received rows differ from NCCL's")
        res["vdev"] = _time(vdev, a.reps)
    except Exception as e:  # noqa: BLE001
        res["vdev"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    fused = None
    if a.backend == "CUDA":
        try:
            fused = fused_dispatch_probe(a, rank, world, dev, group_name, a.reps)
        except Exception as e:  # noqa: BLE001
            fused = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
    if rank == 0:
        sent = rows_per_peer * (world - 1) * D * 2
        print(f"{world} ranks, {sent / 1e6:.0f} MB leave each rank ({n} rows x {D} bf16 in all), "
              f"symmetric-memory backend {a.backend}")
        for k, v in res.items():
            if isinstance(v, str):
                print(f"  {k:<9} {v}")
            else:
                print(f"  {k:<9} {v:7.3f} ms  {sent / v / 1e6:7.1f} GB/s  ({v / res['nccl']:.2f}x nccl)")
        if isinstance(fused, dict):
            raw = fused["raw_a2a_one_way_ms"]
            print(f"fused dispatch prototype (16384 x top-6 of 64 experts x 2048 bf16; {fused['rows_received']} rows "
                  f"received here; equal to the pipelined exchange's rows: {fused['equal_to_pipelined']}):\n"
                  f"  fused {fused['fused_ms']:.3f} ms ({fused['fused_ms'] / raw:.2f}x raw), pipelined dispatch "
                  f"(Triton rows, 1 chunk) {fused['pipelined_dispatch_ms']:.3f} ms "
                  f"({fused['pipelined_dispatch_ms'] / raw:.2f}x raw), raw all_to_all one way {raw:.3f} ms")
        elif fused is not None:
            print(f"fused dispatch prototype {fused}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
