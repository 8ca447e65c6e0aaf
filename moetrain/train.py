"""Train a DeepSeek-style MoE language model.

    python -m moetrain.train [--config FILE] [key=value ...]
    torchrun --nproc-per-node N -m moetrain.train [--config FILE] [key=value ...]

The batch is global (``train.batch_size`` sequences per optimizer step, split over all ranks and
micro-batches), so a run at any world size sees the same samples at each step. User mistakes print one
``error:`` line and exit with code 2; SIGTERM/SIGINT/SIGUSR1 stop cleanly after a checkpoint.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch.distributed.checkpoint.api import CheckpointException
from omegaconf import DictConfig, OmegaConf

from moetrain import checkpoint as ckpt
from moetrain.config import ConfigError, load_config, model_args, resolved_yaml, save_config, validate_layout
from moetrain.data import DataError
from moetrain.data.dataset import TokenWindows, check_vocab, open_dataset
from moetrain.data.prepare import ensure_prepared
from moetrain.data.sampler import ResumableSampler, shard
from moetrain.economics import CostMeter, resolve_pricing, restart_loss
from moetrain.energy import open_energy_meter
from moetrain.metrics import JsonlSink, MetricLogger, TensorBoardSink, WandbSink, write_run_metadata
from moetrain.model.args import flops_per_token, kv_cache_per_token, param_counts
from moetrain.model.transformer import Transformer
from moetrain.parallel.mesh import DistContext, all_reduce_sum, build_mesh, init_distributed, shutdown
from moetrain.parallel.expert_parallel import A2A_METER, moe_telemetry
from moetrain.parallel.engine import build_engine
from moetrain.parallel.parallelize import UnavailableFeature, parallelize

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


#: train.* keys that shape the learning-rate schedule: a resume that changes one says so.
SCHEDULE_KEYS = ("steps", "lr", "warmup_steps", "min_lr_ratio")

class UserError(Exception):
    """A mistake the user can fix; printed as one line, exit code 2."""


def lr_at(step: int, cfg: DictConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then cosine/linear/constant
    decay to ``lr * min_lr_ratio`` at ``train.steps``."""
    t = cfg.train
    if t.warmup_steps and step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.decay == "constant":
        return t.lr
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if t.decay == "cosine" else 1.0 - progress
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * shape)


THROUGHPUT_KEYS = ("perf/tokens_per_s", "perf/model_tflops", "perf/mfu")


def _no_throughput(report: dict) -> dict:
    """A meter report without the throughput keys: an evaluation (or the final) report's window trained no
    tokens, and a logged 0 tokens/s would dip every tokens/s chart and overwrite W&B's last training value."""
    return {k: v for k, v in report.items() if k not in THROUGHPUT_KEYS}


def build_optimizer(model: torch.nn.Module, cfg: DictConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on norms, biases and 1-D parameters.

    ``train.optimizer_impl``: ``auto`` takes torch's fused AdamW kernel when every parameter is a plain CUDA
    tensor (the foreach path took 80 ms of a 443 ms step of the 3.3B MoE on an H200, 18%; profile_step.py,
    2026-11-30; the fused one is torchtitan's default too) and the foreach one otherwise (CPU, FSDP's DTensors,
    the deepspeed engine);
    ``fused`` / ``foreach`` force one (``fused`` needs the parameters on a device torch's fused AdamW supports)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # parallel.fsdp with ep > 1: FSDP's DTensor parameters and the local expert shards cannot share a
    # foreach kernel (the param groups stay as they are, so checkpoints load at any layout)
    params = decay + no_decay
    mixed = len({type(p).__name__ == "DTensor" for p in params}) > 1
    impl = cfg.train.get("optimizer_impl", "auto")
    native = cfg.get("parallel", {}).get("engine", "native") == "native"  # DeepSpeed's ZeRO: not tried fused
    fused = impl == "fused" or (impl == "auto" and native and bool(params) and all(
        p.is_cuda and type(p).__name__ != "DTensor" for p in params))
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2),
                             eps=cfg.train.eps, foreach=False if fused else not mixed, fused=fused or None)


def autocast_ctx(cfg: DictConfig, device: torch.device):
    """bf16 autocast (fp32 master weights) on GPU by default; fp32 on CPU unless precision.dtype=bf16."""
    dtype = cfg.precision.dtype
    if dtype == "bf16" or (dtype == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class StopFlag:
    """Set by SIGTERM/SIGINT/SIGUSR1; checked (and agreed over ranks) at step boundaries."""

    def __init__(self):
        self.signal: Optional[int] = None
        for s in STOP_SIGNALS:
            signal.signal(s, self._handle)

    def _handle(self, signum, _frame):
        self.signal = signum

    def agreed(self, ctx: DistContext) -> bool:
        if not ctx.distributed:  # no collective, no device round trip in one process
            return self.signal is not None
        flag = torch.tensor([1.0 if self.signal is not None else 0.0], device=ctx.device)
        return bool(all_reduce_sum(flag).item() > 0)


class Trainer:
    def __init__(self, cfg: DictConfig, ctx: DistContext):
        self.started_at = time.perf_counter()  # start-up is charged from here
        self.cfg, self.ctx = cfg, ctx
        self.run_dir = Path(cfg.run.dir)
        self.dp, self.ep = validate_layout(cfg, ctx.world_size)
        build_mesh(ctx, self.dp, self.ep)
        self.micro = cfg.train.micro_batch_size or cfg.train.batch_size // ctx.world_size
        self.accum = cfg.train.batch_size // (ctx.world_size * self.micro)
        self._setup_data()
        self._setup_model()
        self._setup_meter()
        self.stop = StopFlag()
        self.step = 0
        self.logger = MetricLogger([])
        self.wandb_id: Optional[str] = None

    # ----- set-up -------------------------------------------------------------------------------
    def _setup_data(self) -> None:
        cfg = self.cfg
        if cfg.data.prepared_dir:
            data_dir = Path(cfg.data.prepared_dir)
        else:
            cache = Path(os.path.expanduser(cfg.data.cache_dir))
            if self.ctx.is_main:
                data_dir = ensure_prepared(cfg.data.corpus, cache, cfg.data.tokenizer, cfg.data.val_fraction)
            self._barrier()
            if not self.ctx.is_main:
                data_dir = ensure_prepared(cfg.data.corpus, cache, cfg.data.tokenizer, cfg.data.val_fraction)
        self.data_dir = data_dir
        self.train_data: TokenWindows = open_dataset(data_dir, "train", cfg.train.seq_len, shifted=True)
        self.val_data: TokenWindows = open_dataset(data_dir, "val", cfg.train.seq_len)
        self.meta = self.train_data.meta
        if len(self.train_data) < cfg.train.batch_size:
            raise DataError(f"{data_dir}: train split has {len(self.train_data)} windows of train.seq_len="
                            f"{cfg.train.seq_len}, fewer than train.batch_size={cfg.train.batch_size}; "
                            f"lower train.batch_size or train.seq_len")
        self.sampler = ResumableSampler(len(self.train_data), cfg.train.batch_size, cfg.run.seed,
                                        n_shifts=self.train_data.n_shifts)

    def _setup_model(self) -> None:
        cfg = self.cfg
        args = model_args(cfg)
        if cfg.model.vocab_size is None:
            args.vocab_size = int(self.meta["vocab_size"])
        check_vocab(self.meta, args.vocab_size)
        self.args = args
        torch.manual_seed(cfg.run.seed)
        with torch.device(self.ctx.device):
            model = Transformer(args)
        model.init_weights()
        try:
            self.model, self.raw_model, self.grad_sync = parallelize(model, cfg, self.ctx)
            # the engine seam (moetrain.parallel.engine): backward, optimizer step, clipping, checkpoints
            self.engine = build_engine(cfg, self.ctx, self.model, self.raw_model, build_optimizer(self.raw_model, cfg),
                                       self.grad_sync, self.micro, self.accum)
        except UnavailableFeature as e:
            raise UserError(str(e)) from None
        self.model, self.optimizer = self.engine.model, self.engine.optimizer
        self.flops_per_token = flops_per_token(args, cfg.train.seq_len, training=True)

    def _setup_meter(self) -> None:
        cfg, dev = self.cfg, self.ctx.device
        name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
        try:
            pricing = resolve_pricing(dev.type, name, cfg.cost.gpu_type, cfg.cost.gpu_hour_usd,
                                      cfg.cost.cpu_core_hour_usd, torch.get_num_threads())
        except ValueError as e:
            raise ConfigError(str(e)) from None
        reduce = None  # energy is summed over the ranks' GPUs (collective: every rank reports)
        if dev.type == "cuda" and self.ctx.distributed:
            reduce = lambda xs: all_reduce_sum(torch.tensor(xs, dtype=torch.float64, device=dev)).tolist()  # noqa: E731
        self.meter = CostMeter(pricing, self.ctx.world_size, self.flops_per_token,
                               energy=open_energy_meter(dev), kwh_usd=cfg.cost.kwh_usd, reduce_sum=reduce,
                               total_steps=cfg.train.steps, target_loss=cfg.cost.target_loss,
                               started_at=self.started_at)

    def _barrier(self) -> None:
        if self.ctx.distributed:
            torch.distributed.barrier()

    def _setup_logging(self) -> None:
        if not self.ctx.is_main:
            return
        cfg = self.cfg
        sinks: list = [JsonlSink(self.run_dir)]
        if cfg.logging.wandb != "disabled":
            name = cfg.run.name or self.run_dir.name
            sinks.append(WandbSink(self.run_dir, cfg.logging.project, name,
                                   OmegaConf.to_container(cfg, resolve=True), cfg.logging.wandb, self.wandb_id,
                                   hours_key="cost/gpu_hours" if self.meter.pricing.unit == "gpu"
                                   else "cost/cpu_core_hours"))
            self.wandb_id = sinks[-1].run_id
        if cfg.logging.tensorboard:
            sinks.append(TensorBoardSink(self.run_dir))
        self.logger = MetricLogger(sinks)

    def describe(self) -> str:
        """The start-up summary: model size, FLOPs, KV cache, layout, data, pricing."""
        a, c = self.args, param_counts(self.args)
        kv = kv_cache_per_token(a)
        p = self.meter.pricing
        lines = [
            f"model   {self.cfg.model.flavor}: {c['total'] / 1e6:,.2f}M params, {c['activated'] / 1e6:,.2f}M "
            f"activated per token; {a.n_layers} layers ({a.n_dense_layers} dense), {a.n_routed_experts} routed "
            f"experts top-{a.n_activated_experts} + {a.n_shared_experts} shared",
            f"flops   {self.flops_per_token / 1e6:,.2f} MFLOPs/token (training, seq {self.cfg.train.seq_len})",
            f"kv      MLA cache {kv['mla_bytes']:,} B/token vs MHA {kv['mha_bytes']:,} B/token "
            f"({100 * (1 - kv['mla_bytes'] / kv['mha_bytes']):.1f}% smaller)",
            f"layout  world {self.ctx.world_size} = dp {self.dp} x ep {self.ep} on {self.ctx.device.type}; "
            f"global batch {self.cfg.train.batch_size} = {self.ctx.world_size} ranks x {self.accum} micro x "
            f"{self.micro} seqs of {self.cfg.train.seq_len} tokens"
            + ("" if self.engine.name == "native" else f"; engine {self.engine.describe()}"),
            f"data    {self.data_dir} ({self.meta['n_train_tokens']:,} train / {self.meta['n_val_tokens']:,} val "
            f"tokens, vocab {self.meta['vocab_size']})",
            f"cost    {p.device_label} at ${p.usd_per_unit_hour:.2f}/{'GPU' if p.unit == 'gpu' else 'core'}-hour"
            + ("" if p.peak_flops_per_rank else "; MFU not reported (no known peak for this device)"),
            f"run     {self.run_dir}",
        ]
        return "\n".join(lines)

    # ----- checkpoints --------------------------------------------------------------------------
    def trainer_state(self) -> dict:
        return {"sampler": self.sampler.state_dict(), "meter": self.meter.state_dict(),
                "wandb_id": self.wandb_id, "world_size": self.ctx.world_size, "schedule": self._schedule()}

    def _schedule(self) -> dict:
        """The keys that shape the learning-rate schedule (compared on resume)."""
        return {k: self.cfg.train[k] for k in SCHEDULE_KEYS}

    def save(self) -> Path:
        with self.meter.phase("checkpoint"):
            return self.engine.save(self.run_dir, self.step, self.trainer_state(), keep=self.cfg.checkpoint.keep)

    def maybe_resume(self) -> None:
        cfg = self.cfg
        path = None
        if cfg.resume == "auto":
            path = ckpt.latest_checkpoint(self.run_dir)
        elif cfg.resume != "never":
            path = Path(cfg.resume)
        if path is None:
            if cfg.resume == "never" and (ckpt.latest_checkpoint(self.run_dir) is not None
                                          or (self.run_dir / "metrics.jsonl").is_file()):
                raise UserError(f"resume=never: run.dir={self.run_dir} already holds a run (metrics.jsonl or "
                                f"checkpoints); continue it with resume=auto or start in a new run.dir")
            return
        try:
            state = self.engine.load(path)
            self.step = int(state["step"])
            self.sampler.load_state_dict(state["sampler"])
            self.meter.load_state_dict(state["meter"])
        except (ValueError, RuntimeError, KeyError, CheckpointException) as e:
            lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
            first = lines[-1] if lines else type(e).__name__  # DCP wraps the cause: its last line says it
            raise UserError(f"resume: {path} does not fit this run ({first}); the model, data or batch "
                            f"changed since it was saved; start it in a new run.dir") from None
        lost = restart_loss(self.run_dir / "metrics.jsonl", state["meter"])  # work done past the checkpoint
        self.meter.add_restart(lost["seconds"], lost["kwh"])
        self._barrier()  # every rank has read metrics.jsonl before rank 0 truncates it
        self.wandb_id = state.get("wandb_id")
        if self.ctx.is_main:
            _truncate_metrics(self.run_dir / "metrics.jsonl", self.step)
            print(f"resumed from {path} at step {self.step}", flush=True)
            saved = state.get("schedule") or {}
            changed = [f"train.{k} {saved[k]} -> {v}" for k, v in self._schedule().items() if k in saved and saved[k] != v]
            if changed:
                print(f"note: {', '.join(changed)} since that checkpoint; the learning-rate schedule follows the "
                      f"new values from step {self.step}", flush=True)

    # ----- steps --------------------------------------------------------------------------------
    def _loss(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = batch.to(self.ctx.device, non_blocking=True)
        inputs, targets = batch[:, :-1], batch[:, 1:]
        with autocast_ctx(self.cfg, self.ctx.device):
            logits = self.model(inputs)
        ce = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))
        return ce, self.raw_model.aux_loss()

    def train_step(self) -> dict:
        cfg = self.cfg
        lr = lr_at(self.step, cfg)
        self.engine.set_lr(lr)
        indices = self.sampler.next_indices()
        micro_batches = shard(indices, self.ctx.rank, self.ctx.world_size, self.micro)
        ce_sum = torch.zeros((), device=self.ctx.device)
        aux_sum = torch.zeros((), device=self.ctx.device)
        grad_norm = None
        for i, mb in enumerate(micro_batches):
            with self.engine.micro_batch(last=i == len(micro_batches) - 1):
                ce, aux = self._loss(self.train_data.batch(mb))
                self.engine.backward(ce + aux)  # the engine divides by the accumulation steps
            ce_sum += ce.detach()
            aux_sum += aux.detach()
            norm = self.engine.step()  # optimizer step at the accumulation boundary only: its pre-clip grad norm
            grad_norm = norm if norm is not None else grad_norm
        if grad_norm is None:
            raise RuntimeError(f"engine {self.engine.name} did not step after {len(micro_batches)} micro-batches")
        nxt = self.step + 1  # expert-load histograms on eval steps and the last step
        hist = bool(cfg.train.eval_every and nxt % cfg.train.eval_every == 0) or nxt == cfg.train.steps
        stats = moe_telemetry(self.raw_model, reduce=all_reduce_sum, hist=hist)  # world-summed loads
        self.raw_model.update_expert_biases(reduce=all_reduce_sum)
        self.step += 1
        self.meter.add_tokens(cfg.train.batch_size * cfg.train.seq_len)
        return {"lr": lr, "loss_t": ce_sum / len(micro_batches), "aux_t": aux_sum / len(micro_batches),
                "grad_norm_t": grad_norm, **stats}

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean cross-entropy (nats/token) over the first ``train.eval_batches`` global batches of val."""
        cfg = self.cfg
        self.model.eval()
        n_windows = min(len(self.val_data), cfg.train.eval_batches * cfg.train.batch_size)
        if n_windows >= cfg.train.batch_size:  # whole global batches: the same windows at every world size
            n_windows -= n_windows % cfg.train.batch_size
        per_rank = max(1, n_windows // self.ctx.world_size)
        start = self.ctx.rank * per_rank
        idx = list(range(start, min(start + per_rank, len(self.val_data))))
        total = torch.zeros(2, dtype=torch.float64, device=self.ctx.device)
        for i in range(0, len(idx), self.micro):
            chunk = idx[i:i + self.micro]
            ce, _ = self._loss(self.val_data.batch(chunk))
            total += torch.tensor([ce.item() * len(chunk), len(chunk)], dtype=torch.float64, device=self.ctx.device)
        all_reduce_sum(total)
        self.model.train()
        return (total[0] / total[1]).item()

    def _record(self, out: dict) -> dict:
        loss = all_reduce_sum(out["loss_t"].clone()).item() / self.ctx.world_size
        aux = all_reduce_sum(out["aux_t"].clone()).item() / self.ctx.world_size
        rec = {"step": self.step, "tokens": self.meter.tokens, "loss": loss, "lr": out["lr"],
               "grad_norm": out["grad_norm_t"].item(), "moe/aux_loss": aux}
        self.meter.observe(self.step, loss)  # for the forecasts (steps to the end, cost to cost.target_loss)
        rec.update({k: (v.item() if torch.is_tensor(v) else v) for k, v in out.items() if k.startswith("moe/")})
        rec.update(self.meter.report())
        rec.update(A2A_METER.report())  # perf/a2a_ms, perf/a2a_bytes per step (ep > 1)
        if self.ctx.device.type == "cuda":
            rec["mem/peak_gib"] = torch.cuda.max_memory_allocated(self.ctx.device) / 2**30
        rec.update(self._max_over_ranks(rec, ("perf/a2a_ms", "mem/peak_gib")))
        return rec

    def _max_over_ranks(self, rec: dict, keys: tuple[str, ...]) -> dict:
        """``<key>_max``: the largest value over all ranks of each of ``keys`` in ``rec`` (rank 0 logs its
        own values; the slowest all-to-all and the fullest GPU are what limit a step). One all-reduce; the
        keys present are the same on every rank. ``{}`` in one process."""
        present = [k for k in keys if rec.get(k) is not None]
        if not (self.ctx.distributed and present):
            return {}
        t = torch.tensor([float(rec[k]) for k in present], dtype=torch.float64, device=self.ctx.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return {f"{k}_max": v for k, v in zip(present, t.tolist())}

    def _budget_spent(self, rec: dict) -> bool:
        budget = self.cfg.cost.budget_usd
        spent = budget is not None and rec.get("cost/usd", 0.0) >= budget
        flag = torch.tensor([1.0 if spent else 0.0], device=self.ctx.device)
        return bool(all_reduce_sum(flag).item() > 0)  # ranks agree (their clocks differ slightly)

    def fit(self) -> dict:
        cfg = self.cfg
        self.maybe_resume()
        if self.step >= cfg.train.steps:  # the command of a finished run, started again: nothing to train
            if self.ctx.is_main:
                print(f"run.dir={self.run_dir} is complete at step {self.step} (train.steps={cfg.train.steps}): "
                      f"nothing to do; raise train.steps to train further", flush=True)
            self.meter.close()
            return {"step": self.step, "val/loss": None, "stopped_by": None, "checkpoint": None, "complete": True}
        self._setup_logging()
        if self.ctx.is_main:
            save_config(cfg, self.run_dir, self.args)
            write_run_metadata(self.run_dir, start_step=self.step, device=self.meter.pricing.device_label,
                               wandb_id=self.wandb_id)  # run.json: SLURM job id, restarts, hosts
            print(self.describe(), flush=True)
        bar = self._progress_bar()
        self.meter.start_training()
        self.model.train()
        last_val: Optional[float] = None
        stopped_by: Optional[str] = None
        kill_at = int(os.environ.get("MOETRAIN_KILL_AT_STEP", "0"))  # fault injection for resume tests
        while self.step < cfg.train.steps:
            out = self.train_step()
            rec = None
            if self.step % cfg.train.log_every == 0 or self.step == cfg.train.steps:
                rec = self._record(out)
                self.logger.log(rec)
                self._show(bar, rec)
            if self.step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            if cfg.train.eval_every and self.step % cfg.train.eval_every == 0 and self.step < cfg.train.steps:
                last_val = self._eval_and_log()
            if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and self.step < cfg.train.steps:
                self.save()
            if self.stop.agreed(self.ctx):
                stopped_by = signal.Signals(self.stop.signal or signal.SIGTERM).name
                break
            if cfg.cost.budget_usd is not None:
                rec = rec or self._record(out)
                if self._budget_spent(rec):
                    stopped_by = f"cost.budget_usd={cfg.cost.budget_usd}"
                    break
        if bar is not None:
            bar.close()
        if stopped_by is None:
            last_val = self._eval_and_log()
        path = self.save() if (cfg.checkpoint.at_end or stopped_by) else None
        final = _no_throughput(self.meter.report())  # its window holds evaluation / checkpoint time, no tokens
        self.meter.close()
        summary = {"step": self.step, "val/loss": last_val, "stopped_by": stopped_by,
                   "checkpoint": str(path) if path else None, **final}
        self.logger.summary(summary)
        self.logger.close()
        if self.ctx.is_main:
            print(self._final_text(summary), flush=True)
        return summary

    def _eval_and_log(self) -> float:
        with self.meter.phase("eval"):
            val = self.evaluate()
        rec = {"step": self.step, "tokens": self.meter.tokens, "val/loss": val, **_no_throughput(self.meter.report())}
        self.logger.log(rec)
        if self.ctx.is_main:
            self._write(f"step {self.step:>6}  val/loss {val:.4f}  {_usd(rec['cost/usd'])}")
        return val

    def _progress_bar(self):
        if not (self.ctx.is_main and self.cfg.logging.progress):
            return None
        from tqdm import tqdm
        return tqdm(total=self.cfg.train.steps, initial=self.step, desc="train", unit="step",
                    dynamic_ncols=True, file=sys.stderr, disable=None, mininterval=0.5)

    def _write(self, line: str) -> None:
        from tqdm import tqdm
        tqdm.write(line, file=sys.stdout)
        sys.stdout.flush()

    def _show(self, bar, rec: dict) -> None:
        if not self.ctx.is_main:
            return
        mfu = f"  mfu {100 * rec['perf/mfu']:.1f}%" if rec.get("perf/mfu") is not None else ""
        self._write(f"step {rec['step']:>6}  loss {rec['loss']:.4f}  lr {rec['lr']:.2e}  "
                    f"gnorm {rec['grad_norm']:.2f}  {rec['perf/tokens_per_s']:,.0f} tok/s{mfu}  "
                    f"{_usd(rec['cost/usd'])}")
        if bar is not None:
            bar.n = rec["step"]
            bar.set_postfix(loss=f"{rec['loss']:.3f}", usd=f"{rec['cost/usd']:.4f}", refresh=True)

    def _final_text(self, s: dict) -> str:
        hours_key = "cost/gpu_hours" if self.meter.pricing.unit == "gpu" else "cost/cpu_core_hours"
        unit = "GPU-hours" if self.meter.pricing.unit == "gpu" else "CPU core-hours"
        val = f"{s['val/loss']:.4f}" if s["val/loss"] is not None else "n/a"
        lines = [f"done: step {s['step']}/{self.cfg.train.steps}"
                 + (f" (stopped by {s['stopped_by']})" if s["stopped_by"] else ""),
                 f"val/loss {val} nats/token",
                 f"cost {s[hours_key]:.5f} {unit}, {_usd(s['cost/usd'])} "
                 f"(train {s['time/train_s']:.1f}s, eval {s['time/eval_s']:.1f}s, "
                 f"checkpoint {s['time/checkpoint_s']:.1f}s, start-up {s['time/startup_s']:.1f}s)"]
        if s.get("checkpoint"):
            lines.append(f"checkpoint {s['checkpoint']}")
        return "\n".join(lines)


def _usd(x: float) -> str:
    """Dollars with enough digits to be non-zero on a short CPU run."""
    return f"${x:,.2f}" if x >= 100 else f"${x:.3g}"


def _truncate_metrics(path: Path, step: int) -> None:
    """Drops metric lines logged after ``step`` by a run that was killed after its last checkpoint."""
    import json
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(ln + "\n" for ln in keep))
    os.replace(tmp, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m moetrain.train", description=__doc__.split("\n")[0])
    p.add_argument("--config", help="YAML file of overrides (see configs/)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=200")
    return p.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    ctx = None
    try:
        cfg = load_config(ns.config, ns.overrides)
        if ns.print_config:
            print(resolved_yaml(cfg), end="")
            return 0
        ctx = init_distributed(cfg.parallel.backend)
        Trainer(cfg, ctx).fit()
        return 0
    except (ConfigError, DataError, UserError, UnavailableFeature) as e:
        if ctx is None or ctx.is_main:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        shutdown()


if __name__ == "__main__":
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A distributed run skips interpreter finalization: process groups still referenced by other modules
        # (DeepSpeed keeps its groups in module globals) would be destroyed there, and a gloo worker thread that
        # frees a tensor then needs the GIL of a finalizing interpreter, which aborts the process after a
        # finished run (seen once in CI: "terminate called without an active exception", exit -6). The run's
        # files are written and closed, and the process group destroyed, by the time main() returns.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
