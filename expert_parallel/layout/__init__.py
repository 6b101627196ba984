"""Layout: capacity, slot planning, pack and combine (pure tensor math, no collectives)."""

from .capacity import expert_capacity
from .pack import combine, pack
from .plan import DispatchPlan, plan_slots

__all__ = ["DispatchPlan", "combine", "expert_capacity", "pack", "plan_slots"]
