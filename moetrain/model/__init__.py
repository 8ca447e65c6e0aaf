"""moetrain.model: plain single-device PyTorch MLA + DeepSeekMoE decoder (no torch.distributed).

Public API (see docs/interfaces.md):
    ModelArgs, FLAVORS, get_flavor, param_counts, flops_per_token, kv_cache_per_token  (args)
    Transformer, Block, MLP, RMSNorm                                                    (transformer)
    MLA, precompute_freqs_cis, apply_rotary_emb, sdpa_attention, mla_absorbed_attention (mla)
    Gate, GroupedExperts, MoE                                                           (moe)
    LocalDispatcher                                                                     (dispatch)
"""
from moetrain.model.args import (FLAVORS, ModelArgs, flops_per_token, get_flavor,
                                 kv_cache_per_token, param_counts)
from moetrain.model.dispatch import LocalDispatcher
from moetrain.model.mla import (MLA, LatentKVCache, apply_rotary_emb, mla_absorbed_attention,
                                precompute_freqs_cis, sdpa_attention)
from moetrain.model.moe import Gate, GroupedExperts, MoE
from moetrain.model.transformer import MLP, Block, RMSNorm, Transformer

__all__ = [
    "ModelArgs", "FLAVORS", "get_flavor", "param_counts", "flops_per_token", "kv_cache_per_token",
    "Transformer", "Block", "MLP", "RMSNorm",
    "MLA", "LatentKVCache", "precompute_freqs_cis", "apply_rotary_emb", "sdpa_attention",
    "mla_absorbed_attention",
    "Gate", "GroupedExperts", "MoE", "LocalDispatcher",
]
