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
    for ranks in blocks + replicas:
        if len(ranks) > 1 and ranks not in _BUILT:
            # new_group is collective: every rank creates every group in the same order
            _GROUPS[ranks] = dist.new_group(list(ranks)) if len(ranks) < world else dist.group.WORLD
            _BUILT.add(ranks)
    return ExpertGroups(blocks[rank // ep_size], replicas[rank % ep_size])
