"""Mixed precision: FP8 module swaps (``moetrain.precision.fp8``; DeepSeek-V3 §3.3 fine-grained FP8)."""
from .fp8 import RECIPES, Fp8Config, Fp8GroupedExperts, Fp8Linear, apply_fp8, fp8_linear, resolve_backend

__all__ = ["RECIPES", "Fp8Config", "Fp8GroupedExperts", "Fp8Linear", "apply_fp8", "fp8_linear", "resolve_backend"]
