"""Expert-parallel (EP) and expert-data-parallel process groups.

World = ``ep_size * dp``. EP groups are blocks of consecutive ranks (``[0..ep)``, ``[ep..2ep)``,
...), as DeepSpeed lays them out; the expert-data-parallel group of a rank holds the ranks with
the same position in every block (the replicas of the same experts).

Modules never hold a process group (so they deep-copy and pickle); they hold the tuple of global
ranks, and ``lookup`` returns the group registered for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist
from torch.distributed import ProcessGroup

# lookup table: ranks -> the group to use (built here or registered by a caller)
_GROUPS: dict[tuple[int, ...], Optional[ProcessGroup]] = {}
# the groups expert_groups created: new_group is collective, so whether to call it must depend on
# this rank's own history of expert_groups calls only, never on which groups a caller registered
_BUILT: set[tuple[int, ...]] = set()


@dataclass(frozen=True)
class ExpertGroups:
    """The two groups a rank takes part in (``None`` means the single-rank local case).

    Attributes:
        ep_ranks: global ranks of this rank's EP group, in EP order.
        expert_dp_ranks: global ranks holding replicas of this rank's experts.
    """

    ep_ranks: tuple[int, ...]
    expert_dp_ranks: tuple[int, ...]

    @property
    def ep_group(self) -> Optional[ProcessGroup]:
        """The EP process group (``None`` when it has one rank)."""
        return lookup(self.ep_ranks)

    @property
    def expert_dp_group(self) -> Optional[ProcessGroup]:
        """The expert-data-parallel process group (``None`` when it has one rank)."""
        return lookup(self.expert_dp_ranks)


def register(group: Optional[ProcessGroup]) -> tuple[int, ...]:
    """Remember ``group`` and return its key, the tuple of its global ranks."""
    if group is None:
        return (dist.get_rank(),) if dist.is_initialized() else (0,)
    ranks = tuple(dist.get_process_group_ranks(group))
    _GROUPS[ranks] = group
    return ranks


def lookup(ranks: tuple[int, ...]) -> Optional[ProcessGroup]:
    """The group registered for ``ranks``; ``None`` for a single rank.

    Raises:
        RuntimeError: if no group was registered for ``ranks`` in this process (e.g. a module
            moved to a process that did not build its groups).
    """
    if len(ranks) == 1:
        return None
    if ranks not in _GROUPS:
        raise RuntimeError(
            f"no process group for ranks {ranks} in this process; build the groups with "
            "expert_parallel.comm.expert_groups(ep_size) (or pass ep_group) on every rank first"
        )
    return _GROUPS[ranks]


def expert_groups(ep_size: int) -> ExpertGroups:
    """Build (once per ``ep_size``) and return this rank's EP and expert-data-parallel groups.

    Must be called on every rank (it creates process groups collectively).

    Raises:
        RuntimeError: ``ep_size > 1`` without an initialised process group.
        ValueError: the world size is not a multiple of ``ep_size``.
    """
    if not dist.is_initialized():
        if ep_size > 1:
            raise RuntimeError(
                f"ep_size={ep_size} needs an initialised torch.distributed process group; call "
                "torch.distributed.init_process_group first (or use ep_size=1)"
            )
        return ExpertGroups((0,), (0,))
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % ep_size:
        raise ValueError(
            f"ep_size={ep_size} does not divide the world size {world}; choose an ep_size that "
            "divides it (world = ep_size * data-parallel size)"
        )
    blocks = [tuple(range(start, start + ep_size)) for start in range(0, world, ep_size)]
    replicas = [tuple(range(pos, world, ep_size)) for pos in range(ep_size)]
    _build(blocks + replicas)
    return ExpertGroups(blocks[rank // ep_size], replicas[rank % ep_size])


def _build(rank_sets: list[tuple[int, ...]]) -> None:
    """Create (once each) the groups of ``rank_sets``; every rank must pass the same list."""
    world = dist.get_world_size()
    for ranks in rank_sets:
        if len(ranks) > 1 and ranks not in _BUILT:
            # new_group is collective: every rank creates every group in the same order
            _GROUPS[ranks] = dist.new_group(list(ranks)) if len(ranks) < world else dist.group.WORLD
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
    key = (ep_ranks, ranks_per_node)
    if key in _NODE_RANKS:
        return _NODE_RANKS[key]
    every = [ep_ranks]
    if dist.is_initialized() and dist.get_world_size() > 1:
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, ep_ranks)
    groups = sorted(set(every))
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
    where = ep_ranks.index(dist.get_rank()) if dist.is_initialized() else 0
    start = where - where % ranks_per_node
    _NODE_RANKS[key] = (ep_ranks[start:start + ranks_per_node], ep_ranks[where % ranks_per_node::ranks_per_node])
    return _NODE_RANKS[key]
