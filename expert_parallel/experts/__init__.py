"""Experts: stacked-weight batched FFN / SwiGLU (pure tensor code, no collectives), and the same
expert as a plain module for DeepSpeed-side models."""

from .plain import ACTIVATION_MODULES, SwiGLU, plain_expert
from .stacked import ACTIVATION_FNS, StackedExperts

__all__ = ["ACTIVATION_FNS", "ACTIVATION_MODULES", "StackedExperts", "SwiGLU", "plain_expert"]
