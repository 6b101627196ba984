"""Experts: stacked-weight batched FFN / SwiGLU (pure tensor code, no collectives), the same
expert as a plain module for DeepSpeed-side models, and the base class that identifies expert
parameters by the module owning them."""

from .base import Experts, sharded_expert_parameters
from .plain import SwiGLU, plain_expert
from .stacked import StackedExperts, grouped_gemm_supported, grouped_gemm_traceable

__all__ = ["Experts", "StackedExperts", "SwiGLU", "grouped_gemm_supported", "grouped_gemm_traceable", "plain_expert",
           "sharded_expert_parameters"]
