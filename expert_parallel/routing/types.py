"""The result of routing, shared by every router."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

from torch import Tensor


@dataclass(frozen=True)
class Routing:
    """What a router decided for ``S`` tokens and ``K`` choices per token.

    Attributes:
        expert_SK: chosen global expert ids ``[S, K]`` (long); column k is the k-th choice (for
            ``soft`` and ``expert_choice``, K = E and column k is expert k).
        weight_SK: combine weights ``[S, K]`` (fp32); 0 where a choice is not dispatched.
        active_SK: ``[S, K]`` bool, the choice is dispatched (before capacity is applied).
        probs_SE: router probabilities ``[S, E]`` (fp32).
        losses: the router's unweighted auxiliary losses (scalars) by name: ``"load_balance"``,
            ``"z"``, ``"importance"``, ``"load"``; ``losses.weighted_aux_loss`` applies the
            config's weights (``config.LOSS_WEIGHTS``).
        priority_SK: optional ``[S, K]`` slot priority (smaller first inside an expert); ``None``
            means choice-major, then token order.
        renormalize_kept: divide each token's weights by their sum over the choices that
            survive capacity (DeepSpeed's top-2/top-k); GShard and Switch keep them as they are.
        capacity: optional capacity the router derived for this batch (DeepSpeed's formula from
            the local token count; the local token count for ``soft``; the tokens each expert
            picked for ``expert_choice``); the layer agrees on its maximum over the EP group and uses it
            instead of its own formula. ``None``: the layer's formula.
        balance_choices: the leading columns of ``expert_SK`` whose shares are the load-balancing
            loss's ``f_e`` (1: first choices only, GShard and DeepSpeed's top-2); ``None``: all.
    """

    expert_SK: Tensor
    weight_SK: Tensor
    active_SK: Tensor
    probs_SE: Tensor
    losses: Mapping[str, Tensor]
    priority_SK: Optional[Tensor] = None
    renormalize_kept: bool = False
    capacity: Optional[int] = None
    balance_choices: Optional[int] = None
