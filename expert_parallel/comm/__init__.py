"""Communication: process groups, the per-batch agreement, autograd all-to-all (blocking, started
asynchronously, flat or hierarchical), dispatcher, the tensor-parallel edges, gathers for saving.
The only code that calls collectives; it knows nothing of gates."""

from .agreement import Agreement, agree, device_for_backend
from .all_to_all import A2AGroup, PendingAllToAll, all_to_all, all_to_all_start
from .balance import update_selection_biases
from .counts import sum_over_ranks
from .dispatcher import (
    by_expert,
    by_source,
    dispatch,
    exchange,
    exchange_back,
    exchange_back_start,
    exchange_fill,
    exchange_start,
    undispatch,
)
from .gather import all_gather_along, gather_experts, gather_objects
from .grads import reduce_gradients
from .groups import ExpertGroups, expert_groups, lookup, node_groups, register
from .hierarchical import Hierarchy, NodeRanks, resolve_ranks_per_node
from .tensor_parallel import tp_copy, tp_drop, tp_gather, tp_reduce

__all__ = ["A2AGroup", "Agreement", "ExpertGroups", "Hierarchy", "NodeRanks", "PendingAllToAll", "agree",
           "all_gather_along", "all_to_all", "all_to_all_start", "by_expert", "by_source", "device_for_backend",
           "dispatch", "exchange", "exchange_back", "exchange_back_start", "exchange_fill", "exchange_start",
           "expert_groups", "gather_experts", "gather_objects", "lookup", "node_groups", "reduce_gradients",
           "register", "resolve_ranks_per_node", "sum_over_ranks", "tp_copy", "tp_drop", "tp_gather", "tp_reduce",
           "undispatch", "update_selection_biases"]
