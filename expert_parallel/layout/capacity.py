"""The capacity rule: how many slots each expert's buffer has (pure arithmetic)."""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Optional, Union

from torch import Tensor

from ..config import MoEConfig


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float,
                    min_capacity: int) -> int:
    """``C = max(min_capacity, ceil(top_k * num_tokens * capacity_factor / num_experts))``.

    Args:
        num_tokens: ``S``, the largest local token count in the EP group.
        num_experts: global expert count ``E``.
        top_k: choices per token ``K``.
        capacity_factor: slack over an even split.
        min_capacity: lower bound.

    Returns:
        The capacity, at least 1 so buffers never have a zero dimension.
    """
    # exact arithmetic on the decimal the user wrote: 100 * 1.1 / 11 is 10, not 10.000000000000002
    even_split = math.ceil(top_k * num_tokens * Fraction(repr(float(capacity_factor))) / num_experts)
    return max(min_capacity, even_split, 1)


def capacity_input(cfg: MoEConfig, num_tokens: int, count_E: Tensor, proposed: Optional[int]) -> Union[int, Tensor]:
    """What this rank feeds the capacity rule (the EP group then agrees on the maximum).

    Args:
        cfg: the layer config.
        num_tokens: ``S``, this rank's token count.
        count_E: dispatched assignments per expert ``[E]`` before capacity (on the device).
        proposed: the router's own capacity for this batch (``Routing.capacity``), or ``None``.

    Returns:
        With ``drop_tokens=False`` the fullest expert's count (a device scalar: no host read);
        else the router's proposal if it made one, else ``S`` (also for ``dropless``). 0 with a
        fixed capacity or ``max_tokens_per_rank`` (nothing to agree on).
    """
    if cfg.capacity is not None or cfg.max_tokens_per_rank is not None:
        return 0
    if not cfg.drop_tokens:
        return count_E.max() if count_E.numel() else 0
    return num_tokens if proposed is None else proposed


def layer_capacity(cfg: MoEConfig, agreed_input: int, training: bool, proposed: bool) -> int:
    """The capacity ``C`` every EP rank uses, from the group's maximum ``capacity_input``.

    A fixed ``cfg.capacity`` wins; ``dropless`` takes ``max_tokens_per_rank`` if set, else the
    group's largest token count (an expert takes a token at most once, so nothing drops);
    ``drop_tokens=False`` or a router's proposal is used as it is; otherwise ``expert_capacity``
    of the largest token count with the capacity factor of the mode (``capacity_factor`` in
    training, ``eval_capacity_factor`` in eval). Always at least 1 (0 tokens on every rank
    still exchange one empty slot). The derived capacity is rounded up to a multiple of
    ``cfg.tp_size`` (each TP rank sends ``C / tp_size`` slots of every expert).

    Args:
        cfg: the layer config.
        agreed_input: the maximum over the EP group of ``capacity_input``.
        training: the layer's mode.
        proposed: the router proposed a capacity (``Routing.capacity is not None``).
    """
    if cfg.capacity is not None:
        return cfg.capacity  # validated divisible by tp_size
    if cfg.max_tokens_per_rank is not None:
        capacity = cfg.max_tokens_per_rank
    elif not cfg.drop_tokens or proposed or cfg.dropless:
        capacity = max(agreed_input, 1)
    else:
        capacity = expert_capacity(agreed_input, cfg.num_experts, cfg.num_choices, cfg.capacity_factor_for(training),
                                   cfg.min_capacity)
    return -(-capacity // cfg.tp_size) * cfg.tp_size  # every TP rank sends an equal share of the slots


def chunk_bounds(capacity: int, num_chunks: int) -> list[tuple[int, int]]:
    """Split the ``capacity`` slots of every expert into ``min(num_chunks, capacity)`` chunks of
    consecutive slots, ``(first slot, size)`` each, sizes differing by at most one (the first
    ``capacity % chunks`` take one slot more, as ``numpy.array_split``): the capacity is never
    rounded, so a chunked layer keeps and drops exactly the tokens an unchunked one does.

    Example: ``chunk_bounds(10, 4) == [(0, 3), (3, 3), (6, 2), (8, 2)]``; ``chunk_bounds(3, 4) ==
    [(0, 1), (1, 1), (2, 1)]``.
    """
    chunks = min(num_chunks, capacity)
    size, extra = divmod(capacity, chunks)
    sizes = [size + (index < extra) for index in range(chunks)]
    return [(sum(sizes[:index]), sizes[index]) for index in range(chunks)]


def fill_within(fill: Tensor, first: int, size: int) -> Tensor:
    """How many of each block's filled slots (slots ``0 .. fill-1``; slots fill in order) lie in the
    window of slots ``first : first + size``: ``clamp(fill - first, 0, size)``, any shape. A chunk's
    fill (``chunk_bounds``), or a TP rank's share of the slots. No host sync."""
    return (fill - first).clamp(0, size)
