"""Topology-free sharded checkpoints: save at one EP / data-parallel / world size, load at another,
optimizer state, RNG and trainer state included, every tensor checked against a manifest.

    from expert_parallel.checkpoint import save_checkpoint, load_checkpoint
    save_checkpoint("ckpt/step100", model, optimizer, extra={"step": 100})
    extra = load_checkpoint("ckpt/step100", model, optimizer)   # any EP size, any world size

``python -m expert_parallel.checkpoint`` inspects a checkpoint and converts DeepSpeed engine
checkpoints to this format (see docs/checkpoints.md).
"""

from .background import AsyncSave, async_save_checkpoint
from .logical import ExpertShard, expert_shards
from .manifest import CheckpointError, read_manifest
from .store import latest_checkpoint, load_checkpoint, mark_latest, save_checkpoint

__all__ = ["AsyncSave", "CheckpointError", "ExpertShard", "async_save_checkpoint", "expert_shards", "latest_checkpoint",
           "load_checkpoint", "mark_latest", "read_manifest", "save_checkpoint"]
