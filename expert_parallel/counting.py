"""Counting ids without a host sync (shared by routing/ and layout/)."""

from __future__ import annotations

import torch
from torch import Tensor


def count_ids(ids: Tensor, num_bins: int) -> Tensor:
    """Occurrences of each id in ``[0, num_bins)``: ``[num_bins]`` long.

    ``torch.bincount`` would do, but on CUDA it reads ``ids.max()`` back to the host to size its
    output, a sync in every forward; the bin count is known here, so an index-add does the job.
    """
    flat = ids.reshape(-1)
    return torch.zeros(num_bins, dtype=torch.long, device=ids.device).index_add_(0, flat, torch.ones_like(flat))
