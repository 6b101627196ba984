"""``convert`` a transformers model's sparse-MoE blocks in place; ``to_hf_state_dict`` to save it back."""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Iterator, Optional, Union

from torch import Tensor, nn
from torch.distributed import ProcessGroup
from transformers import PreTrainedModel

from ...config import MoEConfig, check_experts_split
from .block import ExpertParallelBlock
from .compat import check_recording, check_transformers_version, mismatch, warn_untested
from .families import SPECS_BY_BLOCK
from .masking import pass_attention_mask
from .saving import hf_items, save_pretrained
from .specs import BlockSpec

# what convert sets unless overridden: no drops (the same function as the model), no layer-level loss
# (the model computes its own load-balancing loss from the recorded router logits)
DEFAULTS: dict[str, Any] = {"dropless": True, "aux_loss_weight": 0.0}
# overriding any of these asks for a capacity, so the dropless default gives way
CAPACITY_FIELDS = ("capacity", "capacity_factor", "eval_capacity_factor", "min_capacity", "drop_tokens")
# fixed by the model's weights (ep_size is convert's own argument)
STRUCTURAL_FIELDS = ("d_model", "d_ff", "num_experts", "expert", "activation", "expert_bias", "num_shared_experts",
                     "d_ff_shared", "shared_expert_gate", "selection_bias", "router_bias", "expert_up_bias")
# class names that mark a sparse-MoE block (Mixtral's SparseMoeBlock, DeepSeek's Moe / MoE)
MOE_SUFFIXES = ("SparseMoeBlock", "Moe", "MoE")
MOE_FIELDS = frozenset(field.name for field in dataclasses.fields(MoEConfig))


def convert(model: PreTrainedModel, ep_size: int = 1, ep_group: Optional[ProcessGroup] = None,
            **overrides: Any) -> PreTrainedModel:
    """Replace, in place, every supported sparse-MoE block of ``model`` by an ``ExpertParallelBlock``.

    Each block becomes an ``MoELayer`` holding the router, this rank's ``num_experts / ep_size``
    experts (global expert ``e`` on EP rank ``e // E_local``) and the shared experts, with the
    block's dtype and device; the HF block and its other experts are dropped. The model's forward,
    ``output_router_logits`` and its ``aux_loss`` work as before; the padding its 2-D
    ``attention_mask`` marks is not routed (the blocks' ``token_mask``). By default the layers are
    dropless (``MoEConfig.dropless``): nothing is dropped, so the model computes the same function,
    and EP ranks may pass different ``[batch, seq]`` shapes (0 included; the buffer size is agreed
    per batch). ``model.save_pretrained`` (and ``push_to_hub``) then write the full Hugging Face
    checkpoint: call it on every rank (the experts are gathered), rank 0 writes.

    Call it on every rank with the same model (e.g. each rank's ``from_pretrained``); with
    ``ep_size > 1`` it builds process groups, so ``torch.distributed`` must be initialised.

    Args:
        model: a transformers model (its config sizes the layers).
        ep_size: ranks each block's experts are split over.
        ep_group: the EP process group; ``None`` builds groups of ``ep_size`` consecutive ranks,
            as ``MoELayer(cfg, None)`` does.
        **overrides: ``MoEConfig`` fields applied on top of the spec's config: another ``router``
            (with its options), ``capacity_factor`` / ``capacity`` / ``drop_tokens=False`` (any of
            ``CAPACITY_FIELDS`` turns the dropless default off unless ``dropless`` is given),
            ``expert_compute``, ``check_finite``, ...

    Returns:
        ``model`` itself.

    Raises:
        ValueError: transformers older than ``SUPPORTED_TRANSFORMERS``; an MoE block no spec
            converts (naming its class); ``num_experts`` not divisible by ``ep_size``; an unknown
            or structural override; a config value a spec does not implement or a config field
            it reads missing. Raised on every rank alike, before any block changes. A release
            newer than the tested ones converts with a warning when every check passes.
    """
    tested = check_transformers_version()
    if not isinstance(model, PreTrainedModel):
        raise ValueError(f"convert takes a transformers PreTrainedModel (it reads the model's config), got "
                         f"{type(model).__name__}; pass the model, e.g. AutoModelForCausalLM.from_pretrained(...)")
    if isinstance(ep_size, bool) or not isinstance(ep_size, int) or ep_size < 1:
        raise ValueError(f"ep_size={ep_size!r} is invalid: it must be an integer >= 1")
    _check_overrides(overrides)
    plan = [(path, block, spec, _layer_config(path, spec, hf_config, ep_size, overrides))
            for path, block, spec, hf_config in _moe_blocks(model, model.config)]
    if not plan:
        converted = any(isinstance(module, ExpertParallelBlock) for module in model.modules())
        message = (f"{type(model).__name__} has no {'unconverted ' if converted else ''}sparse-MoE block to convert; "
                   f"supported blocks: {sorted(SPECS_BY_BLOCK)}")
        raise ValueError(message + " (it was converted already)") if converted else mismatch(message)
    for path, block, spec, cfg in plan:
        _check_coverage(path, block, spec, cfg)
    check_recording()
    if not tested:
        warn_untested()
    for path, block, spec, cfg in plan:
        model.set_submodule(path, ExpertParallelBlock.from_hf(block, spec, cfg, ep_group))
    # transformers' save_pretrained saves model.state_dict() (this rank's experts, our keys) unless given a state dict
    model.save_pretrained = functools.partial(_save_pretrained, model)
    pass_attention_mask(model)
    return model


def _save_pretrained(model: PreTrainedModel, save_directory: Union[str, os.PathLike], is_main_process: bool = True,
                     state_dict: Optional[dict[str, Tensor]] = None, **kwargs: Any) -> Any:
    """A converted model's ``save_pretrained``. Plain (at most ``max_shard_size`` and
    ``safe_serialization=True``): ``saving.save_pretrained``, one gathered tensor at a time.
    Anything else (a ``state_dict``, ``push_to_hub``, ``variant``, ...): transformers' own with
    ``to_hf_state_dict(model, state_dict)``, the full checkpoint gathered at once. Collective:
    every rank calls it (with ``is_main_process`` as transformers asks); rank 0 writes."""
    if state_dict is None and set(kwargs) <= {"max_shard_size", "safe_serialization"} and \
            kwargs.get("safe_serialization", True):
        return save_pretrained(model, save_directory, is_main_process, kwargs.get("max_shard_size", "50GB"))
    state = to_hf_state_dict(model, state_dict)
    return type(model).save_pretrained(model, save_directory, is_main_process, state, **kwargs)


def to_hf_state_dict(model: nn.Module, state_dict: Optional[dict[str, Tensor]] = None) -> dict[str, Tensor]:
    """``state_dict`` (default ``model.state_dict()``) with every converted block back under its
    original Hugging Face keys and layouts, with all of its experts (gathered from each block's EP
    group: collective, call it on every rank). Keys that are HF keys already pass through.
    A converted model's ``save_pretrained(directory)`` saves it (on every rank; rank 0 writes);
    ``AutoModelForCausalLM.from_pretrained(directory)`` then loads a plain transformers model,
    without this library. Tensors may share storage with the model's parameters. Tensors of the
    layer without an HF counterpart (e.g. ``noisy_topk``'s ``noise_weight``) are not included.

    Raises:
        ValueError: transformers older than ``SUPPORTED_TRANSFORMERS``; ``state_dict`` holds only
            some of a block's tensors.
    """
    check_transformers_version()
    return dict(hf_items(model, state_dict))


def _moe_blocks(module: nn.Module, hf_config: Any, prefix: str = "") -> Iterator[tuple[str, nn.Module, BlockSpec, Any]]:
    """``(path, block, spec, config of the owning model)`` of every HF sparse-MoE block under
    ``module``; ``ValueError`` for one that no spec converts."""
    for name, child in module.named_children():
        path, kind = prefix + name, type(child).__name__
        if isinstance(child, ExpertParallelBlock):
            continue
        if kind in SPECS_BY_BLOCK:
            yield path, child, SPECS_BY_BLOCK[kind], hf_config
        elif kind.endswith(MOE_SUFFIXES):
            raise mismatch(f"{path} is a {kind}, a sparse-MoE block that no spec converts; supported blocks: "
                           f"{sorted(SPECS_BY_BLOCK)} (add a BlockSpec for {kind} to "
                           "expert_parallel.integrations.huggingface.families)")
        else:
            yield from _moe_blocks(child, child.config if isinstance(child, PreTrainedModel) else hf_config, path + ".")


def _check_overrides(overrides: dict[str, Any]) -> None:
    for name, value in overrides.items():
        if name not in MOE_FIELDS:
            raise ValueError(f"convert(..., {name}={value!r}): {name} is not a MoEConfig field; choose among "
                             f"{sorted(MOE_FIELDS - set(STRUCTURAL_FIELDS) - {'ep_size'})}")
        if name in STRUCTURAL_FIELDS:
            raise ValueError(f"convert(..., {name}={value!r}) cannot be overridden: it is fixed by the model's "
                             "weights; remove it")


def _layer_config(path: str, spec: BlockSpec, hf_config: Any, ep_size: int, overrides: dict[str, Any]) -> MoEConfig:
    """The ``MoEConfig`` of the block at ``path``: ``DEFAULTS``, the spec's fields, ``overrides``."""
    fields = spec.moe_fields(hf_config)
    missing = sorted(set(fields) - MOE_FIELDS)
    if missing:
        raise ValueError(f"converting {spec.block} ({spec.name}) needs the MoEConfig fields {missing}, which this "
                         "expert_parallel does not have yet; update expert_parallel to a version with them")
    check_experts_split(fields["num_experts"], ep_size, f"{path} ({spec.block}) num_experts", fixed=True)
    capacity_asked = any(name in overrides for name in CAPACITY_FIELDS) and "dropless" not in overrides
    return MoEConfig(**{**DEFAULTS, **fields, **({"dropless": False} if capacity_asked else {}), **overrides,
                        "ep_size": ep_size})


def _check_coverage(path: str, block: nn.Module, spec: BlockSpec, cfg: MoEConfig) -> None:
    """Every tensor of the HF block is mapped by the spec (for the block's ``cfg``), and every mapped one exists."""
    have, mapped = set(block.state_dict()), {wm.hf for wm in spec.weights_for(cfg)}
    if have != mapped:
        raise mismatch(f"{path} ({spec.block}) holds tensors {sorted(have - mapped)} that the spec does not map "
                       f"and lacks {sorted(mapped - have)} that it does; this variant of {spec.block} is not "
                       "supported (e.g. biases): extend its BlockSpec")
