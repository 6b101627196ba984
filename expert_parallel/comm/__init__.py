"""Communication: process groups, the per-batch agreement, autograd all-to-all, dispatcher, the
tensor-parallel edges. The only code that calls collectives; it knows nothing of gates."""

from .agreement import Agreement, agree, device_for_backend
from .all_to_all import all_to_all
from .balance import update_selection_biases
from .dispatcher import dispatch, exchange, exchange_back, exchange_fill, undispatch
from .gather import gather_experts, gather_objects
from .grads import reduce_gradients
from .groups import ExpertGroups, expert_groups, lookup, register
from .tensor_parallel import tp_copy, tp_drop, tp_gather, tp_reduce

__all__ = ["Agreement", "ExpertGroups", "agree", "all_to_all", "device_for_backend", "dispatch", "exchange",
           "exchange_back", "exchange_fill", "expert_groups", "gather_experts", "gather_objects", "lookup",
           "reduce_gradients", "register", "tp_copy", "tp_drop", "tp_gather", "tp_reduce", "undispatch",
           "update_selection_biases"]
