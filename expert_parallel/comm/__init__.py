"""Communication: process groups, autograd all-to-all, dispatcher. The only code that calls
collectives; it knows nothing of gates."""

from .all_to_all import agree_max, all_to_all
from .dispatcher import dispatch, undispatch
from .grads import reduce_gradients
from .groups import ExpertGroups, expert_groups, lookup, register

__all__ = ["ExpertGroups", "agree_max", "all_to_all", "dispatch", "expert_groups", "lookup",
           "reduce_gradients", "register", "undispatch"]
