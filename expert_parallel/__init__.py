"""expert_parallel: an expert-parallel Mixture-of-Experts runtime for PyTorch."""

from . import presets
from .config import MoEConfig
from .layer import MoELayer, MoEOutput
from .stats import RoutingStats

__all__ = ["MoEConfig", "MoELayer", "MoEOutput", "RoutingStats", "presets"]
__version__ = "0.1.0"
