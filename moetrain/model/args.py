"""Model hyper-parameters, named flavors and analytic size / compute / memory formulas.

Field names follow ``ModelArgs`` of DeepSeek-V3's reference ``inference/model.py``; the extra
training-only fields (balance-loss weights, bias update speed, init) are moetrain's.

Formulas (all analytic, no model is built):

* :func:`param_counts`   - parameters, total and activated per token.
* :func:`flops_per_token` - training (or forward) FLOPs per token, matmuls + attention.
* :func:`kv_cache_per_token` - inference KV-cache bytes per token, MLA vs an MHA of the same heads.

Checked against the papers (see ``tests/model/test_args.py``):

==================  ==============  =================  ==========================
flavor              total           activated          train FLOPs/token @ 4096
==================  ==============  =================  ==========================
deepseek-v3         670.9e9 (671B)  36.6e9 (37B)       250.5e9 (250 G, ISCA'25 T2)
deepseek-v2         235.7e9 (236B)  20.8e9 (21B)       155.1e9 (155 G, ISCA'25 T2)
deepseek-v2-lite    15.71e9 (15.7B) 2.45e9 (2.4B)      (not in the paper)
==================  ==============  =================  ==========================
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, fields

__all__ = [
    "ModelArgs",
    "FLAVORS",
    "get_flavor",
    "param_counts",
    "flops_per_token",
    "kv_cache_per_token",
]


@dataclass
class ModelArgs:
    """Hyper-parameters of an MLA + DeepSeekMoE decoder (DeepSeek-V3 ``ModelArgs`` names).

    Defaults are the ``debug`` flavor: a 2-layer model that trains on a CPU in seconds.
    ``vocab_size`` is usually overwritten from the prepared data's ``meta.json``.
    """

    vocab_size: int = 256
    dim: int = 64
    inter_dim: int = 192          # dense SwiGLU hidden size
    moe_inter_dim: int = 32       # one routed/shared expert's hidden size
    n_layers: int = 2
    n_dense_layers: int = 1       # first n_dense_layers use the dense MLP
    n_heads: int = 4
    max_seq_len: int = 256
    # MoE
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    n_activated_experts: int = 2  # top-k
    n_expert_groups: int = 1
    n_limited_groups: int = 1
    score_func: str = "softmax"   # "softmax" | "sigmoid"
    route_scale: float = 1.0
    norm_topk_prob: bool = True   # renormalise top-k weights (V3 sigmoid: True)
    bias_update_speed: float = 1e-3   # gamma of aux-loss-free balancing (0 = off)
    seq_aux_alpha: float = 1e-4   # sequence-wise balance loss weight (0 = off)
    switch_aux_alpha: float = 0.0  # Switch-Transformer balance loss weight (0 = off)
    router_z_loss_coef: float = 0.0
    # MLA
    q_lora_rank: int = 0          # 0 = no query compression
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 8
    v_head_dim: int = 16
    # RoPE / YaRN
    original_seq_len: int = 4096
    rope_theta: float = 10000.0
    rope_factor: float = 1.0      # YaRN scaling factor (1 = plain RoPE)
    beta_fast: int = 32
    beta_slow: int = 1
    mscale: float = 1.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    dropout: float = 0.0          # residual/embedding dropout in training (0 = off, as in DeepSeek-V3)

    @property
    def qk_head_dim(self) -> int:
        """Per-head query/key size: ``qk_nope_head_dim + qk_rope_head_dim``."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def n_moe_layers(self) -> int:
        """Number of MoE layers: ``n_layers - n_dense_layers`` (never negative)."""
        return max(self.n_layers - self.n_dense_layers, 0)

    def validate(self) -> "ModelArgs":
        """Check the fields are consistent; raises ``ValueError`` naming the field and the fix.

        Returns ``self`` so it can be chained. Called by ``Transformer.__init__``.
        """
        def bad(msg: str) -> None:
            raise ValueError(f"ModelArgs: {msg}")

        for f in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len", "kv_lora_rank",
                  "qk_rope_head_dim", "v_head_dim", "inter_dim"):
            if getattr(self, f) <= 0:
                bad(f"{f}={getattr(self, f)} must be > 0")
        if not 0 <= self.n_dense_layers <= self.n_layers:
            bad(f"n_dense_layers={self.n_dense_layers} must be in [0, n_layers={self.n_layers}]")
        if not 0.0 <= self.dropout < 1.0:
            bad(f"dropout={self.dropout} must be in [0, 1)")
        if self.qk_rope_head_dim % 2:
            bad(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even (RoPE rotates pairs)")
        if self.q_lora_rank < 0:
            bad(f"q_lora_rank={self.q_lora_rank} must be >= 0 (0 = no query compression)")
        if self.score_func not in ("softmax", "sigmoid"):
            bad(f"score_func={self.score_func!r} must be 'softmax' or 'sigmoid'")
        if self.n_moe_layers > 0:
            E, K = self.n_routed_experts, self.n_activated_experts
            if E <= 0 or self.moe_inter_dim <= 0:
                bad("n_routed_experts and moe_inter_dim must be > 0 when there are MoE layers")
            if not 1 <= K <= E:
                bad(f"n_activated_experts={K} must be in [1, n_routed_experts={E}]")
            G, Gl = self.n_expert_groups, self.n_limited_groups
            if G < 1 or E % G:
                bad(f"n_expert_groups={G} must be >= 1 and divide n_routed_experts={E}")
            if not 1 <= Gl <= G:
                bad(f"n_limited_groups={Gl} must be in [1, n_expert_groups={G}]")
            if Gl * (E // G) < K:
                bad(f"n_limited_groups*experts_per_group={Gl * (E // G)} < n_activated_experts={K}:"
                    " raise n_limited_groups")
        if self.rope_factor < 1.0:
            bad(f"rope_factor={self.rope_factor} must be >= 1 (1 = plain RoPE)")
        return self


# --------------------------------------------------------------------------------------------
# Flavors
# --------------------------------------------------------------------------------------------

FLAVORS: dict[str, ModelArgs] = {
    # 2 layers (1 dense + 1 MoE with 8 experts top-2 + 1 shared), ~0.2M params: CPU tests and the
    # golden loss curve. vocab_size is taken from the data (256 = bytes).
    "debug": ModelArgs(),
    # Character-level Shakespeare (vocab 65), V3-style routing (sigmoid, expert bias, groups),
    # fine-grained experts (16 routed of 128, top-4, + 2 shared), dropout 0.2 as nanoGPT's baby GPT;
    # trains in minutes on one GPU.
    "tinyshakespeare": ModelArgs(
        vocab_size=65, dim=384, inter_dim=1024, n_layers=6, n_dense_layers=1,
        n_heads=6, max_seq_len=256,
        n_routed_experts=16, n_shared_experts=2, n_activated_experts=4, moe_inter_dim=128,
        n_expert_groups=4, n_limited_groups=2, score_func="sigmoid", route_scale=1.0,
        norm_topk_prob=True, bias_update_speed=1e-3, seq_aux_alpha=1e-4,
        q_lora_rank=0, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
        original_seq_len=256, rope_theta=10000.0, init_std=0.02, dropout=0.2,
    ),
    # DeepSeek-V2-Lite (HF config.json of deepseek-ai/DeepSeek-V2-Lite): 15.7B total, 2.4B active.
    # V2 balances with aux losses only (expert-level alpha1 = 0.001 for Lite, V2 paper §4.1/App. B),
    # so the V3 bias is off. max_seq_len is the 4K pre-training length; YaRN (factor 40,
    # mscale 0.707) only switches on when max_seq_len > original_seq_len.
    "deepseek-v2-lite": ModelArgs(
        vocab_size=102400, dim=2048, inter_dim=10944, moe_inter_dim=1408, n_layers=27,
        n_dense_layers=1, n_heads=16, max_seq_len=4096,
        n_routed_experts=64, n_shared_experts=2, n_activated_experts=6,
        n_expert_groups=1, n_limited_groups=1, score_func="softmax", route_scale=1.0,
        norm_topk_prob=False, bias_update_speed=0.0, seq_aux_alpha=1e-3,
        q_lora_rank=0, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, original_seq_len=4096, rope_theta=10000.0, rope_factor=40.0,
        beta_fast=32, beta_slow=1, mscale=0.707, init_std=0.006,
    ),
    # DeepSeek-V2 (236B total, 21B active; device-limited routing M=3 of 8 groups, route_scale 16).
    # Extra flavor, used to check the 155 GFLOPs/token figure of "Insights into DeepSeek-V3".
    "deepseek-v2": ModelArgs(
        vocab_size=102400, dim=5120, inter_dim=12288, moe_inter_dim=1536, n_layers=60,
        n_dense_layers=1, n_heads=128, max_seq_len=4096,
        n_routed_experts=160, n_shared_experts=2, n_activated_experts=6,
        n_expert_groups=8, n_limited_groups=3, score_func="softmax", route_scale=16.0,
        norm_topk_prob=False, bias_update_speed=0.0, seq_aux_alpha=3e-3,
        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, original_seq_len=4096, rope_theta=10000.0, rope_factor=40.0,
        beta_fast=32, beta_slow=1, mscale=0.707, init_std=0.006,
    ),
    # DeepSeek-V3 (inference/configs/config_671B.json; V3 tech report §2, §4.2): 671B total,
    # 37B active (MTP module not included). Pre-training length 4K: YaRN (factor 40) is inert
    # unless max_seq_len is raised above original_seq_len (the 32K/128K extension, §4.3).
    "deepseek-v3": ModelArgs(
        vocab_size=129280, dim=7168, inter_dim=18432, moe_inter_dim=2048, n_layers=61,
        n_dense_layers=3, n_heads=128, max_seq_len=4096,
        n_routed_experts=256, n_shared_experts=1, n_activated_experts=8,
        n_expert_groups=8, n_limited_groups=4, score_func="sigmoid", route_scale=2.5,
        norm_topk_prob=True, bias_update_speed=1e-3, seq_aux_alpha=1e-4,
        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, original_seq_len=4096, rope_theta=10000.0, rope_factor=40.0,
        beta_fast=32, beta_slow=1, mscale=1.0, init_std=0.006,
    ),
}


def get_flavor(name: str) -> ModelArgs:
    """Return a fresh copy of the named flavor's :class:`ModelArgs`.

    Raises:
        ValueError: unknown ``name``; the message lists the known flavors.
    """
    if name not in FLAVORS:
        raise ValueError(f"unknown model flavor {name!r}; known flavors: {', '.join(FLAVORS)}")
    return copy.deepcopy(FLAVORS[name])


# --------------------------------------------------------------------------------------------
# Parameter counts
# --------------------------------------------------------------------------------------------

def _mla_params(a: ModelArgs) -> int:
    """One MLA layer (DeepSeek-V2 §2.1.2-2.1.3): q path, kv down/up projections, norms, wo."""
    H, qk = a.n_heads, a.qk_head_dim
    if a.q_lora_rank > 0:
        q = a.dim * a.q_lora_rank + a.q_lora_rank + a.q_lora_rank * H * qk  # wq_a, q_norm, wq_b
    else:
        q = a.dim * H * qk  # wq
    kv = (a.dim * (a.kv_lora_rank + a.qk_rope_head_dim)  # wkv_a -> c_kv, k_pe
          + a.kv_lora_rank                               # kv_norm
          + a.kv_lora_rank * H * (a.qk_nope_head_dim + a.v_head_dim))  # wkv_b -> k_nope, v
    o = H * a.v_head_dim * a.dim
    return q + kv + o


def param_counts(args: ModelArgs) -> dict:
    """Analytic parameter counts of ``Transformer(args)`` (untied embedding and head).

    Equals ``sum(p.numel() for p in Transformer(args).parameters())`` exactly (tested).

    Returns a dict of ints:
        ``total``: every parameter (the MTP module of DeepSeek-V3 is not part of the model).
        ``activated``: parameters one token uses in a forward: everything dense (attention,
            norms, dense MLPs, gates, shared experts, the head) plus ``n_activated_experts``
            routed experts per MoE layer. **The embedding table is NOT counted** (a token reads
            one row of it); this is the convention that reproduces the published figures
            (V3: 37B, V2: 21B, V2-Lite: 2.4B). Add ``embedding`` for the other convention.
        ``embedding``, ``head``: ``vocab_size * dim`` each.
        ``attention``, ``dense_mlp``, ``routed_experts``, ``shared_experts``, ``gates``,
        ``norms``: the parts of ``total``.
        ``activated_matmul``: ``activated`` minus the norm weights; the ``N`` of ``6 N`` in
            :func:`flops_per_token`.
    """
    a = args
    L, Lm = a.n_layers, a.n_moe_layers
    Ld = L - Lm
    expert = 3 * a.dim * a.moe_inter_dim
    attention = L * _mla_params(a)
    dense_mlp = Ld * 3 * a.dim * a.inter_dim
    routed = Lm * a.n_routed_experts * expert
    routed_active = Lm * a.n_activated_experts * expert
    shared = Lm * a.n_shared_experts * expert
    gates = Lm * a.n_routed_experts * a.dim
    norms = 2 * L * a.dim + a.dim  # attn_norm + ffn_norm per layer, final norm
    embedding = head = a.vocab_size * a.dim
    total = embedding + attention + dense_mlp + routed + shared + gates + norms + head
    activated = attention + dense_mlp + routed_active + shared + gates + norms + head
    return {
        "total": total,
        "activated": activated,
        "embedding": embedding,
        "head": head,
        "attention": attention,
        "dense_mlp": dense_mlp,
        "routed_experts": routed,
        "shared_experts": shared,
        "gates": gates,
        "norms": norms,
        "activated_matmul": activated - norms,
    }


# --------------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------------

def flops_per_token(args: ModelArgs, seq_len: int, training: bool = True) -> float:
    """FLOPs per token of a forward (``training=False``) or forward + backward (``True``).

    Derivation (the Kaplan / Chinchilla / PaLM-MFU convention, applied to MLA):

    * Matmuls: a ``[d_in, d_out]`` weight costs ``2 d_in d_out`` FLOPs per token forward and
      twice that backward (grad of input + grad of weight), so ``6 N`` in training with
      ``N = param_counts(args)["activated_matmul"]`` (activated params, head included, embedding
      lookup and norm weights excluded; gates included).
    * Attention scores and values (MLA trains in its "naive" form, DeepSeek-V2 §2.1.3: per head a
      ``qk_head_dim``-wide q.k and a ``v_head_dim``-wide p.v): a query at position ``t`` attends
      to ``t`` keys; with a causal mask the mean context is ``seq_len / 2``. Forward per layer per
      token: ``2 * n_heads * (qk_head_dim + v_head_dim) * seq_len / 2``; training x3:
      ``attn = 3 * n_layers * n_heads * (qk_head_dim + v_head_dim) * seq_len``.
      (Softmax, norms, RoPE and activations are elementwise and not counted.)

    Check: deepseek-v3 at 4096: ``6 * 36.63e9 + 3 * 61 * 128 * 320 * 4096 = 219.8e9 + 30.7e9 =
    250.5e9``, the 250 GFLOPs/token of "Insights into DeepSeek-V3" (ISCA 2025, Table 2, which
    assumes 4K sequences); deepseek-v2 gives ``124.9e9 + 30.2e9 = 155.1e9`` vs. 155 in the same
    table (the table's V2 row is the full 236B V2, not V2-Lite).

    Args:
        seq_len: training sequence length ``T`` (> 0).
        training: ``True`` for forward + backward (3x forward), ``False`` for forward only.
    Raises:
        ValueError: ``seq_len <= 0``.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len={seq_len} must be > 0")
    a = args
    n = param_counts(a)["activated_matmul"]
    attn_fwd = 2 * a.n_layers * a.n_heads * (a.qk_head_dim + a.v_head_dim) * seq_len / 2
    fwd = 2.0 * n + attn_fwd
    return 3.0 * fwd if training else fwd


# --------------------------------------------------------------------------------------------
# KV cache
# --------------------------------------------------------------------------------------------

def kv_cache_per_token(args: ModelArgs, bytes_per_elem: int = 2) -> dict:
    """Inference KV-cache per token, MLA vs. an MHA with the same heads and head dims.

    * MLA (DeepSeek-V2 §2.1.2-2.1.3, V3 §2.1.1) caches only the compressed latent ``c_kv``
      (``kv_lora_rank``) and the decoupled RoPE key ``k_pe`` (``qk_rope_head_dim``, shared by all
      heads): ``(kv_lora_rank + qk_rope_head_dim)`` elements per layer. With the absorbed form
      (``mla.mla_absorbed_attention``) attention runs directly against that cache.
    * MHA caches per head a key (``qk_nope_head_dim + qk_rope_head_dim``) and a value
      (``v_head_dim``): ``n_heads * (qk_head_dim + v_head_dim)`` elements per layer.

    V3: 576 vs. 40,960 elements per layer (1.4%). Note the "93.3% KV-cache reduction" of the V2
    abstract compares DeepSeek-V2 with DeepSeek 67B (a different, dense model), not with an
    MHA of V2's own shape, so it is not this ratio.

    Returns ``{"mla_bytes", "mha_bytes", "ratio" (mla/mha), "mla_elems_per_layer",
    "mha_elems_per_layer"}``; bytes summed over ``n_layers``.
    """
    a = args
    mla = a.kv_lora_rank + a.qk_rope_head_dim
    mha = a.n_heads * (a.qk_head_dim + a.v_head_dim)
    mla_bytes = a.n_layers * mla * bytes_per_elem
    mha_bytes = a.n_layers * mha * bytes_per_elem
    return {
        "mla_bytes": mla_bytes,
        "mha_bytes": mha_bytes,
        "ratio": mla_bytes / mha_bytes,
        "mla_elems_per_layer": mla,
        "mha_elems_per_layer": mha,
    }


def _field_names() -> list[str]:
    """Names of every ModelArgs field (for config overrides)."""
    return [f.name for f in fields(ModelArgs)]
