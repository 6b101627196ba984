"""Which tokens a layer routes (``token_mask``) and which tokens its balance loss averages over
(``MoEConfig.aux_loss_scope``): the layer's hooks around ``route``."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .comm import sum_over_ranks
from .config import MoEConfig
from .counting import count_ids
from .routing import Routing, global_balance_loss, sequence_balance_loss


class Tokens(NamedTuple):
    """The routed tokens of one input ``[..., T, D]`` of ``S_all`` tokens.

    Attributes:
        index_S: positions of the routed tokens among the flattened ``S_all`` (long), or ``None``
            when every token is routed.
        total: ``S_all``.
        length: tokens per sequence ``T`` (the sequences are the input's leading dimensions but
            the last two, flattened; an input ``[T, D]`` is one sequence).
        num_sequences: ``B``.
    """

    index_S: Optional[Tensor]
    total: int
    length: int
    num_sequences: int

    def sequence_S(self, device: torch.device) -> Tensor:
        """Each routed token's sequence ``[S]`` (long, on ``device``); no host sync."""
        position_S = torch.arange(self.total, device=device) if self.index_S is None else self.index_S
        return position_S // self.length


def mask_error(x: Tensor, token_mask: Optional[Tensor]) -> Optional[str]:
    """Why ``token_mask`` cannot select tokens of ``x [..., D]`` (a message naming the fix), or ``None``."""
    if token_mask is None:
        return None
    if not isinstance(token_mask, Tensor) or token_mask.dtype != torch.bool:
        kind = token_mask.dtype if isinstance(token_mask, Tensor) else type(token_mask).__name__
        return f"MoELayer token_mask must be a bool tensor (True: route the token), got {kind}; pass mask.bool()"
    if token_mask.shape != x.shape[:-1]:
        return (f"MoELayer token_mask has shape {tuple(token_mask.shape)}, but it must be the input's leading "
                f"shape {tuple(x.shape[:-1])} (one flag per token)")
    return None


def select_tokens(x: Tensor, token_mask: Optional[Tensor]) -> tuple[Tensor, Tokens]:
    """``x [..., D]`` flattened to the routed tokens ``x_SD [S, D]``, and where they came from.

    Without a mask nothing is copied and nothing syncs; with one, the kept positions are found
    by ``nonzero`` (one host sync: the count sizes the routed batch).
    """
    x_AD = x.reshape(-1, x.shape[-1])
    length = max(x.shape[-2] if x.dim() >= 3 else x_AD.shape[0], 1)
    num_sequences = x_AD.shape[0] // length if x.dim() >= 3 else 1
    if token_mask is None:
        return x_AD, Tokens(None, x_AD.shape[0], length, num_sequences)
    index_S = token_mask.reshape(-1).nonzero().squeeze(1)
    return x_AD[index_S], Tokens(index_S, x_AD.shape[0], length, num_sequences)


def place_tokens(y_SD: Tensor, tokens: Tokens) -> Tensor:
    """The routed tokens' output ``[S, D]`` back at their positions ``[S_all, D]``; 0 for the
    masked ones (differentiable, no host sync)."""
    if tokens.index_S is None:
        return y_SD
    return y_SD.new_zeros(tokens.total, y_SD.shape[1]).index_copy(0, tokens.index_S, y_SD)


def scoped_routing(routing: Routing, cfg: MoEConfig, tokens: Tokens) -> Routing:
    """``routing`` with its load-balancing loss over the tokens ``cfg.aux_loss_scope`` names:
    unchanged for ``"batch"``; for ``"sequence"`` ``routing.sequence_balance_loss`` per sequence;
    for ``"global"`` ``routing.global_balance_loss`` with the counts of every rank (one
    all-reduce over the world, ``comm.sum_over_ranks``; no host sync)."""
    if cfg.aux_loss_scope == "batch" or "load_balance" not in routing.losses:
        return routing
    expert_SX = routing.expert_SK[:, :routing.balance_choices]
    if cfg.aux_loss_scope == "sequence":
        loss = sequence_balance_loss(routing.probs_SE, expert_SX, tokens.sequence_S(expert_SX.device),
                                     tokens.num_sequences)
    else:
        loss = global_balance_loss(routing.probs_SE, sum_over_ranks(count_ids(expert_SX, cfg.num_experts)))
    return dataclasses.replace(routing, losses={**routing.losses, "load_balance": loss})
