"""A cached workspace for the static-shape scratch buffers of one layer.

Every step of a layer with a fixed capacity allocates the same buffers again (``[E*C, D]`` slots,
``[M, D]`` expert rows, ...). On the CPU a fresh buffer of megabytes is page-faulted in on first
touch (glibc hands large blocks back to the kernel on free), so each step pays for its buffers a
second time. A ``Workspace`` keeps one buffer per (name, shape, dtype, device) and hands the same
one out again, so a step touches memory it already owns.

Reuse is safe by construction: a buffer is handed out again only while nothing but the workspace
holds it (no view, no tensor saved for a backward, no pending all-to-all): otherwise a new one is
allocated and cached instead, so a forward that runs twice before its backward (gradient
accumulation) never overwrites what the first one still needs. Only CPU buffers are cached (a GPU's
caching allocator already reuses its blocks without faults, and knows its streams); while
``torch.compile`` traces, nothing is cached. The buffers die with the workspace (with the layer).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor


def _storage_uses(tensor: Tensor) -> int:
    return torch._C._storage_Use_Count(tensor.untyped_storage()._cdata)


class Workspace:
    """Scratch buffers reused across steps (see the module). Not part of a module's state: a copy
    or an unpickled layer starts with an empty one."""

    def __init__(self) -> None:
        # key -> (buffer, its storage's use count while only the workspace holds it)
        self._buffers: dict[tuple, tuple[Tensor, int]] = {}

    def empty(self, name: str, shape: Sequence[int], like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
        """An uninitialised buffer of ``shape`` (``like``'s device, ``dtype`` or ``like``'s): the
        cached one when it is free, else a new one (cached from now on). ``name`` tells buffers of
        the same shape apart that live at the same time."""
        dtype = dtype or like.dtype
        if like.device.type != "cpu" or torch.compiler.is_compiling():
            return like.new_empty(shape, dtype=dtype)
        key = (name, tuple(shape), dtype, like.device)
        cached = self._buffers.get(key)
        if cached is not None and cached[0]._use_count() == 1 and _storage_uses(cached[0]) == cached[1]:
            return cached[0]
        buffer = like.new_empty(shape, dtype=dtype)
        self._buffers[key] = (buffer, _storage_uses(buffer))
        return buffer

    def __len__(self) -> int:
        return len(self._buffers)

    def __deepcopy__(self, memo: dict) -> Workspace:
        return Workspace()

    def __getstate__(self) -> dict:
        return {"_buffers": {}}


def scratch(workspace: Optional[Workspace], name: str, shape: Sequence[int], like: Tensor,
            dtype: Optional[torch.dtype] = None) -> Tensor:
    """``workspace.empty(...)``, or a fresh ``like.new_empty`` without a workspace."""
    if workspace is None:
        return like.new_empty(shape, dtype=dtype or like.dtype)
    return workspace.empty(name, shape, like, dtype)
