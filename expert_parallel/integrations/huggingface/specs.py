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
LAYOUTS = ("same", "stacked", "linear_out", "linear_in", "unsqueezed", "matmul", "matmul_interleaved", "matmul_rows")
# the layouts whose HF tensor may fuse several of ours (WeightMap.part)
FUSED = ("stacked", "matmul", "matmul_interleaved")


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
            ``"matmul"``: ours already, ``[N, in, parts * out]`` (``x @ w`` per expert; Aria's and
            Llama 4's ``gate_up_proj [E, D, 2F]`` and ``down_proj [E, F, D]``), or a per-expert
            bias ``[N, parts * out]`` (GPT-OSS's ``down_proj_bias [E, D]``); parts side by side;
            ``"matmul_interleaved"``: the same with the parts interleaved column by column, part
            ``i`` in columns ``i, i + parts, ...`` (GPT-OSS's ``gate_up_proj [E, D, 2F]`` and
            ``gate_up_proj_bias [E, 2F]``: gate, up, gate, up, ...);
            ``"matmul_rows"``: ``x @ w`` matrices of N experts stacked on the rows, ``[N * in, out]``
            (DBRX's ``w2 [E * F, D]``).
        part: ``(index, parts)``: ours is slice ``index`` of ``parts`` equal slices of the HF
            tensor's outputs (gate ``(0, 2)`` and up ``(1, 2)`` of a fused ``gate_up_proj``): its
            rows for ``"stacked"``, its last dimension for the ``"matmul"`` layouts.

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
        if self.part != (0, 1) and self.layout not in FUSED:
            raise ValueError(f"WeightMap({self.ours!r}).part={self.part} needs a layout of fused expert matrices "
                             f"{list(FUSED)}, got {self.layout!r}; drop part or fix the layout")

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
    index, parts = wm.part
    if wm.layout == "stacked":
        rows = value.shape[1] // parts
        ours = value[first:first + shape[0], index * rows:(index + 1) * rows].transpose(1, 2)
    elif wm.layout in ("matmul", "matmul_interleaved"):
        experts = _experts(value, wm, first, shape[0])
        columns = experts.shape[-1] // parts
        ours = experts[..., index::parts] if wm.layout == "matmul_interleaved" else (
            experts[..., index * columns:(index + 1) * columns])
    elif wm.layout == "matmul_rows":
        ours = _experts(value.reshape(-1, shape[1], shape[2]), wm, first, shape[0])
    elif wm.layout == "linear_out":
        ours = _experts(value.reshape(-1, shape[2], shape[1]), wm, first, shape[0]).transpose(1, 2)
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


def _experts(value_NX: Tensor, wm: WeightMap, first: int, count: int) -> Tensor:
    """Experts ``first : first + count`` of ``[N, ...]`` for a sharded map; an unsharded one
    (shared experts) whole, so a count that differs fails the caller's shape check."""
    return value_NX[first:first + count] if wm.sharded else value_NX


def ours_to_hf(value: Tensor, wm: WeightMap) -> Tensor:
    """Inverse of ``hf_to_ours`` for a whole tensor (every expert): our layout -> this map's
    slice of the HF tensor (``join_parts`` assembles fused slices)."""
    if wm.layout == "stacked":
        return value.transpose(1, 2)
    if wm.layout == "matmul_rows":
        return value.reshape(-1, value.shape[2])
    if wm.layout == "linear_out":
        return value.transpose(1, 2).reshape(-1, value.shape[1])
    if wm.layout == "linear_in":
        return value.permute(2, 0, 1).reshape(value.shape[2], -1)
    if wm.layout == "unsqueezed":
        return value.unsqueeze(0)
    return value


def join_parts(parts: dict[int, Tensor], layout: str = "stacked") -> Tensor:
    """The HF tensor of ``layout`` from its slices by part index: ``"stacked"`` ``[N, out, in]``
    each, joined on the rows; ``"matmul"`` ``[N, ..., out]`` each, side by side on the last
    dimension; ``"matmul_interleaved"`` the same, interleaved column by column."""
    if len(parts) == 1:
        return next(iter(parts.values())).contiguous()
    ordered = [parts[index] for index in sorted(parts)]
    if layout == "matmul_interleaved":
        return torch.stack(ordered, dim=-1).flatten(-2)
    return torch.cat(ordered, dim=-1 if layout == "matmul" else 1)


_ABSENT = object()


def config_value(hf_config: Any, attr: str, default: Any = None) -> Any:
    """``hf_config.attr``, where ``attr`` may name a sub-config's field with a dot (DBRX's
    ``"ffn_config.moe_num_experts"``); ``default`` where a part is missing."""
    value = hf_config
    for name in attr.split("."):
        value = getattr(value, name, _ABSENT)
        if value is _ABSENT:
            return default
    return value


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
        config: ``(MoEConfig field, HF config attribute)`` pairs; an attribute of a sub-config is
            dotted (``"ffn_config.moe_top_k"``), here and in ``requires``.
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
        returns_logits: the HF block returns ``(hidden_states, a router tensor)`` and its decoder
            layer keeps the first (GPT-OSS, Llama 4); the converted block then returns
            ``(hidden_states, router logits [S, E])``.
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
    returns_logits: bool = False

    def moe_fields(self, hf_config: Any) -> dict[str, Any]:
        """The ``MoEConfig`` fields of a block of a model with ``hf_config``.

        Raises:
            ValueError: the config has a value the conversion does not implement, or lacks a
                field the spec reads.
        """
        absent = [attr for attr in (*(attr for _, attr in self.config), *(attr for attr, _ in self.requires))
                  if config_value(hf_config, attr, _ABSENT) is _ABSENT]
        if absent:
            raise mismatch(f"{self.block}: the model's config ({type(hf_config).__name__}) has no {absent}, which the "
                           f"{self.name} spec reads")
        for attr, accepted in self.requires:
            value = config_value(hf_config, attr)
            if value not in accepted:
                raise ValueError(f"{self.block}: config.{attr}={value!r} is not supported (the conversion "
                                 f"implements {list(accepted)}); use a model with one of those values")
        fields = {field: config_value(hf_config, attr) for field, attr in self.config}
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
