"""How the demo job steps and checkpoints: plain torch (AdamW, gradient all-reduce, per-rank
checkpoints that resume at any topology) or the DeepSpeed engine (ZeRO, bf16, engine checkpoints)."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import timedelta
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from expert_parallel import RoutingStats
from expert_parallel.checkpoint import (
    AsyncSave,
    async_save_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    mark_latest,
    read_manifest,
)
from expert_parallel.comm import ExpertGroups, clip_grad_norm_, grad_norm, reduce_gradients

# (model, inputs [B, T], targets [B, T]) -> (LM loss, weighted aux loss, stats of every MoE layer);
# the backends differentiate the sum
LossFn = Callable[[nn.Module, Tensor, Tensor], tuple[Tensor, Tensor, list[RoutingStats]]]


def lm_loss(model: nn.Module, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, list[RoutingStats]]:
    """The toy model's ``LossFn``: next-token cross-entropy (fp32), the summed aux loss and every
    MoE layer's stats."""
    logits, aux_loss, stats = model(inputs)
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    return loss, aux_loss.float(), stats


class TorchBackend:
    """AdamW; dense gradients averaged over the data-parallel ranks, expert gradients over their
    replicas, then clipped to ``--clip-grad`` by the whole model's norm (each expert counted once).

    Checkpoints are topology-free (``expert_parallel.checkpoint``): ``OUT/checkpoint/step<N>/``,
    the last complete one named by ``OUT/checkpoint/latest``; a resume may change the world size
    and the EP size (with the same global batch, ``--batch-size`` times the world size, it sees the
    batches the saved run would have; with another one it warns and continues).
    """

    def __init__(self, model: nn.Module, args: argparse.Namespace, groups: ExpertGroups, rank: int,
                 world: int, ep_size: int, loss_fn: LossFn = lm_loss) -> None:
        self.model, self.groups, self.loss_fn = model, groups, loss_fn
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
        self.root = Path(args.out) / "checkpoint"
        self.rank, self.batch_size, self.global_batch = rank, args.batch_size, args.batch_size * world
        self.clip_grad = args.clip_grad
        # checkpoints are written by a background thread, whose collectives need a group of their own
        self._save_group = (dist.new_group(backend="gloo", timeout=timedelta(seconds=args.timeout_s))
                            if dist.is_initialized() and world > 1 else None)
        self._pending: Optional[AsyncSave] = None

    def step(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, list[RoutingStats], Tensor]:
        """One optimizer step; returns the (detached) loss, aux loss, stats and the gradient norm
        before clipping (a device scalar, the same on every rank)."""
        loss, aux_loss, stats = self.loss_fn(self.model, inputs, targets)
        self.optimizer.zero_grad(set_to_none=True)
        (loss + aux_loss).backward()
        reduce_gradients(self.model, self.groups)
        if self.clip_grad:
            norm = clip_grad_norm_(self.model, self.clip_grad, self.groups)
        else:
            norm = grad_norm(self.model, self.groups)
        self.optimizer.step()
        return loss.detach(), aux_loss.detach(), stats, norm

    def save(self, step: int, wait: bool = False) -> None:
        """Save ``step<N>`` (every rank its shard) in the background, then point ``latest`` at it:
        a job killed mid-save leaves ``latest`` on the previous checkpoint. The two newest are kept.
        Waits for the previous save first; ``wait``: also for this one."""
        self.wait()
        name = f"step{step}"
        mark = (lambda: mark_latest(self.root, name, keep=2)) if self.rank == 0 else None
        self._pending = async_save_checkpoint(self.root / name, self.model, self.optimizer, group=self._save_group,
                                              extra={"step": step, "global_batch": self.global_batch}, on_complete=mark)
        if wait:
            self.wait()

    def wait(self) -> None:
        """Block until the checkpoint being written (if any) is complete; raises its error."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.wait()

    def load(self, keep_global_batch: bool = False) -> int:
        """Restore the latest checkpoint at this job's topology; returns the step to continue from
        (the data position: batches are drawn by step from the global batch). ``keep_global_batch``
        (``--resume auto``): when the world size divides the saved global batch, take it, changing
        ``batch_size`` (per rank) to the saved global batch / world size."""
        path = latest_checkpoint(self.root)
        if path is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {self.root} (no 'latest' file); train without "
                                    "--resume first")
        with_optimizer = any(key.startswith("optim.") for key in read_manifest(path)["tensors"])
        if not with_optimizer and self.rank == 0:  # e.g. converted from a DeepSpeed engine checkpoint
            print(f"launch.train: warning: {path} holds no optimizer state; AdamW's moments start from zero",
                  file=sys.stderr, flush=True)
        extra = load_checkpoint(path, self.model, self.optimizer if with_optimizer else None)
        if "step" not in extra:
            raise ValueError(f"--resume: {path} records no step (extra={sorted(extra)}); save it with "
                             "extra={'step': N} or start a new run from its weights")
        saved_batch = extra.get("global_batch")  # absent in a checkpoint converted from DeepSpeed
        world = self.global_batch // self.batch_size
        if keep_global_batch and saved_batch not in (None, self.global_batch) and saved_batch % world == 0:
            self.batch_size, self.global_batch = saved_batch // world, saved_batch
            if self.rank == 0:
                print(f"launch.train: {path} was trained with a global batch of {saved_batch} sequences: at world size "
                      f"{world} that is --batch-size {self.batch_size} per rank", file=sys.stderr, flush=True)
        if saved_batch not in (None, self.global_batch) and self.rank == 0:
            keep = f" (--batch-size {saved_batch // world} keeps them)" if saved_batch % world == 0 else ""
            print(f"launch.train: warning: {path} was trained with a global batch of {saved_batch} sequences, this "
                  f"job has {self.global_batch} (--batch-size x world size); it continues from step {extra['step']} "
                  f"on other batches than the saved run would have seen{keep}", file=sys.stderr, flush=True)
        return extra["step"]


class DeepSpeedBackend:
    """``deepspeed.initialize`` with the JSON config of ``--deepspeed-config``; the client AdamW
    runs on DeepSpeed's MoE parameter groups; ``--clip-grad`` is the engine's ``gradient_clipping``
    unless the config sets one. Checkpoints are engine checkpoints in
    ``OUT/checkpoint`` (per-expert files for DeepSpeed MoE layers), resumed from the latest tag.
    ``model``'s expert parameters must carry DeepSpeed's tags (``allreduce=False``, ``group_name``):
    the drop-in MoE layers tag theirs, ``expert_parallel.integrations.deepspeed.EngineModel`` a converted model's."""

    def __init__(self, model: nn.Module, args: argparse.Namespace, world: int, loss_fn: LossFn = lm_loss) -> None:
        import deepspeed
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        config = json.loads(Path(args.deepspeed_config).read_text())
        config["train_micro_batch_size_per_gpu"] = args.batch_size
        config["gradient_accumulation_steps"] = 1
        config.pop("train_batch_size", None)
        config.setdefault("gradient_clipping", args.clip_grad)
        groups = split_params_into_different_moe_groups_for_optimizer(
            {"params": list(model.parameters()), "name": "parameters"})
        optimizer = torch.optim.AdamW(groups, lr=args.lr)
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        self.directory = Path(args.out) / "checkpoint"
        self.loss_fn = loss_fn
        from expert_parallel.integrations.deepspeed import EngineModel

        self._converted = isinstance(model, EngineModel)  # a converted transformers model

    @property
    def device(self) -> torch.device:
        """Where the engine keeps the model."""
        return self.engine.device

    @property
    def model(self) -> nn.Module:
        """The engine's model."""
        return self.engine.module

    def step(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, list[RoutingStats], Optional[float]]:
        """One engine step (ZeRO reduces and clips as configured); the gradient norm is the
        engine's (``None`` where it records none: without ZeRO in fp32)."""
        loss, aux_loss, stats = self.loss_fn(self.engine, inputs, targets)
        self.engine.backward(loss + aux_loss)
        self.engine.step()
        return loss.detach(), aux_loss.detach(), stats, self.engine.get_global_grad_norm()

    def save(self, step: int, wait: bool = False) -> None:
        """Engine checkpoint tagged ``step<N>``, with every rank's RNG state as client state
        (written before it returns, whatever ``wait``)."""
        # the engine writes client state from rank 0 only: gather the other ranks' RNG into it
        rng_states: list = [None] * dist.get_world_size()
        dist.all_gather_object(rng_states, torch.get_rng_state())
        self.engine.save_checkpoint(str(self.directory), tag=f"step{step}",
                                    client_state={"step": step, "rng": rng_states})
        if self._converted:  # its model file holds rank 0's experts: each rank keeps its own
            self.engine.module.save_expert_shard(self.directory / f"step{step}")

    def load(self, keep_global_batch: bool = False) -> int:
        """Load the latest engine checkpoint; returns the step to continue from. The engine resumes
        at the topology and batch that saved (``keep_global_batch`` is not needed)."""
        if not (self.directory / "latest").exists():
            raise FileNotFoundError(f"--resume: no DeepSpeed checkpoint in {self.directory}; train without "
                                    "--resume first")
        tag = (self.directory / "latest").read_text().strip()
        _, client_state = self.engine.load_checkpoint(str(self.directory), tag=tag)
        if self._converted:
            self.engine.module.load_expert_shard(self.directory / tag)
            if not self.engine.zero_load_from_fp32_weights():  # ZeRO took its fp32 weights from rank 0's experts
                self.engine.optimizer.refresh_fp32_params()
        torch.set_rng_state(client_state["rng"][dist.get_rank()])
        return client_state["step"]
