"""Communication: process groups, the per-batch agreement, autograd all-to-all (blocking, started
asynchronously, flat or hierarchical), dispatcher, the tensor-parallel edges, gathers for saving.
The only code that calls collectives; it knows nothing of gates."""

from .agreement import Agreement, agree, device_for_backend
from .all_to_all import A2AGroup, PendingAllToAll, all_to_all, all_to_all_start
from .balance import RankSummed, update_selection_biases
from .counts import sum_over_ranks
from .dispatcher import (
    by_expert,
    by_source,
    exchange,
    exchange_back,
    exchange_back_start,
    exchange_fill,
    exchange_start,
)
from .gather import all_gather_along, gather_experts, gather_objects
from .grads import clip_grad_norm_, grad_norm, reduce_gradients
from .groups import ExpertGroups, expert_groups, lookup, node_groups, rank, register, world_size
from .hierarchical import Hierarchy, NodeRanks, resolve_ranks_per_node
from .tensor_parallel import tp_copy, tp_drop, tp_gather, tp_reduce
from .uneven import UnevenInputs, moe_layers

__all__ = ["A2AGroup", "agree", "Agreement", "all_gather_along", "all_to_all", "all_to_all_start", "by_expert",
           "by_source", "clip_grad_norm_", "device_for_backend", "exchange", "exchange_back", "exchange_back_start",
           "exchange_fill", "exchange_start", "expert_groups", "ExpertGroups", "gather_experts", "gather_objects",
           "grad_norm", "Hierarchy", "lookup", "moe_layers", "node_groups", "NodeRanks", "PendingAllToAll", "rank",
           "RankSummed", "reduce_gradients", "register", "resolve_ranks_per_node", "sum_over_ranks", "tp_copy",
           "tp_drop", "tp_gather", "tp_reduce", "UnevenInputs", "update_selection_biases", "world_size"]
