"""Declarative specs: one frozen ``BlockSpec`` per Hugging Face sparse-MoE block.

A spec names the block class, maps the model's config onto ``MoEConfig`` fields and lists every
tensor of the block with its place in our ``MoELayer`` and its layout. Converting, saving and
the checks that no tensor is left behind all read it, so supporting another architecture (OLMoE,
GPT-OSS, ...) is a new spec, not new code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from .compat import mismatch

# how an HF tensor holds one of ours; our expert weights are [N, in, out] per expert (x @ w)
LAYOUTS = ("same", "stacked", "linear_out", "linear_in", "unsqueezed")


@dataclass(frozen=True)
class WeightMap:
    """One tensor of our ``MoELayer`` and where it lives in the Hugging Face block.

    Attributes:
        ours: key in ``MoELayer.state_dict()``: ``router.weight [E, D]``, ``experts.w1`` /
            ``experts.w3 [E_local, D, F]``, ``experts.w2 [E_local, F, D]``, ``shared_experts.*``
            (the same with ``N_shared`` and ``d_ff_shared``), router buffers.
        hf: key in the HF block's ``state_dict()``, e.g. ``experts.gate_up_proj``.
        layout: how the HF tensor holds ours:
            ``"same"``: the same tensor (router weight ``[E, D]``, a bias ``[E]``, a gate ``[1, D]``);
            ``"stacked"``: ``[N, parts * out, in]``, one ``F.linear`` matrix per expert (HF experts'
            ``gate_up_proj [E, 2F, D]`` and ``down_proj [E, D, F]``); ours is its transpose;
            ``"linear_out"``: an ``nn.Linear`` weight whose output rows stack N experts,
            ``[N * out, in]`` (a shared MLP's ``gate_proj`` / ``up_proj``, ``[N * F, D]``);
            ``"linear_in"``: an ``nn.Linear`` weight whose input columns stack N experts,
            ``[out, N * in]`` (a shared MLP's ``down_proj``, ``[D, N * F]``);
            ``"unsqueezed"``: ours with a leading dimension of 1 (Ernie 4.5's selection bias
            ``e_score_correction_bias [1, E]``).
        part: ``(index, parts)``: ours is slice ``index`` of ``parts`` equal slices of the HF
            tensor's output rows (gate ``(0, 2)`` and up ``(1, 2)`` of a fused ``gate_up_proj``);
            ``"stacked"`` only.

    Raises:
        ValueError: an unknown layout, or ``part`` on a layout that has no expert matrices.
    """

    ours: str
    hf: str
    layout: str = "same"
    part: tuple[int, int] = (0, 1)

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"WeightMap({self.ours!r}).layout={self.layout!r} is invalid: choose one of "
                             f"{list(LAYOUTS)}")
        if self.part != (0, 1) and self.layout != "stacked":
            raise ValueError(f"WeightMap({self.ours!r}).part={self.part} needs layout='stacked' (fused expert "
                             f"matrices), got {self.layout!r}; drop part or fix the layout")

    @property
    def sharded(self) -> bool:
        """Routed experts: split over the EP group (global expert ``e`` on EP rank ``e // E_local``)."""
        return self.ours.startswith("experts.")


def hf_to_ours(value: Tensor, wm: WeightMap, shape: tuple[int, ...], first: int = 0) -> Tensor:
    """The HF tensor ``value`` in our layout ``shape`` (experts ``first : first + shape[0]`` of a
    sharded one): ``[N, parts * out, in] -> [N_local, in, out]`` etc. (see ``WeightMap``). Copies
    what it slices or transposes, so the HF tensor can be freed.

    Raises:
        ValueError: the result does not have ``shape`` (the model's config and weights disagree).
    """
    if wm.layout == "stacked":
        index, parts = wm.part
        rows = value.shape[1] // parts
        ours = value[first:first + shape[0], index * rows:(index + 1) * rows].transpose(1, 2)
    elif wm.layout == "linear_out":
        ours = value.reshape(shape[0], shape[2], shape[1]).transpose(1, 2)
    elif wm.layout == "linear_in":
        ours = value.reshape(shape[2], shape[0], shape[1]).permute(1, 2, 0)
    elif wm.layout == "unsqueezed" and value.shape[:1] == (1,):
        ours = value[0]
    else:
        ours = value
    if tuple(ours.shape) != tuple(shape):
        raise ValueError(f"{wm.hf} {tuple(value.shape)} does not fit {wm.ours} {tuple(shape)} (layout {wm.layout!r}); "
                         "the block's weights and its config disagree")
    return ours.contiguous()


def ours_to_hf(value: Tensor, wm: WeightMap) -> Tensor:
    """Inverse of ``hf_to_ours`` for a whole tensor (every expert): our layout -> this map's
    slice of the HF tensor (``join_parts`` assembles fused slices)."""
    if wm.layout == "stacked":
        return value.transpose(1, 2)
    if wm.layout == "linear_out":
        return value.transpose(1, 2).reshape(-1, value.shape[1])
    if wm.layout == "linear_in":
        return value.permute(2, 0, 1).reshape(value.shape[2], -1)
    if wm.layout == "unsqueezed":
        return value.unsqueeze(0)
    return value


def join_parts(parts: dict[int, Tensor]) -> Tensor:
    """The HF tensor from its slices by part index (``[N, out, in]`` each, joined on the rows)."""
    if len(parts) == 1:
        return next(iter(parts.values())).contiguous()
    return torch.cat([parts[index] for index in sorted(parts)], dim=1)


@dataclass(frozen=True)
class TinySizes:
    """The sizes of a tiny random model (``tiny.tiny_config``): tests and ``--hf-model`` runs.

    Attributes:
        vocab_size, d_model, d_ff (routed and shared experts' width, and a dense MLP's),
        experts (routed, per block), top_k, layers, heads, kv_heads, max_positions.
    """

    vocab_size: int = 96
    d_model: int = 32
    d_ff: int = 48
    experts: int = 8
    top_k: int = 2
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    max_positions: int = 64


@dataclass(frozen=True)
class BlockSpec:
    """How one Hugging Face sparse-MoE block becomes an ``MoELayer``.

    Attributes:
        name: the architecture (``model_type``), for messages.
        block: the HF block's class name, e.g. ``"MixtralSparseMoeBlock"``.
        config: ``(MoEConfig field, HF config attribute)`` pairs.
        fixed: ``(MoEConfig field, value)`` pairs the architecture implies.
        weights: every tensor of the block's ``state_dict()`` (router, routed experts, shared
            experts, buffers), each with its place in ``MoELayer`` and its layout.
        requires: ``(HF config attribute, accepted values)``: what the conversion assumes.
        derived: fields that depend on the config in other ways (``config -> {field: value}``).
        record_key: the model output the router logits are recorded under
            (``output_router_logits=True``).
        archetype: the router and expert kind, in words, for the families table (docs).
        tiny: ``TinySizes -> {HF config attribute: value}``: what a tiny random model of the
            family needs beyond the sizes ``tiny.tiny_config`` sets through ``config`` (e.g.
            DeepSeek's MLA ranks, a first dense layer, a non-default routing option worth testing).
        config_type: the ``model_type`` whose config class builds the tiny causal LM, where it
            is not ``name`` (a multimodal family's text model, e.g. ``"llama4_text"``).
    """

    name: str
    block: str
    config: tuple[tuple[str, str], ...]
    weights: tuple[WeightMap, ...]
    fixed: tuple[tuple[str, Any], ...] = ()
    requires: tuple[tuple[str, tuple[Any, ...]], ...] = (("hidden_act", ("silu",)),)
    derived: Optional[Callable[[Any], dict[str, Any]]] = None
    record_key: str = "router_logits"
    archetype: str = ""
    tiny: Optional[Callable[[TinySizes], dict[str, Any]]] = None
    config_type: Optional[str] = None

    def moe_fields(self, hf_config: Any) -> dict[str, Any]:
        """The ``MoEConfig`` fields of a block of a model with ``hf_config``.

        Raises:
            ValueError: the config has a value the conversion does not implement, or lacks a
                field the spec reads.
        """
        absent = [attr for attr in (*(attr for _, attr in self.config), *(attr for attr, _ in self.requires))
                  if not hasattr(hf_config, attr)]
        if absent:
            raise mismatch(f"{self.block}: the model's config ({type(hf_config).__name__}) has no {absent}, which the "
                           f"{self.name} spec reads")
        for attr, accepted in self.requires:
            value = getattr(hf_config, attr, None)
            if value not in accepted:
                raise ValueError(f"{self.block}: config.{attr}={value!r} is not supported (the conversion "
                                 f"implements {list(accepted)}); use a model with one of those values")
        fields = {field: getattr(hf_config, attr) for field, attr in self.config}
        fields.update(self.fixed)
        if self.derived is not None:
            fields.update(self.derived(hf_config))
        return fields

    def weights_for(self, cfg: Any) -> tuple[WeightMap, ...]:
        """The ``weights`` a block with layer config ``cfg`` (an ``MoEConfig``) holds: the shared
        experts' maps only with ``num_shared_experts >= 1`` and the shared gate's only with
        ``shared_expert_gate`` (a family whose config may turn its shared experts off, e.g. Cohere 2)."""
        return tuple(wm for wm in self.weights
                     if (cfg.num_shared_experts or not wm.ours.startswith("shared_experts."))
                     and (cfg.shared_expert_gate or wm.ours != SHARED_GATE))


ROUTER = WeightMap("router.weight", "gate.weight")
SWIGLU_EXPERTS = (
    WeightMap("experts.w1", "experts.gate_up_proj", "stacked", (0, 2)),
    WeightMap("experts.w3", "experts.gate_up_proj", "stacked", (1, 2)),
    WeightMap("experts.w2", "experts.down_proj", "stacked"),
)
# the core's sigmoid gate of the shared experts (MoEConfig.shared_expert_gate, branch router-features)
SHARED_GATE = "shared_gate.weight"


def shared_mlp(prefix: str) -> tuple[WeightMap, ...]:
    """A bias-free SwiGLU MLP (``gate_proj``, ``up_proj``, ``down_proj``) of width ``N * F`` as N
    shared experts of width ``F``."""
    return (WeightMap("shared_experts.w1", f"{prefix}.gate_proj.weight", "linear_out"),
            WeightMap("shared_experts.w3", f"{prefix}.up_proj.weight", "linear_out"),
            WeightMap("shared_experts.w2", f"{prefix}.down_proj.weight", "linear_in"))

# the core router and expert of most families: softmax top-k over SwiGLU experts
TOPK_SWIGLU = (("router", "topk"), ("expert", "swiglu"))
