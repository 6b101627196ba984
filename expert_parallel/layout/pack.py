"""Pack tokens into the static expert buffer and combine expert outputs back (index ops only)."""

from __future__ import annotations

import torch
from torch import Tensor

from .plan import DispatchPlan


def pack(x_SD: Tensor, plan: DispatchPlan) -> Tensor:
    """Copy every kept (token, choice) into its slot of the expert buffer.

    Args:
        x_SD: tokens ``[S, D]``.
        plan: the slot plan of these tokens.

    Returns:
        ``buffer_ECD [E, C, D]``: empty slots are zero. Differentiable (a gather; its backward
        is an index-add).
    """
    num_slots = plan.num_experts * plan.capacity
    token_KS = torch.arange(plan.num_tokens, device=x_SD.device).expand_as(plan.flat_index_KS)
    # source token of every slot; empty slots (and the scratch row) read the zero row S
    source_slot = torch.full((num_slots + 1,), plan.num_tokens, dtype=torch.long, device=x_SD.device)
    source_slot.scatter_(0, plan.flat_index_KS.reshape(-1), token_KS.reshape(-1))
    x_padded = torch.cat([x_SD, x_SD.new_zeros(1, x_SD.shape[1])])
    buffer = x_padded.index_select(0, source_slot[:num_slots])
    return buffer.view(plan.num_experts, plan.capacity, x_SD.shape[1])


def kept_weights(weight_SK: Tensor, plan: DispatchPlan, renormalize: bool) -> Tensor:
    """Combine weights ``[S, K]``: ``weight_SK`` as is, or with ``renormalize`` divided by their
    sum over the choices that survive capacity (a token with nothing kept gets zeros)."""
    if not renormalize:
        return weight_SK
    weight_SK = weight_SK * plan.kept_KS.t()
    total_S1 = weight_SK.sum(dim=-1, keepdim=True)
    return weight_SK / total_S1.clamp_min(torch.finfo(weight_SK.dtype).eps)


def combine(buffer_ECD: Tensor, plan: DispatchPlan, weight_SK: Tensor) -> Tensor:
    """Weighted sum of each token's expert outputs: ``y_s = sum_k w_sk * out[slot_sk]``.

    Dropped and undispatched choices contribute exactly 0, even where the buffer holds NaN or
    inf (the caller's residual connection carries a token whose every choice was dropped). The
    mask is an in-place fill of the freshly gathered rows: an out-of-place ``where`` over
    ``[K, S, D]`` made combine 2.3x slower on CPU.

    Args:
        buffer_ECD: expert outputs ``[E, C, D]`` in the slots of ``plan``.
        plan: the plan used to pack.
        weight_SK: combine weights ``[S, K]``.

    Returns:
        ``y_SD [S, D]`` in the buffer's dtype.
    """
    dim = buffer_ECD.shape[-1]
    flat = buffer_ECD.reshape(-1, dim)
    # not-kept entries point one past the end; any real row will do, it is zeroed below
    index_KS = plan.flat_index_KS.clamp_max(flat.shape[0] - 1)
    gathered_KSD = flat.index_select(0, index_KS.reshape(-1)).view(*index_KS.shape, dim)
    # that row may hold NaN/inf (0 * NaN = NaN): zero the not-kept rows, not just their weights
    gathered_KSD.masked_fill_(~plan.kept_KS.unsqueeze(-1), 0.0)
    weight_KS1 = weight_SK.t().unsqueeze(-1).to(buffer_ECD.dtype)
    return (gathered_KSD * weight_KS1).sum(dim=0)
