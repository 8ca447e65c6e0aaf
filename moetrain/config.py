"""Typed configuration schema for moetrain, loaded with OmegaConf.

A config is the schema's defaults, overridden by an optional YAML file (which holds only overrides) and
then by CLI dotlist items (``train.steps=200 model.n_routed_experts=16``). Every user mistake — unknown
key, wrong type, impossible value, missing file — raises :class:`ConfigError` with one line that names
the key, the bad value and what is allowed; ``moetrain.train`` prints it and exits with code 2.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException, ValidationError

from moetrain.economics import GPU_SPECS
from moetrain.model.args import FLAVORS, ModelArgs


class ConfigError(ValueError):
    """A user-facing configuration mistake; the message is one line naming the key and the fix."""


def _model_section() -> type:
    """``model``: a flavor name plus an optional override for every :class:`ModelArgs` field."""
    specs: list[tuple[str, Any, Any]] = [("flavor", str, field(default="debug"))]
    for f in dataclasses.fields(ModelArgs):
        typ = {"int": int, "float": float, "str": str, "bool": bool}[
            f.type if isinstance(f.type, str) else f.type.__name__]
        specs.append((f.name, Optional[typ], field(default=None)))
    return dataclasses.make_dataclass("ModelConfig", specs)


ModelConfig = _model_section()


@dataclass
class RunConfig:
    dir: str = "runs/default"       # run directory: config.yaml, metrics.jsonl, checkpoints/
    seed: int = 1337
    name: str = ""                  # display name (W&B); defaults to the run directory's name


@dataclass
class DataConfig:
    corpus: str = "tinyshakespeare"  # embedded corpus name or a path to a UTF-8 text file
    prepared_dir: str = ""           # a directory made by `python -m moetrain.data.prepare` (overrides corpus)
    tokenizer: str = "char"          # char | byte | PATH/tokenizer.json | tiktoken:PATH_OR_NAME
    val_fraction: float = 0.1
    cache_dir: str = "~/.cache/moetrain/data"


@dataclass
class TrainConfig:
    steps: int = 300                 # optimizer steps
    batch_size: int = 32             # global sequences per optimizer step (all ranks, all micro-batches)
    micro_batch_size: int = 0        # sequences per forward on one rank; 0 = batch_size / dp
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1        # final lr = lr * min_lr_ratio
    warmup_steps: int = 30
    decay: str = "cosine"            # cosine | linear | constant
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0           # max global grad norm; 0 = off
    eval_every: int = 100            # steps; 0 = only at the end
    eval_batches: int = 8            # global batches of the val split per evaluation
    log_every: int = 10
    compile: bool = False            # torch.compile the blocks
    optimizer_impl: str = "auto"     # AdamW kernels: auto (fused on CUDA, foreach elsewhere) | fused | foreach


@dataclass
class ParallelConfig:
    dp: int = 0                      # data-parallel degree; 0 = world_size / ep
    ep: int = 1                      # expert-parallel degree (divides world size and n_routed_experts)
    engine: str = "native"           # native | deepspeed
    zero_stage: int = 1              # ZeRO stage of the deepspeed engine: 1 (optimizer state) | 2 (+ gradients)
    fsdp: bool = False               # native engine: FSDP2 (fully_shard) shards dense params over the world
    backend: str = "auto"            # auto (nccl on GPU, gloo on CPU) | nccl | gloo
    capacity_factor: float = 0.0     # routed-expert capacity: 0 = dropless; > 0 = each rank sends at most
                                     # ceil(capacity_factor * tokens * top_k / n_routed_experts) copies per expert
    capacity_policy: str = "probs"   # which overflow copies are dropped: probs (lowest routing weight) | position (latest)
    ep_exchange: str = "pipelined"   # token exchange with ep > 1: pipelined (ep_chunks all-to-alls, each overlapping
                                     # the local passes of the neighbouring chunks; measured fastest on 2 H200s)
                                     # | all_to_all (one all_to_all_single, then a regroup by local expert; the
                                     # shared experts overlap it) | per_expert (batched send/recv per rank and
                                     # local expert, received in expert order: no regroup; 1-2 experts per GPU)
                                     # | symmetric (CUDA + NCCL: one kernel stores / reads the token copies in
                                     # the peers' symmetric-memory buffers; no all-to-all, no regroup; CPU +
                                     # gloo: the same through buffers in /dev/shm)
    ep_chunks: int = 2               # token chunks of ep_exchange=pipelined


@dataclass
class PrecisionConfig:
    dtype: str = "auto"              # auto (bf16 autocast on GPU, fp32 on CPU) | bf16 | fp32
    fp8: str = "none"                # none | tensorwise | rowwise | blockwise
    fp8_expert_gemm: str = "auto"    # blockwise routed experts on Hopper: auto (per_expert where the counts are on
                                     # the host already, ep = 1, and the experts average >= 1024 rows; else grouped)
                                     # | grouped (Triton grouped GEMMs, no host sync) | per_expert (one cuBLAS
                                     # block-scaled GEMM per expert)


@dataclass
class KernelsConfig:
    enabled: bool = False            # use the Triton kernels of kernels/ where they apply
    attention: bool = True
    rmsnorm: bool = True
    rope: bool = True
    swiglu: bool = True
    router: bool = True
    permute: bool = True


@dataclass
class CostConfig:
    gpu_type: str = "auto"           # auto (from the device name) | h100 | h200 | h800 | a100 | ...
    gpu_hour_usd: Optional[float] = None    # None = the default price of gpu_type (economics.GPU_SPECS)
    cpu_core_hour_usd: float = 0.05  # price of one CPU core-hour for CPU runs
    kwh_usd: Optional[float] = None         # price of a kWh: adds cost/energy_usd (GPU runs with NVML)
    budget_usd: Optional[float] = None
    target_loss: Optional[float] = None     # forecast the steps, GPU-hours and $ to reach this training loss


@dataclass
class LoggingConfig:
    wandb: str = "disabled"          # disabled | offline | online
    project: str = "moetrain"
    tensorboard: bool = False
    progress: bool = True            # progress bar on rank 0


@dataclass
class CheckpointConfig:
    every: int = 0                   # steps between checkpoints; 0 = only at the end (and on SIGTERM)
    keep: int = 2                    # newest checkpoints kept
    at_end: bool = True


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: Any = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    cost: CostConfig = field(default_factory=CostConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    resume: str = "auto"             # auto (newest checkpoint in run.dir) | never | PATH to a checkpoint


Config.__annotations__["model"] = ModelConfig

CHOICES = {
    "train.decay": ("cosine", "linear", "constant"),
    "train.optimizer_impl": ("auto", "fused", "foreach"),
    "parallel.engine": ("native", "deepspeed"),
    "parallel.backend": ("auto", "nccl", "gloo"),
    "parallel.capacity_policy": ("probs", "position"),
    "parallel.ep_exchange": ("all_to_all", "per_expert", "pipelined", "symmetric"),
    "precision.dtype": ("auto", "bf16", "fp32"),
    "precision.fp8": ("none", "tensorwise", "rowwise", "blockwise"),
    "precision.fp8_expert_gemm": ("auto", "grouped", "per_expert"),
    "logging.wandb": ("disabled", "offline", "online"),
    "model.score_func": ("softmax", "sigmoid"),
    "cost.gpu_type": ("auto", *GPU_SPECS),
}
MAX_EP_CHUNKS = 64
POSITIVE = ("train.steps", "train.batch_size", "train.seq_len", "train.log_every", "train.eval_batches",
            "parallel.ep", "parallel.ep_chunks", "train.lr")
NON_NEGATIVE = ("train.micro_batch_size", "train.warmup_steps", "train.eval_every", "train.weight_decay",
                "train.grad_clip", "parallel.dp", "checkpoint.every", "checkpoint.keep",
                "cost.cpu_core_hour_usd", "parallel.capacity_factor")
MODEL_POSITIVE = ("vocab_size", "dim", "inter_dim", "moe_inter_dim", "n_layers", "n_heads", "max_seq_len",
                  "n_routed_experts", "n_activated_experts", "n_expert_groups", "n_limited_groups",
                  "kv_lora_rank", "qk_rope_head_dim", "v_head_dim", "rope_theta", "rope_factor",
                  "norm_eps")
MODEL_NON_NEGATIVE = ("dropout", "n_dense_layers", "n_shared_experts", "q_lora_rank", "qk_nope_head_dim",
                      "bias_update_speed", "seq_aux_alpha", "switch_aux_alpha", "router_z_loss_coef")


def _one_line(exc: OmegaConfBaseException) -> str:
    """OmegaConf's messages span lines (with 'full_key:' etc.); keep the first line and the key."""
    msg = str(exc).splitlines()[0].strip()
    key = getattr(exc, "full_key", None)
    return f"{key}: {msg}" if key and key not in msg else msg


def load_config(config_file: str | None = None, overrides: list[str] | None = None) -> DictConfig:
    """Defaults <- YAML file <- dotlist overrides, then :func:`validate`.

    Args:
        config_file: path to a YAML file holding overrides of the schema's defaults, or None.
        overrides: ``key=value`` strings (OmegaConf dotlist syntax).
    Returns: the merged, validated, read-only DictConfig (schema-typed).
    Raises: ConfigError (one line) for any unknown key, wrong type or invalid value.
    """
    cfg = OmegaConf.structured(Config)
    try:
        if config_file:
            path = Path(config_file)
            if not path.is_file():
                raise ConfigError(f"--config {config_file}: file not found; pass a YAML file (see configs/)")
            try:
                file_cfg = OmegaConf.load(path)
            except Exception as e:  # yaml errors
                raise ConfigError(f"--config {config_file}: not valid YAML ({str(e).splitlines()[0]})") from None
            cfg = OmegaConf.merge(cfg, file_cfg)
        for item in overrides or []:
            if "=" not in item:
                raise ConfigError(f"override '{item}': expected key=value, e.g. train.steps=200")
            key = item.split("=", 1)[0]
            if OmegaConf.select(cfg, key, default="__missing__") == "__missing__":
                section = key.split(".")[0]
                hint = (f"valid keys in '{section}': " + ", ".join(cfg[section].keys())
                        if section in cfg and isinstance(cfg[section], DictConfig)
                        else "valid sections: " + ", ".join(cfg.keys()))
                raise ConfigError(f"{key}: unknown config key; {hint}")
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
    except OmegaConfBaseException as e:
        msg, key = _one_line(e), getattr(e, "full_key", None)
        current = OmegaConf.select(cfg, key, default=None) if isinstance(e, ValidationError) and key else None
        if current is not None:  # a value of the wrong type: say which type, with the current value as example
            msg += f"; expected {type(current).__name__}, e.g. {key}={current}"
        raise ConfigError(msg) from None
    validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def model_args(cfg: DictConfig) -> ModelArgs:
    """The flavor's :class:`ModelArgs` with every non-null ``model.*`` override applied."""
    base = FLAVORS[cfg.model.flavor]
    overrides = {k: v for k, v in OmegaConf.to_container(cfg.model).items() if k != "flavor" and v is not None}
    return dataclasses.replace(base, **overrides)


def _check_choice(cfg: DictConfig, key: str, allowed: tuple[str, ...]) -> None:
    value = OmegaConf.select(cfg, key)
    if value is not None and value not in allowed:
        raise ConfigError(f"{key}={value!r}: must be one of {', '.join(allowed)}")


def validate(cfg: DictConfig, world_size: int | None = None) -> None:
    """Checks every rule that does not need the data or the devices; raises ConfigError (one line)."""
    if cfg.model.flavor not in FLAVORS:
        raise ConfigError(f"model.flavor={cfg.model.flavor!r}: unknown flavor; choose one of {', '.join(FLAVORS)}")
    for key, allowed in CHOICES.items():
        _check_choice(cfg, key, allowed)
    if cfg.parallel.zero_stage not in (1, 2):
        raise ConfigError(f"parallel.zero_stage={cfg.parallel.zero_stage}: must be 1 or 2 (ZeRO-3 is not supported "
                          f"with moetrain's MoE layers)")
    if cfg.parallel.fsdp and cfg.parallel.engine != "native":
        raise ConfigError(f"parallel.fsdp=true: needs parallel.engine=native (got {cfg.parallel.engine}); "
                          f"set parallel.fsdp=false to use ZeRO")
    if cfg.parallel.ep_chunks > MAX_EP_CHUNKS:
        raise ConfigError(f"parallel.ep_chunks={cfg.parallel.ep_chunks}: at most {MAX_EP_CHUNKS} (each chunk costs "
                          f"two all-to-all launches per MoE layer and pass; 2-3 measured best)")
    for key in POSITIVE:
        if OmegaConf.select(cfg, key) <= 0:
            raise ConfigError(f"{key}={OmegaConf.select(cfg, key)}: must be > 0")
    for key in NON_NEGATIVE:
        if OmegaConf.select(cfg, key) < 0:
            raise ConfigError(f"{key}={OmegaConf.select(cfg, key)}: must be >= 0")
    if not 0.0 < cfg.data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={cfg.data.val_fraction}: must be between 0 and 1 (e.g. 0.1)")
    if not 0.0 <= cfg.train.min_lr_ratio <= 1.0:
        raise ConfigError(f"train.min_lr_ratio={cfg.train.min_lr_ratio}: must be in [0, 1]")
    if cfg.resume not in ("auto", "never") and not Path(cfg.resume).exists():
        raise ConfigError(f"resume={cfg.resume}: no such checkpoint; use auto, never or an existing checkpoint path")
    if not cfg.data.prepared_dir and cfg.data.corpus not in _embedded_corpora() and not Path(cfg.data.corpus).is_file():
        raise ConfigError(f"data.corpus={cfg.data.corpus}: file not found; give a text file or one of "
                          f"{', '.join(_embedded_corpora())}")
    if cfg.data.prepared_dir and not (Path(cfg.data.prepared_dir) / "meta.json").is_file():
        raise ConfigError(f"data.prepared_dir={cfg.data.prepared_dir}: no meta.json there; run "
                          f"`python -m moetrain.data.prepare --input FILE --out {cfg.data.prepared_dir}` first")
    _validate_model(cfg)
    if cfg.train.seq_len > model_args(cfg).max_seq_len:
        raise ConfigError(f"train.seq_len={cfg.train.seq_len}: must be <= model.max_seq_len "
                          f"({model_args(cfg).max_seq_len}); raise model.max_seq_len or lower train.seq_len")
    if world_size is not None:
        validate_layout(cfg, world_size)


def _validate_model(cfg: DictConfig) -> None:
    args = model_args(cfg)
    for name in MODEL_POSITIVE:
        if getattr(args, name) <= 0:
            raise ConfigError(f"model.{name}={getattr(args, name)}: must be > 0")
    for name in MODEL_NON_NEGATIVE:
        if getattr(args, name) < 0:
            raise ConfigError(f"model.{name}={getattr(args, name)}: must be >= 0")
    if args.n_activated_experts > args.n_routed_experts:
        raise ConfigError(f"model.n_activated_experts={args.n_activated_experts}: must be <= "
                          f"model.n_routed_experts ({args.n_routed_experts})")
    if args.n_routed_experts % args.n_expert_groups:
        raise ConfigError(f"model.n_routed_experts={args.n_routed_experts}: must be divisible by "
                          f"model.n_expert_groups ({args.n_expert_groups})")
    if args.n_limited_groups > args.n_expert_groups:
        raise ConfigError(f"model.n_limited_groups={args.n_limited_groups}: must be <= "
                          f"model.n_expert_groups ({args.n_expert_groups})")
    per_group = args.n_routed_experts // args.n_expert_groups
    if args.n_activated_experts > args.n_limited_groups * per_group:
        raise ConfigError(f"model.n_activated_experts={args.n_activated_experts}: must be <= n_limited_groups x "
                          f"experts per group ({args.n_limited_groups * per_group})")
    if args.n_dense_layers > args.n_layers:
        raise ConfigError(f"model.n_dense_layers={args.n_dense_layers}: must be <= model.n_layers ({args.n_layers})")
    if args.qk_rope_head_dim % 2:
        raise ConfigError(f"model.qk_rope_head_dim={args.qk_rope_head_dim}: must be even (RoPE rotates pairs)")


def validate_layout(cfg: DictConfig, world_size: int) -> tuple[int, int]:
    """Checks dp x ep against the world size and the batch; returns (dp, ep)."""
    ep = cfg.parallel.ep
    if world_size % ep:
        raise ConfigError(f"parallel.ep={ep}: must divide the world size ({world_size})")
    if model_args(cfg).n_routed_experts % ep:
        raise ConfigError(f"parallel.ep={ep}: must divide model.n_routed_experts ({model_args(cfg).n_routed_experts})")
    dp = cfg.parallel.dp or world_size // ep
    if dp * ep != world_size:
        raise ConfigError(f"parallel.dp={cfg.parallel.dp}: dp x ep ({dp} x {ep}) must equal the world size "
                          f"({world_size}); set parallel.dp=0 to derive it")
    if not cfg.train.micro_batch_size and cfg.train.batch_size % world_size:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size}: must be a multiple of the world size "
                          f"({world_size})")
    micro = cfg.train.micro_batch_size or cfg.train.batch_size // world_size
    if cfg.train.batch_size % (world_size * max(micro, 1)) or micro == 0:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size}: must be a multiple of world size x "
                          f"train.micro_batch_size ({world_size} x {micro or 1})")
    return dp, ep


def _embedded_corpora() -> tuple[str, ...]:
    corpus_dir = Path(__file__).parent / "data" / "corpus"
    return tuple(sorted(p.stem for p in corpus_dir.glob("*.txt")))


def resolved_yaml(cfg: DictConfig, args: Optional[ModelArgs] = None) -> str:
    """The config as YAML with every ``model.*`` field filled in from ``args`` (default: the flavor plus
    overrides; ``vocab_size`` stays null there, meaning "the data's vocabulary")."""
    out = OmegaConf.to_container(cfg, resolve=True)
    for k, v in dataclasses.asdict(args or model_args(cfg)).items():
        if out["model"].get(k) is None and (args is not None or k != "vocab_size"):
            out["model"][k] = v
    return OmegaConf.to_yaml(out)


def save_config(cfg: DictConfig, run_dir: str | os.PathLike, args: Optional[ModelArgs] = None) -> Path:
    """Writes the resolved config (model fields as built: ``args``) to ``<run_dir>/config.yaml`` atomically."""
    path = Path(run_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(resolved_yaml(cfg, args))
    os.replace(tmp, path)
    return path
