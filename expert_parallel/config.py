"""MoEConfig: every knob of an MoE layer, validated once at construction."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Optional

from .activations import ACTIVATIONS
from .router_rules import NO_TOP_K, ROUTER_RULES, field_default, reject, routed_top_k

EXPERT_KINDS = ("ffn", "swiglu", "clamped_swiglu")
EXPERT_COMPUTE = ("auto", "filled", "padded")
RECOMPUTE = ("none", "experts")
A2A_KINDS = ("flat", "hierarchical")
SECOND_POLICIES = ("random", "all", "threshold", "gumbel")
SCORING_FUNCS = ("softmax", "sigmoid")
GROUP_SCORES = ("max", "top2_sum")
AUX_LOSS_SCOPES = ("batch", "sequence", "global")
# the routers whose Routing.losses hold "load_balance" (E * sum_e f_e * P_e), which aux_loss_scope rescopes
BALANCED_ROUTERS = ("gshard", "switch", "topk", "deepspeed")
# losses a router may report (Routing.losses) -> the config field that weighs them
LOSS_WEIGHTS = {"load_balance": "aux_loss_weight", "z": "z_loss_weight",
                "importance": "importance_loss_weight", "load": "load_loss_weight"}
FLOAT_FIELDS = ("second_threshold", "capacity_factor", "eval_capacity_factor", "jitter_eps", "routed_scaling_factor",
                "bias_update_rate", "normalize_topk_min", "shared_expert_scale", "router_logit_softcap",
                "normalize_topk_eps", "swiglu_alpha", "swiglu_limit", "normalize_topk_p", *LOSS_WEIGHTS.values())
BOOL_FIELDS = ("drop_tokens", "dropless", "expert_bias", "check_finite", "router_gumbel", "random_token_selection",
               "gate_after_topk", "normalize_topk", "selection_bias", "router_bias", "shared_expert_gate",
               "expert_tensor_parallel", "topk_on_logits", "expert_up_bias", "scale_expert_input")


@dataclass(frozen=True)
class MoEConfig:
    """Configuration of one MoE layer; validated once in ``__post_init__``.

    See docs/routers.md for every router, its paper, formula and cost.

    Args:
        d_model: model width D; the layer maps ``[..., D] -> [..., D]``.
        d_ff: hidden width F of every routed expert.
        num_experts: global number of routed experts E (all ranks together).
        top_k: choices per token K. ``None`` (default) means the router's own: ``switch`` 1,
            ``gshard`` 2, ``topk`` / ``noisy_topk`` / ``deepspeed`` ``min(2, num_experts)``;
            ``soft`` and ``expert_choice`` take no ``top_k``. The field keeps what was given
            (an unset one stays ``None``; ``num_choices`` is the resolved K).
        router: ``"gshard"`` (GShard top-2), ``"switch"`` (Switch top-1), ``"topk"`` (softmax,
            top-k; Mixtral, DeepSeekMoE, ST-MoE), ``"noisy_topk"`` (Shazeer et al. 2017),
            ``"soft"`` (every token to every expert, Jacobs et al. 1991), ``"expert_choice"``
            (each expert picks its tokens, Zhou et al. 2022) or ``"deepspeed"`` (DeepSpeed's
            ``TopKGate``; see ``routing/deepspeed_gating.py``).
        second_policy: second-expert policy: ``"random"`` (GShard) dispatches the 2nd choice iff
            ``2 * g2 > u`` with ``u ~ U(0, 1)``; ``"all"`` always; ``"threshold"`` iff
            ``g2 > second_threshold``; ``"gumbel"`` (``deepspeed`` top-2 only) samples the 2nd
            expert by Gumbel-max over the logits and always dispatches it.
        second_threshold: threshold of the ``"threshold"`` policy, in ``[0, 0.5]``.
        capacity_factor: slots per expert relative to an even split, in training (for
            ``expert_choice``: each expert picks ``ceil(S * capacity_factor / E)`` tokens).
        eval_capacity_factor: the same in eval mode.
        min_capacity: lower bound on the capacity.
        capacity: a fixed capacity C; removes the capacity all-reduce and every host sync.
        drop_tokens: ``False`` sizes the buffers to the fullest expert of the EP group (one
            all-reduce, no drops; DeepSpeed's ``drop_tokens=False``); ``capacity`` must be None.
        dropless: never drop a token: every expert's buffer holds as many slots as the EP group's
            largest local token count ``S`` (an expert takes a token at most once), agreed per batch
            by the one small all-reduce (a host read; none at ``ep_size=1``), so every EP rank may
            pass another number of tokens, 0 included (dynamic padding, packed sequences, the last
            batch of an epoch). Unlike ``drop_tokens=False``, which agrees on the fullest expert,
            the buffers do not depend on the routing. With ``max_tokens_per_rank`` the buffers have
            that fixed size instead and nothing is agreed (no host sync). Buffers and wire bytes
            grow to ``E * S * D`` per rank and direction; with filled expert compute the FLOPs still
            follow the tokens.
        max_tokens_per_rank: ``dropless`` only: a static bound on the tokens any rank passes in one
            call; every expert's buffer then has that many slots, so the forward needs no
            agreement and reads nothing back to the host. An input of more tokens raises
            ``ValueError`` on its rank before any collective (see ``MoELayer``). ``None`` (default):
            agree on the largest token count per batch.
        expert_compute: ``"filled"`` runs the experts on the filled slots only (grouped GEMM,
            ``torch._grouped_mm``, with device-side offsets), ``"padded"`` on every slot (one
            ``bmm`` per weight), ``"auto"`` (default) filled where the experts' device and dtype
            support grouped GEMM, else padded. Chosen at construction (and again after ``.to()``).
        recompute: ``"none"`` (default) keeps the experts' hidden activations (``x w1``, ``x w3``,
            the activation and the product, ``[rows, d_ff]`` each) for the backward; ``"experts"``
            keeps only the experts' input rows and recomputes the rest in the backward
            (``torch.utils.checkpoint``, non-reentrant; Megatron's ``moe_act`` recompute):
            less activation memory for one more expert forward in the backward (docs/benchmarks.md
            measures both). The result and the gradients are the same.
        num_chunks: split every expert's ``C`` slots into ``min(num_chunks, C)`` chunks of
            consecutive slots (sizes ``ceil`` or ``floor`` of ``C / num_chunks``; the capacity is never
            rounded, so the result equals the unchunked layer's) and pipeline them: the dispatch
            all-to-all of chunk ``i+1`` and the return all-to-all of chunk ``i`` run asynchronously
            while the experts compute chunk ``i`` (the same in the backward). 1 (default): no chunks.
        a2a: ``"flat"`` (default): one all-to-all over the EP group; ``"hierarchical"``: the same
            exchange in two steps, within each node then one aggregated message per node pair
            (Tutel's 2DH all-to-all; ``comm/hierarchical.py``). Needs EP groups of whole nodes.
            Ignored with ``ep_size=1`` (there is no all-to-all).
        ranks_per_node: ranks on each node for ``a2a="hierarchical"`` (``ep_size`` must be a
            multiple); ``None`` reads the launcher's ``LOCAL_WORLD_SIZE`` when the layer is built.
        expert: ``"ffn"`` (Linear-act-Linear), ``"swiglu"`` (``silu(x w1) * (x w3)``) or
            ``"clamped_swiglu"`` (GPT-OSS: ``(clamp(x w3, -l, l) + 1) * g * sigmoid(alpha * g)``,
            ``g = clamp(x w1, max=l)``, with ``swiglu_alpha`` and ``swiglu_limit``; biases added first).
        activation: ``"gelu"``, ``"gelu_tanh"``, ``"relu"`` or ``"silu"`` (ffn experts only).
        expert_bias: give experts biases ``b1 [E_local, F]``, ``b2 [E_local, D]``.
        aux_loss_weight: weight of the load-balancing loss in ``MoEOutput.aux_loss`` (routers
            that have one: switch, gshard, topk, deepspeed).
        ep_size: expert-parallel group size; ``num_experts`` must be a multiple of it.
        tp_size: tensor-parallel group size of the rest of the model: the ``tp_size`` ranks of a
            TP group hold the same tokens (and must route them alike: same input, router weights and
            RNG state), so each sends only its ``1/tp_size`` of every expert's slots through the
            all-to-all and the TP group all-gathers the returned slots before the combine
            (DeepSpeed's ``drop_tokens`` / ``gather_tokens``). The capacity is rounded up to a
            multiple of ``tp_size``. 1 (default) disables it.
        expert_tensor_parallel: also split every routed expert over the TP group (DeepSpeed's
            ``enable_expert_tensor_parallelism``, Megatron's expert TP): TP rank ``t`` holds
            columns ``t*F/tp:(t+1)*F/tp`` of ``w1`` / ``w3`` / ``b1`` and those rows of ``w2``; the
            TP group all-gathers the received slots before the experts, sums the partial outputs
            (one all-reduce, then ``b2``) and keeps its own slots again for the return all-to-all.
            Needs ``tp_size > 1`` and ``d_ff`` divisible by ``tp_size``.
        check_finite: raise ``ValueError`` on NaN/inf router logits (costs a host sync).
        jitter_eps: in training, multiply the router input by ``U(1 - eps, 1 + eps)`` noise
            (Switch Transformer; DeepSpeed's ``noisy_gate_policy="Jitter"`` is ``0.01``); any router.
        router_gumbel: in training, pick the first choice by ``argmax(logits + Gumbel)``
            (DeepSpeed's ``noisy_gate_policy="RSample"``; ``deepspeed`` router, top_k=1 only).
        random_token_selection: when an expert overflows, keep a uniformly random subset of its
            tokens instead of the first ones (DeepSpeed's ``use_rts``; ``deepspeed`` top-1 only).
        gate_after_topk: ``topk`` only: combine weights are the softmax over the k kept logits
            (Mixtral) instead of the probabilities of a softmax over all experts.
        normalize_topk: ``topk`` only: divide the k kept scores by their sum (Hugging Face's
            ``norm_topk_prob``; with ``scoring_func="sigmoid"`` by ``sum + normalize_topk_eps``).
        scoring_func: ``topk`` only: ``"softmax"`` (default) scores the experts by the softmax
            over all of them; ``"sigmoid"`` (DeepSeek-V3) by ``sigmoid(logit)`` per expert. The
            combine weights are the chosen experts' scores; the load-balancing loss takes the
            sigmoid scores normalised to sum 1 per token as its probabilities.
        n_group: ``topk`` only: split the experts into ``n_group`` equal groups of consecutive ids
            and route each token within ``topk_group`` of them (DeepSeek-V2/V3's group-limited
            routing); 1 (default) disables it. Must divide ``num_experts``.
        topk_group: ``topk`` only: groups each token may use, ``1 <= topk_group <= n_group``,
            with ``top_k <= topk_group * num_experts / n_group``.
        group_score: ``topk`` only, used when ``n_group > 1``: a group's score is ``"max"``
            (DeepSeek-V2's ``group_limited_greedy``: its largest expert score) or ``"top2_sum"``
            (DeepSeek-V3: the sum of its two largest selection scores).
        routed_scaling_factor: ``topk`` only: multiply the routed experts' combine weights by it,
            after any normalisation (DeepSeek-V2/V3); must be > 0.
        selection_bias: ``topk`` only: the router holds a buffer ``router.selection_bias [E]``
            (fp32, zeros, not a parameter) added to the scores for choosing experts (and groups)
            only, never to the combine weights (DeepSeek-V3's ``e_score_correction_bias``; on
            softmax scores, Ernie 4.5's).
            ``bias_update_rate > 0`` implies it (``has_selection_bias``); set it alone to hold a
            converted model's bias without updating it.
        bias_update_rate: ``topk`` only: DeepSeek-V3's auxiliary-loss-free balancing rate ``u``
            (0 disables it). The layer counts the tokens routed to each expert in training
            forwards; ``comm.update_selection_biases(model)`` (after each optimizer step) adds
            ``u * sign(mean_load - load_e)`` to the selection bias, loads summed over all ranks.
        z_loss_weight: weight of ST-MoE's router z-loss ``mean(logsumexp(logits)^2)``; any router.
        importance_loss_weight: ``noisy_topk`` only: weight of ``CV(sum of gates per expert)^2``.
        load_loss_weight: ``noisy_topk`` only: weight of the smooth load loss ``CV(load)^2``.
        num_shared_experts: experts every token passes through (DeepSeekMoE), computed densely on
            every rank and added to the output; 0 disables them.
        d_ff_shared: hidden width of each shared expert; ``None`` means ``d_ff``.
        shared_expert_gate: multiply the shared experts' output by ``sigmoid(x @ w.T)``, ``w`` the
            weight of ``layer.shared_gate = nn.Linear(d_model, 1, bias=False)`` (Qwen2-MoE); needs
            ``num_shared_experts >= 1``.
        router_bias: the router's linear gets a trained bias ``router.bias [E]``, ``logits = x
            W^T + b`` (fp32); any router.
        aux_loss_scope: the tokens one load-balancing loss ``E * sum_e f_e * P_e`` averages over
            (routers with one: switch, gshard, topk, deepspeed): ``"batch"`` (default) this
            rank's tokens; ``"sequence"`` each sequence of an input ``[B, T, D]`` alone, then
            the mean over the B sequences (DeepSeek-V3's sequence-wise loss); ``"global"`` the
            shares ``f_e`` from the token counts of every data-parallel rank (one small
            all-reduce per forward over the world, no host sync) and ``P_e`` from this rank's
            tokens, the gradient through ``P_e`` only (Qwen's global-batch balance loss).
        topk_on_logits: ``topk`` only: choose the k largest logits instead of the k largest
            scores (Granite-MoE, Cohere 2 MoE: ``topk`` before the softmax or sigmoid). The same
            experts, except where the scores' rounding ties distinct logits (an underflowed
            softmax, a saturated sigmoid): the logits still order them. Needs no selection bias
            and ``n_group=1`` (those choose by the biased scores).
        normalize_topk_min: ``topk`` with ``normalize_topk`` and softmax scores only: divide the
            kept scores by ``max(sum, normalize_topk_min)`` (Ernie 4.5's ``moe_norm_min``), so
            kept scores summing below it are not inflated to sum 1; 0 (default) clamps the sum
            at the smallest normal fp32 only (it keeps 0 / 0 out).
        shared_expert_scale: multiply the shared experts' output by it (after
            ``shared_expert_gate``): Cohere 2 MoE's ``shared_expert_combination_strategy=
            "average"`` is 0.5 here with ``routed_scaling_factor=0.5``. Must be > 0; a value other
            than 1.0 needs ``num_shared_experts >= 1``.
        router_logit_softcap: any router: with ``c > 0``, the router's logits are ``c * tanh(logits
            / c)`` (after any ``router_bias``; Laguna's ``moe_router_logit_softcapping``), bounding
            them to ``(-c, c)``; everything downstream (scores, losses, recorded logits) sees the
            capped ones. 0 (default) disables it.
        normalize_topk_eps: ``topk`` with ``scoring_func="sigmoid"`` and ``normalize_topk``: the
            kept scores are divided by ``sum + normalize_topk_eps``. Default ``1e-20``
            (DeepSeek-V3); ``0.0`` is a plain division (MiniMax-M2, Laguna), ``1e-6`` LFM2's.
        swiglu_alpha, swiglu_limit: ``expert="clamped_swiglu"`` only: its ``alpha`` and ``limit``
            (> 0); defaults GPT-OSS's 1.702 and 7.0.
        expert_up_bias: gated experts (``swiglu``, ``clamped_swiglu``) with ``expert_bias`` only:
            a bias ``b3 [E_local, F]`` on ``x w3`` too (GPT-OSS biases all three projections).
        normalize_topk_p: ``topk`` with ``normalize_topk`` only: divide the k kept scores by their
            p-norm ``(sum_k |w_k|^p)^(1/p)`` instead of their sum (DBRX's
            ``moe_normalize_expert_weights``); 1 (default) is the sum; finite, > 0.
        scale_expert_input: each dispatched choice's combine weight multiplies the token before
            its expert (``expert(w * x)``), and the experts' outputs are summed unweighted (Llama 4,
            whose sigmoid score scales the input); any router. Not differentiable through a
            weight of 0 alone (as the usual combine).

    Raises:
        ValueError: naming the field, its value and the fix, for any invalid combination.
    """

    d_model: int
    d_ff: int
    num_experts: int
    top_k: Optional[int] = None
    router: str = "gshard"
    second_policy: str = "random"
    second_threshold: float = 0.0
    capacity_factor: float = 1.25
    eval_capacity_factor: float = 2.0
    min_capacity: int = 4
    capacity: Optional[int] = None
    drop_tokens: bool = True
    dropless: bool = False
    max_tokens_per_rank: Optional[int] = None
    expert_compute: str = "auto"
    recompute: str = "none"
    num_chunks: int = 1
    a2a: str = "flat"
    ranks_per_node: Optional[int] = None
    expert: str = "ffn"
    activation: str = "gelu"
    expert_bias: bool = False
    aux_loss_weight: float = 0.01
    ep_size: int = 1
    tp_size: int = 1
    expert_tensor_parallel: bool = False
    check_finite: bool = False
    jitter_eps: float = 0.0
    router_gumbel: bool = False
    random_token_selection: bool = False
    gate_after_topk: bool = False
    normalize_topk: bool = False
    z_loss_weight: float = 0.0
    importance_loss_weight: float = 0.0
    load_loss_weight: float = 0.0
    num_shared_experts: int = 0
    d_ff_shared: Optional[int] = None
    scoring_func: str = "softmax"
    n_group: int = 1
    topk_group: int = 1
    group_score: str = "max"
    routed_scaling_factor: float = 1.0
    selection_bias: bool = False
    bias_update_rate: float = 0.0
    shared_expert_gate: bool = False
    router_bias: bool = False
    aux_loss_scope: str = "batch"
    # Granite-MoE and Cohere 2 MoE (Hugging Face): top-k over the logits
    topk_on_logits: bool = False
    # Ernie 4.5 MoE (Hugging Face): moe_norm_min
    normalize_topk_min: float = 0.0
    # Cohere 2 MoE (Hugging Face): shared_expert_combination_strategy="average"
    shared_expert_scale: float = 1.0
    router_logit_softcap: float = 0.0  # Laguna's moe_router_logit_softcapping
    normalize_topk_eps: float = 1e-20  # MiniMax-M2 and Laguna divide by the plain sum (0.0), LFM2 adds 1e-6
    # GPT-OSS's experts (Hugging Face gpt_oss): clamped SwiGLU and a bias on every projection
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    expert_up_bias: bool = False
    # DBRX's router (Hugging Face dbrx): the p-norm of moe_normalize_expert_weights
    normalize_topk_p: float = 1.0
    # Llama 4's experts (Hugging Face llama4): the router score scales the input
    scale_expert_input: bool = False

    def __post_init__(self) -> None:
        for name in ("d_model", "d_ff", "num_experts", "ep_size", "tp_size"):
            _check_int(name, getattr(self, name), 1)
        for name in FLOAT_FIELDS:
            _check_number(name, getattr(self, name))
        for name in BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                reject(name, getattr(self, name), "it must be True or False")
        check_experts_split(self.num_experts, self.ep_size)
        if self.second_policy not in SECOND_POLICIES:
            reject("second_policy", self.second_policy, f"choose one of {list(SECOND_POLICIES)}")
        if not 0.0 <= self.second_threshold <= 0.5:
            reject("second_threshold", self.second_threshold, "it must lie in [0, 0.5] (g2 <= 0.5)")
        for name in ("capacity_factor", "eval_capacity_factor"):
            if not getattr(self, name) > 0:
                reject(name, getattr(self, name), "it must be > 0")
        _check_int("min_capacity", self.min_capacity, 0)
        if self.capacity is not None and (not _is_int(self.capacity) or self.capacity < 1):
            reject("capacity", self.capacity, "use an integer >= 1, or None to derive it per batch")
        if not self.drop_tokens and self.capacity is not None:
            reject("capacity", self.capacity, "drop_tokens=False sizes the buffers itself; set "
                  "capacity=None or drop_tokens=True")
        if self.expert_compute not in EXPERT_COMPUTE:
            reject("expert_compute", self.expert_compute, f"choose one of {list(EXPERT_COMPUTE)}")
        if self.recompute not in RECOMPUTE:
            reject("recompute", self.recompute, f"choose one of {list(RECOMPUTE)} ('experts' recomputes the "
                   "experts' hidden activations in the backward instead of keeping them)")
        if self.dropless and self.capacity is not None:
            reject("dropless", True, f"dropless sizes the buffers to the token count, and capacity={self.capacity} "
                   "fixes them; set capacity=None or dropless=False")
        if self.dropless and not self.drop_tokens:
            reject("dropless", True, "drop_tokens=False is the other dropless mode (it agrees on the fullest "
                   "expert, one all-reduce); choose one of the two")
        if self.max_tokens_per_rank is not None:
            _check_int("max_tokens_per_rank", self.max_tokens_per_rank, 1)
            if not self.dropless:
                reject("max_tokens_per_rank", self.max_tokens_per_rank, "it bounds the buffers of dropless=True, and "
                       "dropless=False; set dropless=True or max_tokens_per_rank=None")
        self._check_communication()
        if self.expert not in EXPERT_KINDS:
            reject("expert", self.expert, f"choose one of {list(EXPERT_KINDS)}")
        if self.activation not in ACTIVATIONS:
            reject("activation", self.activation, f"choose one of {sorted(ACTIVATIONS)}")
        self._check_expert_options()
        for name in LOSS_WEIGHTS.values():
            if not getattr(self, name) >= 0:  # also rejects NaN
                reject(name, getattr(self, name), "it must be >= 0 (0 disables the loss)")
        if not 0.0 <= self.jitter_eps < 1.0:
            reject("jitter_eps", self.jitter_eps, "it must lie in [0, 1) (0 disables jitter)")
        _check_int("num_shared_experts", self.num_shared_experts, 0)
        if self.d_ff_shared is not None:
            _check_int("d_ff_shared", self.d_ff_shared, 1)
            if not self.num_shared_experts:
                reject("d_ff_shared", self.d_ff_shared, "it sizes shared experts, and "
                      "num_shared_experts=0; set num_shared_experts >= 1 or d_ff_shared=None")
        if self.shared_expert_gate and not self.num_shared_experts:
            reject("shared_expert_gate", True, "it gates the shared experts, and num_shared_experts=0; set "
                   "num_shared_experts >= 1 or shared_expert_gate=False")
        if not self.shared_expert_scale > 0:
            reject("shared_expert_scale", self.shared_expert_scale, "it must be > 0 (1.0 leaves the shared experts' "
                   "output as it is)")
        if self.shared_expert_scale != 1.0 and not self.num_shared_experts:
            reject("shared_expert_scale", self.shared_expert_scale, "it scales the shared experts, and "
                   "num_shared_experts=0; set num_shared_experts >= 1 or shared_expert_scale=1.0")
        self._check_router_scores()
        self._check_tensor_parallel()
        self._check_balance_scope()
        self._check_router()

    def _check_router(self) -> None:
        """``router`` and what its rule (``router_rules.ROUTER_RULES``) asks: its ``top_k``, the options
        only it implements, its second-expert policies, its own checks. Reads ``top_k`` as given (an
        unset one is the router's own: ``num_choices``), never writes it."""
        if self.router not in ROUTER_RULES:
            reject("router", self.router, f"choose one of {sorted(ROUTER_RULES)}")
        rule = ROUTER_RULES[self.router]
        self._check_top_k(rule.top_k)
        for name, other in ROUTER_RULES.items():
            for option in other.options:
                if option not in rule.options and getattr(self, option) != field_default(self, option):
                    reject(option, getattr(self, option), f"it is implemented by router={name!r} only (got "
                           f"router={self.router!r}); leave it at its default or set router={name!r}")
        if self.second_policy not in rule.second_policies:
            reject("second_policy", self.second_policy, f"router={self.router!r} takes one of "
                   f"{list(rule.second_policies)}")
        if rule.check is not None:
            rule.check(self)

    def _check_top_k(self, required_k: Optional[int]) -> None:
        """A ``top_k`` that is set, against the router's rule (an unset one takes the router's own)."""
        if required_k == NO_TOP_K:
            if self.dropless:
                reject("dropless", True, f"router={self.router!r} sizes its own buffers (each expert takes a set "
                       "number of tokens, or all of them) and never drops a picked token; set dropless=False")
            if self.top_k is not None:
                reject("top_k", self.top_k, f"router={self.router!r} takes no top_k (its choices are the "
                       "experts themselves; capacity_factor sets how many tokens an expert takes); leave "
                       "top_k unset (None)")
            return
        if self.top_k is None:
            return
        if not _is_int(self.top_k) or not 1 <= self.top_k <= self.num_experts:
            reject("top_k", self.top_k, f"it must be between 1 and num_experts={self.num_experts}")
        if required_k is not None and self.top_k != required_k:
            reject("top_k", self.top_k, f"router={self.router!r} routes top-{required_k}; set top_k={required_k}")

    def _check_expert_options(self) -> None:
        """``swiglu_alpha`` / ``swiglu_limit`` (``clamped_swiglu``) and ``expert_up_bias``."""
        for name in ("swiglu_alpha", "swiglu_limit"):
            default = field_default(self, name)
            if not getattr(self, name) > 0:
                reject(name, getattr(self, name), "it must be > 0")
            if getattr(self, name) != default and self.expert != "clamped_swiglu":
                reject(name, getattr(self, name), f"it shapes expert='clamped_swiglu' (GPT-OSS), and "
                       f"expert={self.expert!r}; leave it at {default} or set expert='clamped_swiglu'")
        if self.expert_up_bias and (self.expert == "ffn" or not self.expert_bias):
            reject("expert_up_bias", True, f"it biases x w3 of a gated expert that has biases, and expert="
                   f"{self.expert!r}, expert_bias={self.expert_bias}; set expert='swiglu' or 'clamped_swiglu' "
                   "and expert_bias=True, or expert_up_bias=False")

    def _check_communication(self) -> None:
        """``num_chunks``, ``a2a`` and ``ranks_per_node``."""
        _check_int("num_chunks", self.num_chunks, 1)
        if self.a2a not in A2A_KINDS:
            reject("a2a", self.a2a, f"choose one of {list(A2A_KINDS)}")
        if self.ranks_per_node is None:
            return
        _check_int("ranks_per_node", self.ranks_per_node, 1)
        if self.a2a != "hierarchical":
            reject("ranks_per_node", self.ranks_per_node, "it sizes the nodes of a2a='hierarchical'; set "
                   "a2a='hierarchical' or ranks_per_node=None")
        if self.ep_size > 1 and self.ep_size % self.ranks_per_node:
            reject("ranks_per_node", self.ranks_per_node, f"ep_size={self.ep_size} is not a multiple of it; "
                   "choose ranks_per_node dividing ep_size (EP groups of whole nodes), or a2a='flat'")

    def _check_router_scores(self) -> None:
        """Types and ranges of the scoring, group and selection-bias fields (``router_rules.check_topk``
        checks them against ``top_k``)."""
        if self.scoring_func not in SCORING_FUNCS:
            reject("scoring_func", self.scoring_func, f"choose one of {list(SCORING_FUNCS)}")
        if self.group_score not in GROUP_SCORES:
            reject("group_score", self.group_score, f"choose one of {list(GROUP_SCORES)}")
        _check_int("n_group", self.n_group, 1)
        _check_int("topk_group", self.topk_group, 1)
        if not self.routed_scaling_factor > 0:
            reject("routed_scaling_factor", self.routed_scaling_factor, "it must be > 0 (1.0 leaves the weights "
                   "as they are)")
        if not self.bias_update_rate >= 0:
            reject("bias_update_rate", self.bias_update_rate, "it must be >= 0 (0 disables the bias update)")
        if not self.normalize_topk_min >= 0:
            reject("normalize_topk_min", self.normalize_topk_min, "it must be >= 0 (0 clamps the kept scores' sum "
                   "at the smallest normal fp32 only)")
        if not self.router_logit_softcap >= 0:
            reject("router_logit_softcap", self.router_logit_softcap, "it must be >= 0 (0 disables the cap)")
        if not self.normalize_topk_eps >= 0:
            reject("normalize_topk_eps", self.normalize_topk_eps, "it must be >= 0 (0 divides by the plain sum)")

    def _check_tensor_parallel(self) -> None:
        """``tp_size`` against the capacity and ``expert_tensor_parallel`` against ``d_ff``."""
        if self.capacity is not None and self.capacity % self.tp_size:
            reject("capacity", self.capacity, f"each of the tp_size={self.tp_size} tensor-parallel ranks sends "
                   "an equal share of every expert's slots; choose a capacity divisible by tp_size")
        if self.expert_tensor_parallel and self.tp_size == 1:
            reject("expert_tensor_parallel", True, "it splits the experts over the tensor-parallel group, and "
                   "tp_size=1; set tp_size > 1 or expert_tensor_parallel=False")
        if self.expert_tensor_parallel and self.num_chunks > 1:
            reject("num_chunks", self.num_chunks, "chunked overlap does not take expert_tensor_parallel yet (the TP "
                   "group's gathered chunks interleave the slots of its ranks); use num_chunks=1, or "
                   "expert_tensor_parallel=False")
        if self.expert_tensor_parallel and self.d_ff % self.tp_size:
            reject("d_ff", self.d_ff, f"expert_tensor_parallel splits it over tp_size={self.tp_size} ranks; "
                   "choose d_ff divisible by tp_size")

    def _check_balance_scope(self) -> None:
        """``aux_loss_scope``: a known scope, and a router with a load-balancing loss to rescope."""
        if self.aux_loss_scope not in AUX_LOSS_SCOPES:
            reject("aux_loss_scope", self.aux_loss_scope, f"choose one of {list(AUX_LOSS_SCOPES)}")
        if self.aux_loss_scope != "batch" and self.router not in BALANCED_ROUTERS:
            reject("aux_loss_scope", self.aux_loss_scope, f"router={self.router!r} has no load-balancing loss "
                   f"E * sum_e f_e * P_e to rescope (routers with one: {list(BALANCED_ROUTERS)}); leave it at "
                   "'batch'")

    @property
    def expert_tp_size(self) -> int:
        """Ranks each routed expert is split over: ``tp_size`` with ``expert_tensor_parallel``, else 1."""
        return self.tp_size if self.expert_tensor_parallel else 1

    @property
    def num_local_experts(self) -> int:
        """Experts held by each EP rank: ``num_experts // ep_size``."""
        return self.num_experts // self.ep_size

    @property
    def num_choices(self) -> int:
        """Columns K of the router's ``[S, K]`` decision: the ``top_k`` the router runs with (the
        given one, else the router's own: 1 for ``switch``, 2 for ``gshard``, ``min(2, E)`` for the
        others), or ``num_experts`` for the routers that take none (``soft``, ``expert_choice``: one
        column per expert). The ``top_k`` field itself keeps what was given (``None``: unset), so
        ``replace(router=...)`` picks the new router's own."""
        top_k = routed_top_k(self.router, self.top_k, self.num_experts)
        return self.num_experts if top_k is None else top_k

    @property
    def has_selection_bias(self) -> bool:
        """Does the router hold ``selection_bias``? With ``selection_bias`` or ``bias_update_rate > 0``."""
        return self.selection_bias or self.bias_update_rate > 0

    @property
    def shared_d_ff(self) -> int:
        """Hidden width of each shared expert: ``d_ff_shared``, else ``d_ff``."""
        return self.d_ff if self.d_ff_shared is None else self.d_ff_shared

    def capacity_factor_for(self, training: bool) -> float:
        """``capacity_factor`` in training, ``eval_capacity_factor`` in eval."""
        return self.capacity_factor if training else self.eval_capacity_factor

    def replace(self, **changes: object) -> MoEConfig:
        """A copy with ``changes`` applied, validated again."""
        return dataclasses.replace(self, **changes)


def check_experts_split(num_experts: int, ep_size: int, experts: str = "MoEConfig.num_experts", ep: str = "ep_size",
                        fixed: bool = False) -> None:
    """``ValueError`` unless ``ep_size`` divides ``num_experts`` (each EP rank holds
    ``num_experts // ep_size`` experts): the one check of that rule, for ``MoEConfig`` and for the
    callers that know the two numbers by other names (a model's block, a launcher flag). No host sync.

    Args:
        num_experts: the expert count.
        ep_size: the expert-parallel group size.
        experts: the expert count's name where the caller's user sets it (``"MoEConfig.num_experts"``,
            a block's path, ``"--experts"``).
        ep: the EP size's name there (``"ep_size"``, ``"--ep-size"``).
        fixed: the expert count cannot change (a model's weights fix it): the fix names EP sizes only.
    """
    if num_experts % ep_size == 0:
        return
    divisors = [d for d in range(1, num_experts + 1) if num_experts % d == 0]
    fix = f"choose {ep} among the divisors of {num_experts}: {divisors}"
    if not fixed:
        fix += f", or {experts} as a multiple of {ep_size}"
    raise ValueError(f"{experts}={num_experts} is invalid: it is not divisible by {ep}={ep_size}; {fix}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value: object, minimum: int) -> None:
    if not _is_int(value) or value < minimum:
        reject(name, value, f"it must be an integer >= {minimum}")


def _check_number(name: str, value: object) -> None:
    """A finite real number (int or float, not bool); the range is checked per field."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        reject(name, value, "it must be a finite number")
