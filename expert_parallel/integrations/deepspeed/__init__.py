"""DeepSpeed integration: ``MoE`` is a drop-in for ``deepspeed.moe.layer.MoE``.

This package is the only code of ``expert_parallel`` that imports ``deepspeed``; the core runs
without it. See docs/deepspeed.md.
"""

from .engine import EngineModel, ExpertGroupDeclaration
from .experts import ExpertSpec, GenericExperts, detect_expert
from .moe import DeepSpeedMoELayer, MoE

__all__ = ["DeepSpeedMoELayer", "EngineModel", "ExpertGroupDeclaration", "ExpertSpec", "GenericExperts", "MoE",
           "detect_expert"]
