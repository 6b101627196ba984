"""MoEConfig: every knob of an MoE layer, validated once at construction."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

EXPERT_KINDS = ("ffn", "swiglu")
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")
SECOND_POLICIES = ("random", "all", "threshold", "gumbel")
# router name -> the top_k it requires (None: any 1 <= top_k <= num_experts)
ROUTER_TOP_K = {"gshard": 2, "switch": 1, "deepspeed": None}


def _fail(field: str, value: object, fix: str) -> None:
    raise ValueError(f"MoEConfig.{field}={value!r} is invalid: {fix}")


@dataclass(frozen=True)
class MoEConfig:
    """Configuration of one MoE layer; validated once in ``__post_init__``.

    Args:
        d_model: model width D; the layer maps ``[..., D] -> [..., D]``.
        d_ff: hidden width F of every expert.
        num_experts: global number of experts E (all ranks together).
        top_k: choices per token K (``gshard`` needs 2, ``switch`` needs 1, ``deepspeed`` any).
        router: routing algorithm name: ``"gshard"``, ``"switch"``, or ``"deepspeed"``
            (DeepSpeed's ``TopKGate``: its top-1, top-2 and top-k gating, capacity formula and
            renormalisation; see ``routing/deepspeed_gating.py``).
        second_policy: second-expert policy: ``"random"`` (GShard) dispatches the 2nd choice iff
            ``2 * g2 > u`` with ``u ~ U(0, 1)``; ``"all"`` always; ``"threshold"`` iff
            ``g2 > second_threshold``; ``"gumbel"`` (``deepspeed`` top-2 only) samples the 2nd
            expert by Gumbel-max over the logits and always dispatches it.
        second_threshold: threshold of the ``"threshold"`` policy, in ``[0, 0.5]``.
        capacity_factor: slots per expert relative to an even split, in training.
        eval_capacity_factor: the same in eval mode.
        min_capacity: lower bound on the capacity.
        capacity: a fixed capacity C; removes the capacity all-reduce and every host sync.
        drop_tokens: ``False`` sizes the buffers to the fullest expert of the EP group (one
            all-reduce, no drops; DeepSpeed's ``drop_tokens=False``); ``capacity`` must be None.
        expert: ``"ffn"`` (Linear-act-Linear) or ``"swiglu"``.
        activation: ``"gelu"``, ``"gelu_tanh"``, ``"relu"`` or ``"silu"`` (ffn experts only).
        expert_bias: give experts biases ``b1 [E_local, F]``, ``b2 [E_local, D]``.
        aux_loss_weight: weight of the load-balancing loss in ``MoEOutput.aux_loss``.
        ep_size: expert-parallel group size; ``num_experts`` must be a multiple of it.
        check_finite: raise ``ValueError`` on NaN/inf router logits (costs a host sync).
        router_jitter: in training, multiply the router input by ``U(1 - eps, 1 + eps)`` noise
            (Switch Transformer; DeepSpeed's ``noisy_gate_policy="Jitter"`` is ``0.01``).
        router_gumbel: in training, pick the first choice by ``argmax(logits + Gumbel)``
            (DeepSpeed's ``noisy_gate_policy="RSample"``; ``deepspeed`` router, top_k=1 only).
        random_token_selection: when an expert overflows, keep a uniformly random subset of its
            tokens instead of the first ones (DeepSpeed's ``use_rts``; ``deepspeed`` top-1 only).

    Raises:
        ValueError: naming the field, its value and the fix, for any invalid combination.
    """

    d_model: int
    d_ff: int
    num_experts: int
    top_k: int = 2
    router: str = "gshard"
    second_policy: str = "random"
    second_threshold: float = 0.0
    capacity_factor: float = 1.25
    eval_capacity_factor: float = 2.0
    min_capacity: int = 4
    capacity: Optional[int] = None
    drop_tokens: bool = True
    expert: str = "ffn"
    activation: str = "gelu"
    expert_bias: bool = False
    aux_loss_weight: float = 0.01
    ep_size: int = 1
    check_finite: bool = False
    router_jitter: float = 0.0
    router_gumbel: bool = False
    random_token_selection: bool = False

    def __post_init__(self) -> None:
        for name in ("d_model", "d_ff", "num_experts", "ep_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                _fail(name, value, "it must be an integer >= 1")
        if self.num_experts % self.ep_size:
            _fail(
                "num_experts", self.num_experts,
                f"it is not divisible by ep_size={self.ep_size}; choose num_experts as a "
                "multiple of ep_size",
            )
        if self.router not in ROUTER_TOP_K:
            _fail("router", self.router, f"choose one of {sorted(ROUTER_TOP_K)}")
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.num_experts:
            _fail("top_k", self.top_k, f"it must be between 1 and num_experts={self.num_experts}")
        required_k = ROUTER_TOP_K[self.router]
        if required_k is not None and self.top_k != required_k:
            _fail("top_k", self.top_k, f"router={self.router!r} routes top-{required_k}; "
                  f"set top_k={required_k}")
        if self.second_policy not in SECOND_POLICIES:
            _fail("second_policy", self.second_policy, f"choose one of {list(SECOND_POLICIES)}")
        if not 0.0 <= self.second_threshold <= 0.5:
            _fail("second_threshold", self.second_threshold, "it must lie in [0, 0.5] (g2 <= 0.5)")
        for name in ("capacity_factor", "eval_capacity_factor"):
            if not getattr(self, name) > 0:
                _fail(name, getattr(self, name), "it must be > 0")
        if not isinstance(self.min_capacity, int) or self.min_capacity < 0:
            _fail("min_capacity", self.min_capacity, "it must be an integer >= 0")
        if self.capacity is not None and (not isinstance(self.capacity, int) or self.capacity < 1):
            _fail("capacity", self.capacity, "use an integer >= 1, or None to derive it per batch")
        if not self.drop_tokens and self.capacity is not None:
            _fail("capacity", self.capacity, "drop_tokens=False sizes the buffers itself; set "
                  "capacity=None or drop_tokens=True")
        if self.expert not in EXPERT_KINDS:
            _fail("expert", self.expert, f"choose one of {list(EXPERT_KINDS)}")
        if self.activation not in ACTIVATIONS:
            _fail("activation", self.activation, f"choose one of {list(ACTIVATIONS)}")
        if self.aux_loss_weight < 0:
            _fail("aux_loss_weight", self.aux_loss_weight, "it must be >= 0")
        if not 0.0 <= self.router_jitter < 1.0:
            _fail("router_jitter", self.router_jitter, "it must lie in [0, 1) (0 disables jitter)")
        self._check_router_variants()

    def _check_router_variants(self) -> None:
        """Knobs that only some routers implement."""
        deepspeed_top1 = self.router == "deepspeed" and self.top_k == 1
        for name in ("router_gumbel", "random_token_selection"):
            if getattr(self, name) and not deepspeed_top1:
                _fail(name, True, f"it is implemented by router='deepspeed' with top_k=1 only (got "
                      f"router={self.router!r}, top_k={self.top_k}); set {name}=False")
        if self.second_policy == "gumbel" and self.router != "deepspeed":
            _fail("second_policy", "gumbel", "it is implemented by router='deepspeed' (top_k=2) only; "
                  f"choose one of {list(SECOND_POLICIES[:3])} for router={self.router!r}")
        if self.router != "deepspeed":
            return
        if self.top_k == 2 and self.second_policy not in ("all", "gumbel"):
            _fail("second_policy", self.second_policy, "router='deepspeed' with top_k=2 takes 'all' "
                  "(deterministic top-2) or 'gumbel' (DeepSpeed's top2_2nd_expert_sampling=True)")
        if self.capacity is not None:
            _fail("capacity", self.capacity, "router='deepspeed' derives the capacity per batch as "
                  "DeepSpeed does; set capacity=None")

    @property
    def num_local_experts(self) -> int:
        """Experts held by each EP rank: ``num_experts // ep_size``."""
        return self.num_experts // self.ep_size

    def replace(self, **changes: object) -> MoEConfig:
        """A copy with ``changes`` applied, validated again."""
        return dataclasses.replace(self, **changes)
