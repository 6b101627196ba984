"""Independent references for the unit tests: plain Python loops over tokens, written from the
GShard / Switch papers (GShard Algorithm 1), never calling the library's routing or layout code.

Routing decisions (which expert, dispatched or not, which slot) are made on Python floats; the
parts that must carry gradients (gates, expert math, aux loss) are per-token torch scalar ops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
               "relu": F.relu, "silu": F.silu}


def first_argmax(values: list[float], skip: int = -1) -> int:
    """Index of the largest value (the first one on ties), ignoring index ``skip``."""
    best = None
    for index, value in enumerate(values):
        if index != skip and (best is None or value > values[best]):
            best = index
    return best


def softmax_row(logits: Tensor) -> Tensor:
    """Softmax of one 1-D row, written out: ``exp(l - max) / sum``."""
    shifted = logits - logits.max()
    return shifted.exp() / shifted.exp().sum()


@dataclass
class Decision:
    """One token's routing: experts and gates per choice, dispatched flags (before capacity)."""

    experts: list[int]
    gates: list[Tensor]  # 0-d tensors (differentiable when the probs are)
    active: list[bool]


def gshard_decision(probs: Tensor, policy: str = "all", threshold: float = 0.0,
                    uniform: float = 0.0) -> Decision:
    """GShard top-2 for one token from its probability row ``[E]``."""
    values = probs.detach().tolist()
    e1 = first_argmax(values)
    e2 = first_argmax(values, skip=e1)
    total = probs[e1] + probs[e2]
    g1, g2 = probs[e1] / total, probs[e2] / total
    g2_value = values[e2] / (values[e1] + values[e2])
    if policy == "all":
        second = True
    elif policy == "threshold":
        second = g2_value > threshold
    else:
        second = 2.0 * g2_value > uniform
    return Decision([e1, e2], [g1, g2], [True, second])


def switch_decision(probs: Tensor) -> Decision:
    """Switch top-1 for one token: gate = probability of the chosen expert."""
    e1 = first_argmax(probs.detach().tolist())
    return Decision([e1], [probs[e1]], [True])


def assign_slots(experts: list[list[int]], active: list[list[bool]], num_experts: int,
                 capacity: int) -> tuple[list[list[int]], list[list[bool]], list[int]]:
    """GShard Algorithm 1, slot by slot: for k in choices, for s in tokens, one counter per expert.

    Returns ``slot[k][s]`` (-1 where not dispatched), ``kept[k][s]`` and the per-expert counts of
    dispatched assignments (before capacity).
    """
    num_tokens = len(experts)
    top_k = len(experts[0]) if num_tokens else 0
    counter = [0] * num_experts
    slot = [[-1] * num_tokens for _ in range(top_k)]
    kept = [[False] * num_tokens for _ in range(top_k)]
    for k in range(top_k):
        for s in range(num_tokens):
            if not active[s][k]:
                continue
            e = experts[s][k]
            slot[k][s] = counter[e]
            kept[k][s] = counter[e] < capacity
            counter[e] += 1
    return slot, kept, counter


def capacity_formula(num_tokens: int, num_experts: int, top_k: int, factor: float,
                     min_capacity: int) -> int:
    """``max(min_capacity, ceil(k * S * cf / E), 1)`` computed with exact fractions."""
    from fractions import Fraction

    even = math.ceil(Fraction(top_k * num_tokens) * Fraction(str(factor)) / num_experts)
    return max(min_capacity, even, 1)


def expert_forward(layer, e: int, h: Tensor) -> Tensor:
    """Expert ``e`` of ``layer`` on one token ``h [D]``, written out per token."""
    experts, cfg = layer.experts, layer.cfg
    hidden = h @ experts.w1[e]
    if experts.b1 is not None:
        hidden = hidden + experts.b1[e]
    if cfg.expert == "swiglu":
        hidden = F.silu(hidden) * (h @ experts.w3[e])
    else:
        hidden = ACTIVATIONS[cfg.activation](hidden)
    out = hidden @ experts.w2[e]
    if experts.b2 is not None:
        out = out + experts.b2[e]
    return out


@dataclass
class LayerReference:
    """What the dense reference computed for one batch."""

    y: Tensor
    aux_loss: Tensor
    decisions: list[Decision]
    slot: list[list[int]]
    kept: list[list[bool]]
    counts: list[int]


def layer_reference(layer, x: Tensor, capacity: int, uniforms: list[float] | None = None) -> LayerReference:
    """Dense per-token reference of ``MoELayer`` (ep_size=1): its own routing, slots and drops.

    ``capacity`` is given by the test (computed by hand); ``uniforms`` feed the ``random`` policy.
    """
    cfg = layer.cfg
    x_SD = x.reshape(-1, cfg.d_model)
    num_tokens, num_experts = x_SD.shape[0], cfg.num_experts
    weight = layer.router.weight.float()
    decisions, probs_rows = [], []
    for s in range(num_tokens):
        probs = softmax_row(weight @ x_SD[s].float())
        probs_rows.append(probs)
        if cfg.router == "switch":
            decisions.append(switch_decision(probs))
        else:
            u = uniforms[s] if uniforms is not None else 0.0
            decisions.append(gshard_decision(probs, cfg.second_policy, cfg.second_threshold, u))
    slot, kept, counts = assign_slots([d.experts for d in decisions], [d.active for d in decisions],
                                      num_experts, capacity)
    rows = []
    for s, decision in enumerate(decisions):
        y_s = x_SD.new_zeros(cfg.d_model)
        for k, e in enumerate(decision.experts):
            if kept[k][s]:
                y_s = y_s + decision.gates[k].to(x_SD.dtype) * expert_forward(layer, e, x_SD[s])
        rows.append(y_s)
    y = torch.stack(rows) if rows else x_SD.new_zeros(0, cfg.d_model)
    # aux: E^2 * mean_e(f_e * P_e), f_e = share of FIRST choices on e, P_e = mean prob of e
    aux = weight.new_zeros(())
    if num_tokens:
        for e in range(num_experts):
            f_e = sum(1 for d in decisions if d.experts[0] == e) / num_tokens
            p_e = sum(row[e] for row in probs_rows) / num_tokens
            aux = aux + num_experts * f_e * p_e
    return LayerReference(y.view(x.shape), aux * cfg.aux_loss_weight, decisions, slot, kept, counts)
