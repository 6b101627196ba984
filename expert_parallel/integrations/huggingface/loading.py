"""``from_pretrained``: a converted model straight from a checkpoint directory, reading only this
rank's experts (and the dense weights), so no rank needs every expert in memory.

The model is built on the meta device and converted there (``convert``'s plan, checks and
``MoELayer`` s, with no tensor allocated); then every tensor is read from the safetensors files
with ``safe_open``: a routed-expert tensor stored stacked (``[E, ...]``) is read through
``get_slice``, rows of this rank's experts only; one stored per expert (the original format that
``save_pretrained`` writes, e.g. ``experts.3.w1.weight``) is read for this rank's experts only.
Checkpoint keys become model keys by transformers' own weight-conversion rules (renamings and
merges), then the specs' ``WeightMap`` s turn them into ours (``hf_to_ours``).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch
import transformers
from safetensors import safe_open
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from .block import ExpertParallelBlock
from .compat import causal_lm_class, loading_internals, mismatch
from .convert import convert
from .saving import INDEX, SINGLE
from .specs import hf_to_ours

# (first expert, experts, all experts) of a block's routed-expert tensor: the rows this rank reads
Rows = Optional[tuple[int, int, int]]
# model key -> (transformers' converter or None, {source pattern: checkpoint keys})
Groups = dict[str, tuple[Any, dict[str, list[str]]]]


class Checkpoint:
    """The safetensors files of a ``save_pretrained`` directory or a Hub snapshot folder, open for
    reading: ``model.safetensors``, or the shards that ``model.safetensors.index.json`` names.

    Raises:
        ValueError: the directory holds neither (e.g. only ``pytorch_model.bin``).
    """

    def __init__(self, path: Union[str, os.PathLike], stack: contextlib.ExitStack) -> None:
        path = Path(path)
        if (path / INDEX).is_file():
            files = sorted(set(json.loads((path / INDEX).read_text())["weight_map"].values()))
        elif (path / SINGLE).is_file():
            files = [SINGLE]
        else:
            raise ValueError(f"{path} holds no {SINGLE} or {INDEX}; from_pretrained reads safetensors checkpoints (a "
                             "save_pretrained directory or a Hub snapshot folder): save the model with "
                             "save_pretrained first, or load it with transformers and convert")
        self.handles = {name: stack.enter_context(safe_open(str(path / name), framework="pt")) for name in files}
        self.file_of = {key: name for name, handle in self.handles.items() for key in handle.keys()}

    def read(self, key: str, rows: Rows = None) -> Tensor:
        """The stored tensor ``key``; with ``rows=(first, n, E)`` only experts ``first : first + n``
        of its ``E`` equal blocks of rows (dim 0), read from the file alone."""
        handle = self.handles[self.file_of[key]]
        if rows is None:
            return handle.get_tensor(key)
        first, n, experts = rows
        stored = handle.get_slice(key)
        height = stored.get_shape()[0]
        if height % experts:
            raise ValueError(f"{key} has {height} rows, not a multiple of the block's {experts} experts; this "
                             "checkpoint's expert layout is not supported by from_pretrained: load it with "
                             "transformers and convert")
        block = height // experts
        return stored[first * block:(first + n) * block]


def from_pretrained(path: Union[str, os.PathLike], ep_size: int = 1, ep_group: Optional[ProcessGroup] = None,
                    dtype: Optional[torch.dtype] = None, **overrides: Any) -> transformers.PreTrainedModel:
    """The converted causal LM of the checkpoint at ``path``, with only this rank's experts read.

    The same model as ``convert(AutoModelForCausalLM.from_pretrained(path), ep_size, ep_group,
    **overrides)`` (bit for bit), on the CPU, without ever holding another rank's experts: a rank's
    host memory grows with the dense weights plus ``1 / ep_size`` of the experts. Collective like
    ``convert`` (call it on every rank; ``ep_size > 1`` builds process groups).

    Args:
        path: a ``save_pretrained`` directory or a Hub snapshot folder (``config.json`` and
            ``model.safetensors`` or shards with ``model.safetensors.index.json``).
        ep_size, ep_group, overrides: as ``convert``.
        dtype: the parameters' dtype; ``None`` takes the config's (``config.dtype``), else fp32,
            as transformers' ``dtype="auto"``.

    Returns:
        The converted ``PreTrainedModel`` (its ``save_pretrained`` writes the full HF checkpoint).

    Raises:
        ValueError: everything ``convert`` refuses (before any tensor is read); no safetensors
            checkpoint at ``path``; a tensor the model needs missing from it.
    """
    config = transformers.AutoConfig.from_pretrained(path)
    dtype = dtype or (getattr(config, "dtype", None) if isinstance(getattr(config, "dtype", None), torch.dtype)
                      else torch.float32)
    with torch.device("meta"):
        model = causal_lm_class(config)._from_config(config, dtype=dtype)
    with contextlib.ExitStack() as stack:
        checkpoint = Checkpoint(path, stack)
        groups = _checkpoint_groups(model, checkpoint.file_of)
        with torch.device("meta"):
            convert(model, ep_size=ep_size, ep_group=ep_group, **overrides)
        blocks = {name: block for name, block in model.named_modules() if isinstance(block, ExpertParallelBlock)}
        sharded = _sharded_rows(blocks)
        for target, (transform, sources) in groups.items():
            for key, value in _materialise(model, target, transform, sources, checkpoint,
                                           sharded.get(target)).items():
                _place(model, blocks, key, value)
    for block in blocks.values():
        _fill_layer_only_tensors(block.moe)
    model.tie_weights()
    _fill_derived_buffers(model)
    left = sorted(name for name, tensor in (*model.named_parameters(), *model.named_buffers()) if tensor.is_meta)
    if left:
        raise ValueError(f"{path} lacks {left[:8]}{' ...' if len(left) > 8 else ''}, which the "
                         f"{type(model).__name__} needs; the checkpoint is incomplete or of another model")
    return model.eval()


def _checkpoint_groups(model: nn.Module, keys: Any) -> Groups:
    """``model key -> (transformers' converter or None, {source pattern: checkpoint keys})``: the
    checkpoint keys ``keys`` grouped by the model tensor they make, as transformers' loading does
    (its renamings, at most one converter per key, the base-model prefix); keys of tensors per
    expert in expert order. Keys the model does not hold are left out."""
    hf = loading_internals()
    mapping = hf.get_model_conversion_mapping(model)
    renamings = [entry for entry in mapping if isinstance(entry, hf.WeightRenaming)]
    converters = [entry for entry in mapping if isinstance(entry, hf.WeightConverter)]
    by_pattern = {pattern: converter for converter in converters for pattern in converter.source_patterns}
    meta_state = model.state_dict()
    groups: Groups = {}
    for key in sorted(keys, key=hf.dot_natural_key):
        target, pattern = hf.rename_source_key(key, renamings, converters, model.base_model_prefix, meta_state)
        if target not in meta_state and key in meta_state:
            target, pattern = hf.rename_source_key(key, [], [], model.base_model_prefix, meta_state)
        if target not in meta_state:
            continue
        converter = by_pattern[pattern] if pattern is not None else None
        groups.setdefault(target, (converter, {}))[1].setdefault(pattern or key, []).append(key)
    return groups


def _sharded_rows(blocks: dict[str, ExpertParallelBlock]) -> dict[str, tuple[int, int, int]]:
    """``HF key of a routed-expert tensor -> (first expert, local experts, experts)`` of every
    converted block (``blocks`` by path): the rows this rank reads."""
    rows = {}
    for path, block in blocks.items():
        moe = block.moe
        local = moe.cfg.num_experts // moe.cfg.ep_size
        rows.update({f"{path}.{wm.hf}": (moe.first_expert, local, moe.cfg.num_experts)
                     for wm in block.spec.weights if wm.sharded})
    return rows


def _materialise(model: nn.Module, target: str, transform: Any, sources: dict[str, list[str]],
                 checkpoint: Checkpoint, rows: Rows) -> dict[str, Tensor]:
    """``{model key: tensor}`` made from the checkpoint keys ``sources`` (by pattern) by
    transformers' converter ``transform`` (none: the one key as stored). For a routed-expert
    tensor (``rows``: this rank's experts), stored per expert only this rank's experts' keys are
    read, stored stacked only their rows."""
    if transform is None:
        (key,), = sources.values()
        return {target: checkpoint.read(key, rows)}
    converter = copy.deepcopy(transform)
    for pattern, keys in sources.items():
        per_expert = rows is not None and len(keys) == rows[2] > 1
        if per_expert:
            keys = keys[rows[0]:rows[0] + rows[1]]
        for key in keys:  # transformers' sync loading: a callable per tensor, called by the converter
            converter.add_tensor(target, key, pattern,
                                 functools.partial(checkpoint.read, key, None if per_expert else rows))
    made = converter.convert(target, model=model, config=model.config)
    return {key: value[0] if isinstance(value, list) else value for key, value in made.items()}


def _place(model: nn.Module, blocks: dict[str, ExpertParallelBlock], key: str, value: Tensor) -> None:
    """Put ``value`` (the checkpoint's tensor of model key ``key``; this rank's experts only for a
    routed-expert tensor) into the converted model: a key of a converted block (``blocks`` by
    path) through the spec's maps (``hf_to_ours``), any other key as it is, in the meta tensor's
    dtype."""
    path = next((path for path in _prefixes(key.rpartition(".")[0]) if path in blocks), None)
    if path is not None:
        block, hf = blocks[path], key[len(path) + 1:]
        for wm in (wm for wm in block.spec.weights if wm.hf == hf):
            current = _tensor(block.moe, wm.ours)
            _assign(block.moe, wm.ours, hf_to_ours(value, wm, tuple(current.shape)).to(current.dtype))
        return
    current = _tensor(model, key)
    if tuple(value.shape) != tuple(current.shape):
        raise mismatch(f"the checkpoint's {key} {tuple(value.shape)} does not fit the model's {tuple(current.shape)}")
    _assign(model, key, value.to(current.dtype))


def _prefixes(owner: str) -> list[str]:
    """``"a.b.c" -> ["a.b.c", "a.b", "a", ""]``: the modules above a tensor, innermost first."""
    parts = owner.split(".") if owner else []
    return [".".join(parts[:i]) for i in range(len(parts), -1, -1)]


def _tensor(root: nn.Module, key: str) -> Tensor:
    """The parameter or buffer ``key`` of ``root``."""
    owner, _, name = key.rpartition(".")
    return getattr(root.get_submodule(owner), name)


def _assign(root: nn.Module, key: str, value: Tensor) -> None:
    """Replace the parameter or buffer ``key`` of ``root`` (a meta tensor) by ``value``."""
    owner, _, name = key.rpartition(".")
    module = root.get_submodule(owner)
    if name in module._parameters:
        module._parameters[name] = nn.Parameter(value, requires_grad=module._parameters[name].requires_grad)
    else:
        module._buffers[name] = value


def _fill_layer_only_tensors(moe: nn.Module) -> None:
    """The layer's tensors without an HF counterpart (a noisy router's ``noise_weight``, the
    selection-bias counts of ``bias_update_rate``, ...) as ``convert`` leaves them: at their
    initial value, zero; then the layer chooses its expert compute for the CPU tensors (it chose
    for meta ones)."""
    for name, tensor in (*moe.named_parameters(), *moe.named_buffers()):
        if tensor.is_meta:
            _assign(moe, name, torch.zeros_like(tensor, device="cpu"))
    moe.to("cpu")


def _fill_derived_buffers(model: transformers.PreTrainedModel) -> None:
    """The buffers no checkpoint holds (non-persistent: rotary frequencies, ...), still on meta:
    computed on the CPU by the model's own ``_init_weights`` of their module, as transformers'
    loading does; the module's loaded tensors are marked initialised, so that it keeps them."""
    owners = {name.rpartition(".")[0] for name, buffer in model.named_buffers() if buffer.is_meta}
    for owner in sorted(owners):
        module = model.get_submodule(owner)
        for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
            if not tensor.is_meta:
                tensor._is_hf_initialized = True
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.is_meta:
                module._buffers[name] = torch.empty_like(buffer, device="cpu")
        model._init_weights(module)
