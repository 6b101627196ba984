"""Layout: capacity, slot planning, pack and combine (pure tensor math, no collectives)."""

from .capacity import expert_capacity
from .pack import combine, kept_weights, pack
from .plan import DispatchPlan, SlotAssignment, assign_slots, plan_slots

__all__ = ["DispatchPlan", "SlotAssignment", "assign_slots", "combine", "expert_capacity",
           "kept_weights", "pack", "plan_slots"]
