"""Layout: capacity, slot planning, pack and combine (pure tensor math, no collectives)."""

from .capacity import capacity_input, chunk_bounds, expert_capacity, fill_within, layer_capacity
from .compact import ExpertRows, expert_rows
from .pack import combine, kept_weights, pack
from .plan import DispatchPlan, SlotAssignment, assign_slots
from .workspace import Workspace

__all__ = ["DispatchPlan", "ExpertRows", "SlotAssignment", "assign_slots", "capacity_input", "chunk_bounds", "combine",
           "expert_capacity", "expert_rows", "fill_within", "kept_weights", "layer_capacity", "pack", "Workspace"]
