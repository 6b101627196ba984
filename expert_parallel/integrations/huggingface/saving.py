"""``save_pretrained``: a converted model saved as Hugging Face's sharded safetensors checkpoint
with its index, gathering one tensor at a time, so no rank holds the whole model at once."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator, Optional, Union

import torch.distributed as dist
import transformers
from safetensors.torch import save_file
from torch import Tensor, nn

from .block import ExpertParallelBlock
from .compat import loading_internals

SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"
SHARD = "model-{index:05d}-of-{count:05d}.safetensors"  # transformers' names of the shards


def hf_items(model: nn.Module, state_dict: Optional[dict[str, Tensor]] = None) -> Iterator[tuple[str, Tensor]]:
    """``to_hf_state_dict(model, state_dict)`` one tensor at a time, in its order: a routed-expert
    tensor is gathered from its EP group when its turn comes (collective: every rank iterates to
    the end), so a caller that writes and drops each (``saving.save_pretrained``) holds one
    gathered tensor at a time."""
    blocks = {name + ".moe.": block for name, block in model.named_modules() if isinstance(block, ExpertParallelBlock)}
    given = model.state_dict() if state_dict is None else state_dict
    done: set[str] = set()
    for key, value in given.items():
        prefix = next((prefix for prefix in blocks if key.startswith(prefix)), None)
        if prefix is None:
            yield key, value
        elif prefix not in done:  # the block's first key: all of its tensors, in their place
            done.add(prefix)
            layer_state = {name[len(prefix):]: tensor for name, tensor in given.items() if name.startswith(prefix)}
            for name, tensor in blocks[prefix].hf_items(layer_state):
                yield prefix[:-len("moe.")] + name, tensor


class ShardWriter:
    """Packs tensors into safetensors files of at most ``limit`` bytes, in the order given (a
    tensor larger than ``limit`` gets a file of its own, as transformers does), writing each file
    as soon as it is full: it holds one shard's tensors at a time. ``close`` names them as
    transformers does (``model.safetensors`` alone, or ``model-0000i-of-0000N.safetensors`` with
    ``model.safetensors.index.json``)."""

    def __init__(self, directory: Path, limit: int) -> None:
        self.directory, self.limit = directory, limit
        self.shard: dict[str, Tensor] = {}
        self.size = self.total = 0
        self.files: list[list[str]] = []  # the keys of every file written, in order

    def add(self, key: str, value: Tensor) -> None:
        nbytes = value.numel() * value.element_size()
        if self.shard and self.size + nbytes > self.limit:
            self._flush()
        self.shard[key] = value.contiguous()
        self.size += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        save_file(self.shard, str(self.directory / f"shard-{len(self.files)}.tmp"), metadata={"format": "pt"})
        self.files.append(list(self.shard))
        self.shard, self.size = {}, 0

    def close(self) -> None:
        """Write the last file, name the files and write the index (several files only)."""
        if self.shard or not self.files:
            self._flush()
        count = len(self.files)
        names = [SINGLE] if count == 1 else [SHARD.format(index=i + 1, count=count) for i in range(count)]
        for i, name in enumerate(names):
            os.replace(self.directory / f"shard-{i}.tmp", self.directory / name)
        if count > 1:
            weight_map = {key: name for name, keys in zip(names, self.files) for key in keys}
            index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
            (self.directory / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def save_pretrained(model: transformers.PreTrainedModel, save_directory: Union[str, os.PathLike],
                    is_main_process: bool = True, max_shard_size: Union[int, str] = "50GB") -> None:
    """Save a converted model as the plain Hugging Face checkpoint (what ``to_hf_state_dict`` holds,
    in the checkpoint's original format, as transformers' ``save_pretrained`` writes it):
    safetensors files of at most ``max_shard_size`` each (transformers' default and spelling:
    ``"5GB"``, ``"500MB"``, bytes) with ``model.safetensors.index.json`` when there are several,
    and the config. Each routed-expert tensor is gathered from its EP group when its turn comes
    and written or dropped before the next: no rank holds the whole model at once (rank 0 holds
    one shard). A converted model's plain ``model.save_pretrained(directory)`` comes here.

    Collective: call it on every rank; rank 0 (with ``is_main_process``) writes.
    ``AutoModelForCausalLM.from_pretrained(save_directory)`` loads it without this library, and
    ``from_pretrained`` reads back only a rank's experts.
    """
    hf = loading_internals()  # on every rank, before anything is written
    directory = Path(save_directory)
    write = is_main_process and (not dist.is_initialized() or dist.get_rank() == 0)
    # the config, generation config, ... by transformers itself (rank 0), with no tensors; it also clears old shards
    type(model).save_pretrained(model, directory, is_main_process, state_dict={})
    writer = ShardWriter(directory, hf.convert_file_size_to_int(max_shard_size)) if write else None
    # a tensor tied to one written before (lm_head = embeddings: the same memory, not only the same storage, which
    # DeepSpeed's flat buffers share between parameters) is saved once, as transformers does
    own = {_place(tensor) for tensor in model.state_dict().values()}
    written: set[tuple] = set()
    for key, tensor in hf_items(model):
        place = _place(tensor)
        if writer is None or place in written:
            continue
        if place in own:
            written.add(place)
        for name, value in hf.revert_weight_conversion(model, {key: tensor}).items():
            writer.add(name, value)
    if writer is not None:
        (directory / SINGLE).unlink(missing_ok=True)  # transformers' empty file
        writer.close()


def _place(tensor: Tensor) -> tuple:
    """Where a tensor's elements are: two tensors with the same place are one (tied)."""
    return tensor.device, tensor.data_ptr(), tuple(tensor.shape), tensor.stride(), tensor.dtype
