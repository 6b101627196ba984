"""Any model built on ``MoELayer`` (e.g. a Hugging Face model after
``integrations.huggingface.convert``) under the DeepSpeed engine: ``deepspeed.initialize(model=
EngineModel(model, ep_size), ...)``.

DeepSpeed handles a parameter as an expert weight when it is tagged ``allreduce=False`` and
``group_name="ep_size_<N>"``: ZeRO partitions it, and reduces its gradient, over the expert-data-
parallel group of ``group_name`` (the replicas of the same experts) instead of the whole world, the
start-up broadcast stays inside that group, and the gradient norm averages its part over that group.
The engine switches this handling on (``has_moe_layers``) only when the model contains a
``deepspeed.moe.layer.MoE``; our own drop-in is one, but a model built on ``MoELayer`` directly (a
converted model's ``ExpertParallelBlock`` s, or your own) is not. Without it ZeRO would treat the
expert shards of different EP ranks as replicas of one tensor: average their gradients and partition
them over the world.

``EngineModel`` is what the engine gets instead: the model, its expert parameters tagged
(``expert_parallel.experts.sharded_expert_parameters``, the same structural lookup as the drop-in's
tags), and ``ExpertGroupDeclaration``, a parameterless ``deepspeed.moe.layer.MoE`` that turns the
engine's MoE handling on and creates DeepSpeed's expert groups, checked to be the ranks the model's
MoE layers all-to-all over.

Checkpoints: the declaration owns no experts, so the engine writes no per-expert files, and its
model file (``mp_rank_00_model_states.pt``, written by data-parallel rank 0) holds rank 0's expert
shards only. Each rank therefore writes its own shard next to it (``expert_shard_rank<R>.pt``) and
loads it back after ``load_checkpoint``; the fp32 master weights come from ZeRO's per-rank partition
files as usual (or, with ``load_from_fp32_weights: false``, are refreshed from the loaded weights),
so a resumed run continues exactly.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import deepspeed.moe.layer
import torch
import torch.distributed as dist
from deepspeed.utils import groups
from torch import nn

from ...experts import sharded_expert_parameters
from ...layer import MoELayer
from .experts import mark_expert_params


def expert_parallel_group(ep_size: int, use_data_before_expert_parallel_: bool = False,
                          with_mpu: bool = False) -> dist.ProcessGroup:
    """DeepSpeed's expert-parallel group ``ep_size_<ep_size>`` of this rank, created once (with its
    expert-data-parallel groups) by DeepSpeed's own helpers, as its ``MoE`` creates them: with
    ``with_mpu`` (expert tensor parallelism under ``deepspeed.initialize(mpu=...)``) within the mpu's
    data-parallel ranks, otherwise in consecutive blocks. Collective the first time."""
    name = f"ep_size_{ep_size}"
    if name not in groups._get_expert_parallel_group_dict():
        if with_mpu:
            groups._create_expert_data_and_model_parallel(
                ep_size, mpu=groups.mpu, use_data_before_expert_parallel_=use_data_before_expert_parallel_)
        else:
            groups._create_expert_and_data_parallel(
                ep_size, use_data_before_expert_parallel_=use_data_before_expert_parallel_)
    return groups._get_expert_parallel_group(name)


class ExpertGroupDeclaration(deepspeed.moe.layer.MoE):
    """A ``deepspeed.moe.layer.MoE`` without parameters or forward: it tells the engine that the
    model has expert parameters of group ``ep_size_<ep_size>`` and creates that group.

    Args:
        ep_size: ranks each block's experts are split over.
        num_experts: routed experts per block (what the engine records in checkpoints).
        ep_ranks: the global ranks this rank's MoE layers all-to-all over (``MoELayer.ep_ranks``).
    """

    def __init__(self, ep_size: int, num_experts: int, ep_ranks: tuple[int, ...]) -> None:
        nn.Module.__init__(self)  # DeepSpeed's __init__ builds a gate and experts
        self.ep_size, self.num_experts, self.ep_ranks = ep_size, num_experts, ep_ranks
        self.expert_group_name = f"ep_size_{ep_size}"
        self.num_local_experts = 0  # the engine's per-expert checkpoint files: none (see the module docstring)
        self.enable_expert_tensor_parallelism = False
        self.use_residual = False

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by the engine: create DeepSpeed's expert and expert-data-parallel groups.

        Raises:
            RuntimeError: DeepSpeed's EP group of this rank is not the converted blocks' group
                (e.g. ``use_data_before_expert_parallel_`` orders the ranks differently).
        """
        group = expert_parallel_group(self.ep_size, use_data_before_expert_parallel_)
        ranks = tuple(dist.get_process_group_ranks(group))
        if ranks != self.ep_ranks:
            raise RuntimeError(f"DeepSpeed's expert-parallel group of rank {dist.get_rank()} is {ranks}, the "
                               f"model's MoE layers all-to-all over {self.ep_ranks}; leave "
                               "use_data_before_expert_parallel_ off")

    def forward(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("ExpertGroupDeclaration only declares expert groups to DeepSpeed; it has no forward")


class EngineModel(nn.Module):
    """What ``deepspeed.initialize`` gets for a model built on ``MoELayer``: ``forward(*args,
    **kwargs)`` is the model's; the expert parameters carry DeepSpeed's tags; ``save_expert_shard``
    / ``load_expert_shard`` keep this rank's experts in an engine checkpoint.

    Args:
        model: the model (``self.model``), e.g. a converted transformers model.
        ep_size: its expert-parallel size.

    Raises:
        ValueError: the model has no ``MoELayer``, its layers' EP size differs from ``ep_size``, or
            they are tensor-parallel (``tp_size > 1``).
    """

    def __init__(self, model: nn.Module, ep_size: int) -> None:
        super().__init__()
        layers = [module for module in model.modules() if isinstance(module, MoELayer)]
        if not layers:
            raise ValueError(f"EngineModel: {type(model).__name__} has no MoELayer; wrap a model built on MoELayer "
                             "(e.g. after integrations.huggingface.convert), or use integrations.deepspeed.MoE")
        if any(layer.cfg.ep_size != ep_size for layer in layers):
            raise ValueError(f"EngineModel(ep_size={ep_size}): the model's MoE layers have ep_size "
                             f"{sorted({layer.cfg.ep_size for layer in layers})}; pass that ep_size")
        if any(layer.cfg.tp_size > 1 for layer in layers):
            raise ValueError(f"EngineModel: the model's MoE layers have tp_size "
                             f"{sorted({layer.cfg.tp_size for layer in layers})}, and it declares DeepSpeed's "
                             "expert groups without tensor parallelism; use "
                             "integrations.deepspeed.MoE with an mpu for tensor-parallel MoE layers")
        self.model = model
        self.expert_groups = ExpertGroupDeclaration(ep_size, layers[0].cfg.num_experts, layers[0].ep_ranks)
        mark_expert_params(model, self.expert_groups.expert_group_name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The model's forward."""
        return self.model(*args, **kwargs)

    def _experts(self) -> dict[str, nn.Parameter]:
        expert_ids = {id(param) for param in sharded_expert_parameters(self.model)}
        return {name: param for name, param in self.model.named_parameters() if id(param) in expert_ids}

    def save_expert_shard(self, tag_dir: Path) -> None:
        """Write this rank's expert weights to ``tag_dir/expert_shard_rank<R>.pt`` (atomically)."""
        path = tag_dir / f"expert_shard_rank{dist.get_rank()}.pt"
        torch.save({name: param.detach().cpu() for name, param in self._experts().items()}, path.with_suffix(".tmp"))
        os.replace(path.with_suffix(".tmp"), path)

    def load_expert_shard(self, tag_dir: Path) -> None:
        """Copy this rank's saved expert weights into the parameters (in place: under ZeRO they
        are views of its flat buffers).

        Raises:
            FileNotFoundError: no shard of this rank in ``tag_dir``.
            ValueError: the shard's parameter names differ from the model's.
        """
        path = tag_dir / f"expert_shard_rank{dist.get_rank()}.pt"
        if not path.exists():
            raise FileNotFoundError(f"no {path.name} in {tag_dir}: resume with the world size and ep size the "
                                    "checkpoint was written with")
        saved, experts = torch.load(path, map_location="cpu"), self._experts()
        if set(saved) != set(experts):
            raise ValueError(f"{path} holds experts {sorted(set(saved) ^ set(experts))[:3]}... that this model "
                             "does not (or the reverse); resume with the same model and ep size")
        with torch.no_grad():
            for name, param in experts.items():
                param.copy_(saved[name])
