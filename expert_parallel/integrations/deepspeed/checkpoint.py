"""Convert a DeepSpeed engine checkpoint into a topology-free ``expert_parallel.checkpoint``.

The engine keeps dense weights in ``<tag>/mp_rank_00_model_states.pt`` and, for every
``deepspeed.moe.layer.MoE`` (our drop-in ``MoE`` included), one file per global expert
(``layer_<L>_expert_<e>_mp_rank_00_model_states.pt``); a model wrapped in ``EngineModel`` keeps each
rank's expert shard in ``expert_shard_rank<R>.pt`` instead. ``from_deepspeed`` reads them into the
same model built at EP size 1 in one process (every expert local, so every file has its place),
then writes our format, which loads at any EP size, data-parallel size and world size.

Not converted: optimizer state. ZeRO keeps Adam's moments as flat fp32 partitions per
data-parallel rank (and, without ZeRO, as one optimizer state per EP rank), not as per-expert
tensors; the converted checkpoint holds weights only (load it without the optimizer: the moments
start again from zero). Nor are the engine's RNG and LR-scheduler states.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import deepspeed.moe.layer
import torch
from deepspeed.runtime.engine import DeepSpeedEngine
from torch import nn

from ...checkpoint import CheckpointError, save_checkpoint
from ...layer import MoELayer
from .engine import EngineModel, ExpertGroupDeclaration
from .moe import MoE

NOT_CONVERTED = ("optimizer state (ZeRO keeps Adam's moments as flat per-rank partitions, not per expert), RNG and "
                 "LR-scheduler state; load the converted checkpoint without an optimizer")


def from_deepspeed(engine_dir: str | os.PathLike, out: str | os.PathLike, model: nn.Module,
                   tag: Optional[str] = None) -> Path:
    """Convert the engine checkpoint ``engine_dir/<tag>`` into ``out`` (weights only: see
    ``NOT_CONVERTED``). Single process, no process group.

    Args:
        engine_dir: the directory given to ``engine.save_checkpoint``.
        out: the new checkpoint directory.
        model: the model the engine trained (the module given to ``deepspeed.initialize``: a model
            with drop-in ``MoE`` layers, or an ``EngineModel``), built with ``ep_size=1``.
        tag: the checkpoint tag; ``None`` reads ``engine_dir/latest``.

    Returns:
        ``out``; its ``extra`` holds the engine's client state (``step`` etc.) and ``converted_from``.

    Raises:
        CheckpointError: a file is missing, a tensor's name or shape does not fit ``model``, or the
            model is not at EP size 1.
    """
    engine_dir = Path(engine_dir)
    if tag is None:
        latest = engine_dir / "latest"
        if not latest.is_file():
            raise CheckpointError(f"{engine_dir} has no 'latest' file; pass the tag (a subdirectory) to convert")
        tag = latest.read_text().strip()
    tag_dir = engine_dir / tag
    states = _load(tag_dir / "mp_rank_00_model_states.pt")
    module_state = dict(states["module"])
    for layer in model.modules():
        if isinstance(layer, MoELayer) and layer.cfg.ep_size != 1:
            raise CheckpointError(f"build the model with ep_size=1 to convert (a layer has ep_size="
                                  f"{layer.cfg.ep_size}); the converted checkpoint then loads at any EP size")
    drop_ins = [module for module in model.modules()
                if isinstance(module, deepspeed.moe.layer.MoE) and not isinstance(module, ExpertGroupDeclaration)]
    for layer_id, module in enumerate(drop_ins):
        if isinstance(module, MoE):
            module.set_deepspeed_parallelism()  # no process group: binds the single-rank EP group
        for expert in range(module.num_experts):
            path = Path(DeepSpeedEngine._get_expert_ckpt_name(str(engine_dir), layer_id, expert, tag))
            module_state.update(_load(path))  # at EP 1 a global expert id is its local id
    if isinstance(model, EngineModel):
        module_state.update(_engine_model_experts(tag_dir, model))
    try:
        model.load_state_dict(module_state, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"{tag_dir} does not fit the model given: {error}") from None
    client = {key: value for key, value in states.items() if key in ("step", "global_batch")}
    return save_checkpoint(out, model, extra={**client, "converted_from": str(tag_dir)})


def _engine_model_experts(tag_dir: Path, model: EngineModel) -> dict[str, torch.Tensor]:
    """The whole experts of an ``EngineModel`` checkpoint: the shards of EP ranks ``0 .. ep-1`` (the
    first EP group; the other groups are its replicas) concatenated in EP order, under the engine's keys."""
    first = _load(tag_dir / "expert_shard_rank0.pt")
    name, param = next(iter(model._experts().items()))
    ep_size = param.shape[0] // first[name].shape[0]
    shards = [first] + [_load(tag_dir / f"expert_shard_rank{rank}.pt") for rank in range(1, ep_size)]
    return {f"model.{name}": torch.cat([shard[name] for shard in shards]) for name in first}


def _load(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"engine checkpoint file {path} is missing; convert a complete checkpoint (or pass "
                              "the model it was trained with)")
    return torch.load(path, map_location="cpu", weights_only=False)
