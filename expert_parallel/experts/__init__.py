"""Experts: stacked-weight batched FFN / SwiGLU (pure tensor code, no collectives)."""

from .stacked import ACTIVATION_FNS, StackedExperts

__all__ = ["ACTIVATION_FNS", "StackedExperts"]
