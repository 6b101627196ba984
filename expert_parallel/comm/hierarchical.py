"""Hierarchical (two-level) all-to-all: one aggregated message per node pair and local index.

The EP group's ``R = Q * P`` ranks sit on ``Q`` nodes of ``P = ranks_per_node`` ranks; EP rank
``i = n * P + p`` is local rank ``p`` of node ``n``. A flat all-to-all sends ``R - P`` messages
of one block each over the slow inter-node links from every rank. The hierarchical one (Tutel's
2DH all-to-all; DeepEP's normal kernels route the same way) does it in two steps:

1. within the node (fast links): rank ``(n, p)`` sends local rank ``q`` every block bound for
   local index ``q`` on any node, so ``(n, q)`` then holds ``[P(source p), Q(dest node m), X]``:
   everything its node sends to ``(m, q)``, gathered;
2. across nodes, among the ranks with local index ``q``: ``(n, q)`` sends ``(m, q)`` its ``P``
   blocks for it as one message, and receives ``[Q(source node), P(source local), X]``, which is
   already the flat all-to-all's ``[R(source), X]`` (the scatter to the final rank happened in
   step 1, which placed every block on the rank with its destination's local index).

So each rank sends ``Q - 1`` inter-node messages of ``P`` blocks instead of ``R - P`` of one, and
the result equals the flat all-to-all bit for bit. Its gradient is the flat all-to-all of the
gradient, computed by the same two steps (``all_to_all.py``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from .groups import lookup, node_groups


class Hierarchy(NamedTuple):
    """The two groups of a hierarchical all-to-all (``None`` stands for a group of one rank).

    Attributes:
        intra: this rank's node: ``P`` ranks, in local-index order.
        inter: the ranks with this rank's local index on every node, in node order.
    """

    intra: Optional[ProcessGroup]
    inter: Optional[ProcessGroup]


@dataclass(frozen=True)
class NodeRanks:
    """The global ranks of a rank's two sub-groups (picklable; ``groups()`` looks them up).

    Attributes:
        intra: the EP ranks on this rank's node, in EP order.
        inter: the EP ranks with this rank's local index on every node, in EP order.
    """

    intra: tuple[int, ...]
    inter: tuple[int, ...]

    @classmethod
    def build(cls, ep_ranks: tuple[int, ...], ranks_per_node: int) -> NodeRanks:
        """This rank's sub-groups of the EP group ``ep_ranks``, created collectively on first use
        (``groups.node_groups``: call it on every rank). Raises ``ValueError`` as it does."""
        return cls(*node_groups(ep_ranks, ranks_per_node))

    def groups(self) -> Hierarchy:
        """The process groups (``groups.lookup``)."""
        return Hierarchy(lookup(self.intra), lookup(self.inter))


def within_nodes(x_RX: Tensor, hierarchy: Hierarchy) -> Tensor:
    """Step 1, blocking: ``[R(dest), X] -> [Q(dest node), P(source local), X]`` (flattened to
    ``[R, X]``), what this rank sends to each node's rank of its own local index in step 2.
    Not differentiable (``all_to_all`` wraps both steps)."""
    local = 1 if hierarchy.intra is None else dist.get_world_size(hierarchy.intra)
    nodes = x_RX.shape[0] // local
    by_local = x_RX.view(nodes, local, -1).transpose(0, 1).contiguous()  # [P(dest local), Q(dest node), X]
    if hierarchy.intra is not None:
        received = torch.empty_like(by_local)
        dist.all_to_all_single(received, by_local, group=hierarchy.intra)
        by_local = received  # [P(source local), Q(dest node), X]
    return by_local.transpose(0, 1).reshape(x_RX.shape)


def resolve_ranks_per_node(ranks_per_node: Optional[int], ep_size: int) -> int:
    """``ranks_per_node``, or the launcher's ``LOCAL_WORLD_SIZE`` (torchrun, the DeepSpeed
    launcher) when it is ``None``.

    Raises:
        ValueError: neither is usable, or ``ep_size`` is not a multiple of it.
    """
    if ranks_per_node is None:
        value = os.environ.get("LOCAL_WORLD_SIZE", "")
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"MoEConfig.a2a='hierarchical' with ranks_per_node=None reads the launcher's "
                             f"LOCAL_WORLD_SIZE, which is {value or 'unset'!r}; set MoEConfig.ranks_per_node to "
                             "the ranks on each node, or launch with torchrun")
        ranks_per_node = int(value)
        if ep_size % ranks_per_node:
            raise ValueError(f"LOCAL_WORLD_SIZE={ranks_per_node} (ranks per node) does not divide ep_size="
                             f"{ep_size}; set MoEConfig.ranks_per_node to a divisor of ep_size, use EP groups of "
                             "whole nodes, or a2a='flat'")
    return ranks_per_node
