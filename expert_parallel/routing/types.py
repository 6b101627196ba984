"""The result of routing, shared by every router."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class Routing:
    """What a router decided for ``S`` tokens and ``K`` choices per token.

    Attributes:
        expert_SK: chosen global expert ids ``[S, K]`` (long); column k is the k-th choice.
        weight_SK: combine weights ``[S, K]`` (fp32); 0 where a choice is not dispatched.
        active_SK: ``[S, K]`` bool, the choice is dispatched (before capacity is applied).
        probs_SE: router probabilities ``[S, E]`` (fp32).
        aux_loss: unweighted load-balancing loss, scalar.
    """

    expert_SK: Tensor
    weight_SK: Tensor
    active_SK: Tensor
    probs_SE: Tensor
    aux_loss: Tensor
