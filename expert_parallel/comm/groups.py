"""Expert-parallel (EP), expert-data-parallel, tensor-parallel (TP) and data-parallel groups.

World = ``tp * dp`` ranks. TP groups are blocks of ``tp`` consecutive ranks (Megatron's layout);
the data-parallel group of a rank holds the ranks with the same TP rank (``r, r + tp, ...``).
EP groups are formed within each data-parallel group, as DeepSpeed does for a model with an mpu
(``_get_expert_parallel_ranks``): blocks of ``ep_size`` consecutive entries of it. With
``tp == 1`` that is blocks of consecutive ranks (``[0..ep)``, ``[ep..2ep)``, ...). The
expert-data-parallel group of a rank holds the ranks with the same experts: the same position in
every EP block, and with experts not split over TP (``expert_tensor_parallel=False``) every TP
rank of those too (they hold the whole experts and compute different slots).

Modules never hold a process group (so they deep-copy and pickle); they hold the tuple of global
ranks, and ``lookup`` returns the group registered for it.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch.distributed as dist
from torch.distributed import ProcessGroup

from .gather import gather_objects

# lookup table: ranks -> the group to use (built here or registered by a caller), held weakly: torch
# holds every group until destroy_process_group, and one still referenced when the interpreter
# shuts down is destroyed during finalization, where gloo aborts the exit in a good share of runs
# ("terminate called without an active exception"; tests/distributed/test_teardown.py)
_GROUPS: dict[tuple[int, ...], Callable[[], Union[ProcessGroup, int, None]]] = {}
# the groups expert_groups created: new_group is collective, so whether to call it must depend on
# this rank's own history of expert_groups calls only, never on which groups a caller registered
_BUILT: set[tuple[int, ...]] = set()
# the world group the tables were filled in (weakly): once the world is destroyed and initialised
# again, every rank forgets what it built or registered for the old one, and builds anew
_WORLD: Optional[weakref.ref[ProcessGroup]] = None


def held(group: Union[ProcessGroup, int, None],
         destroyed: str = "a backward ran after the process group of its forward's collective was destroyed "
                          "(destroy_process_group); run the backward before tearing the groups down",
         ) -> Callable[[], Union[ProcessGroup, int, None]]:
    """A weak hold on ``group``: calling it gives the group back, and raises
    ``RuntimeError(destroyed)`` once the group has been destroyed. Anything else (``None`` for one
    rank, ``new_group``'s int marker for a rank outside the group) is kept as it is. The group table
    and every autograd graph over a group hold it this way, so a graph alive at exit (an output kept
    in a global) keeps no group past destroy_process_group into interpreter shutdown (see
    ``_GROUPS``)."""
    if not isinstance(group, ProcessGroup):
        return lambda: group
    ref = weakref.ref(group)

    def alive() -> ProcessGroup:
        found = ref()
        if found is None:
            raise RuntimeError(destroyed)
        return found
    return alive


def _remember(ranks: tuple[int, ...], group: Union[ProcessGroup, int]) -> None:
    """Put ``group`` in the table under ``ranks`` (held weakly)."""
    _GROUPS[ranks] = held(group, f"the process group for ranks {ranks} was destroyed (destroy_process_group); "
                                 "after init_process_group build the groups again with "
                                 "expert_parallel.comm.expert_groups(ep_size) (or register a live group) on every rank")


def _same_world() -> None:
    """Forget the tables if they were filled in a world that has been destroyed since."""
    global _WORLD
    if _WORLD is None or _WORLD() is not dist.group.WORLD:
        forget()
        _WORLD = weakref.ref(dist.group.WORLD)


@dataclass(frozen=True)
class ExpertGroups:
    """The groups a rank takes part in (``None`` means the single-rank local case).

    Attributes:
        ep_ranks: global ranks of this rank's EP group, in EP order.
        expert_dp_ranks: global ranks holding replicas of this rank's experts (or expert slices).
        tp_ranks: global ranks of this rank's TP group, in TP order (this rank alone without TP).
        dp_ranks: global ranks of this rank's data-parallel group (the world without TP): dense
            gradients are averaged over it.
    """

    ep_ranks: tuple[int, ...]
    expert_dp_ranks: tuple[int, ...]
    tp_ranks: tuple[int, ...]
    dp_ranks: tuple[int, ...]

    @property
    def ep_group(self) -> Optional[ProcessGroup]:
        """The EP process group (``None`` when it has one rank)."""
        return lookup(self.ep_ranks)

    @property
    def expert_dp_group(self) -> Optional[ProcessGroup]:
        """The expert-data-parallel process group (``None`` when it has one rank)."""
        return lookup(self.expert_dp_ranks)

    @property
    def tp_group(self) -> Optional[ProcessGroup]:
        """The TP process group (``None`` when it has one rank)."""
        return lookup(self.tp_ranks)

    @property
    def dp_group(self) -> Optional[ProcessGroup]:
        """The data-parallel process group (``None`` when it has one rank)."""
        return lookup(self.dp_ranks)


def rank() -> int:
    """This process's global rank (0 without an initialised process group)."""
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    """The world size (1 without an initialised process group)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def register(group: Optional[ProcessGroup]) -> tuple[int, ...]:
    """Remember ``group`` and return its key, the tuple of its global ranks (``None``: this rank alone)."""
    if group is None:
        return (rank(),)
    _same_world()
    ranks = tuple(dist.get_process_group_ranks(group))
    _remember(ranks, group)
    return ranks


def lookup(ranks: tuple[int, ...]) -> Optional[ProcessGroup]:
    """The group registered for ``ranks``; ``None`` for a single rank.

    Raises:
        RuntimeError: if no group was registered for ``ranks`` in this process (e.g. a module
            moved to a process that did not build its groups), or it was destroyed since.
    """
    if ranks is None:
        raise RuntimeError("no process group ranks yet: the module is not bound to its groups; call "
                           "layer.bind(...) (a layer built with bind=False) before the forward")
    if len(ranks) == 1:
        return None
    if ranks not in _GROUPS:
        raise RuntimeError(
            f"no process group for ranks {ranks} in this process; build the groups with "
            "expert_parallel.comm.expert_groups(ep_size) (or pass ep_group) on every rank first"
        )
    return _GROUPS[ranks]()


def expert_groups(ep_size: int, tp_size: int = 1, expert_tensor_parallel: bool = False) -> ExpertGroups:
    """Build (once per layout) and return this rank's groups (see the module docstring).

    Must be called on every rank (it creates process groups collectively).

    Args:
        ep_size: EP group size (``MoEConfig.ep_size``).
        tp_size: TP group size (``MoEConfig.tp_size``).
        expert_tensor_parallel: the experts are split over the TP group (``MoEConfig``'s), which
            narrows the expert-data-parallel groups to one TP rank.

    Raises:
        RuntimeError: ``ep_size * tp_size > 1`` without an initialised process group.
        ValueError: the world size is not a multiple of ``ep_size * tp_size``.
    """
    if not dist.is_initialized():
        if ep_size * tp_size > 1:
            raise RuntimeError(
                f"ep_size={ep_size} and tp_size={tp_size} need an initialised torch.distributed process "
                "group; call torch.distributed.init_process_group first (or use ep_size=1 and tp_size=1)"
            )
        return ExpertGroups((0,), (0,), (0,), (0,))
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % (ep_size * tp_size):
        times = f" times tp_size={tp_size}" if tp_size > 1 else ""
        raise ValueError(
            f"ep_size={ep_size}{times} does not divide the world size {world}; choose an ep_size (and tp_size) "
            "whose product divides it (world = tp_size * data-parallel size, a multiple of ep_size)"
        )
    tps = [tuple(range(start, start + tp_size)) for start in range(0, world, tp_size)]
    dps = [tuple(range(lane, world, tp_size)) for lane in range(tp_size)]
    eps = [dp[start:start + ep_size] for dp in dps for start in range(0, len(dp), ep_size)]
    # ranks at EP position p hold the same experts: in every EP block of one TP lane, or of all lanes
    expert_dps = [tuple(sorted(ep[pos] for ep in eps if not expert_tensor_parallel or ep[0] % tp_size == lane))
                  for lane in range(tp_size if expert_tensor_parallel else 1) for pos in range(ep_size)]
    _build(tps + dps + eps + expert_dps)

    def mine(candidates: list[tuple[int, ...]]) -> tuple[int, ...]:
        return next(ranks for ranks in candidates if rank in ranks)

    return ExpertGroups(mine(eps), mine(expert_dps), mine(tps), mine(dps))


def _build(rank_sets: list[tuple[int, ...]]) -> None:
    """Create (once each) the groups of ``rank_sets``; every rank must pass the same list."""
    _same_world()
    world = dist.get_world_size()
    for ranks in rank_sets:
        if len(ranks) > 1 and ranks not in _BUILT:
            # new_group is collective: every rank creates every group in the same order
            _remember(ranks, dist.new_group(list(ranks)) if len(ranks) < world else dist.group.WORLD)
            _BUILT.add(ranks)


# (EP ranks, ranks per node) -> this rank's (node, same-local-index) ranks, once node_groups built them
_NODE_RANKS: dict[tuple[tuple[int, ...], int], tuple[tuple[int, ...], tuple[int, ...]]] = {}


def node_groups(ep_ranks: tuple[int, ...], ranks_per_node: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Build the sub-groups of a hierarchical all-to-all over the EP group ``ep_ranks`` and return
    this rank's: the EP ranks on its node (EP positions ``[n*P, (n+1)*P)``, ``P =
    ranks_per_node``), and the EP ranks with its local index on every node (positions ``p, p+P,
    ...``), both in EP order; ``lookup`` gives their groups.

    Collective over the world at the first call for a given (EP group, ``ranks_per_node``): every
    rank's EP ranks are all-gathered (one host-side collective, at construction only), so every
    rank creates every EP group's sub-groups in the same order, whatever groups the caller passed.

    Raises:
        ValueError: the EP group's size is not a multiple of ``ranks_per_node``, or a node's block
            of EP ranks spans two launcher nodes (global rank ``// ranks_per_node`` differs).
    """
    _same_world()
    key = (ep_ranks, ranks_per_node)
    if key in _NODE_RANKS:
        return _NODE_RANKS[key]
    groups = sorted(set(gather_objects(ep_ranks)))
    for ranks in groups:
        if len(ranks) % ranks_per_node:
            raise ValueError(f"the EP group {ranks} has {len(ranks)} ranks, not a multiple of ranks_per_node="
                             f"{ranks_per_node}; set ranks_per_node to a divisor of ep_size, or use a2a='flat'")
        nodes = [ranks[start:start + ranks_per_node] for start in range(0, len(ranks), ranks_per_node)]
        if any(len({rank // ranks_per_node for rank in node}) > 1 for node in nodes):
            raise ValueError(f"the EP group {ranks} does not split into whole nodes of ranks_per_node="
                             f"{ranks_per_node} consecutive global ranks; use EP groups of whole nodes, or "
                             "a2a='flat'")
        _build(nodes + [ranks[pos::ranks_per_node] for pos in range(ranks_per_node)])
    where = ep_ranks.index(rank())
    start = where - where % ranks_per_node
    _NODE_RANKS[key] = (ep_ranks[start:start + ranks_per_node], ep_ranks[where % ranks_per_node::ranks_per_node])
    return _NODE_RANKS[key]


def forget() -> None:
    """Forget every group this process built or registered (for a process that outlives its
    groups: ``spawn``'s pooled ranks destroy them between runs)."""
    _GROUPS.clear()
    _BUILT.clear()
    _NODE_RANKS.clear()
