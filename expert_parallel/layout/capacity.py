"""The capacity formula: how many slots each expert's buffer has."""

from __future__ import annotations

import math
from fractions import Fraction


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
