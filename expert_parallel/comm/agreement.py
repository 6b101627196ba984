"""The per-batch agreement: one small all-reduce of maxima over the EP group.

Every EP rank must use the same buffer shape and must stop together on bad input, so the few
numbers this needs ride on one all-reduce (MAX) per forward. With fixed buffers (``capacity``, or
``max_tokens_per_rank`` of ``dropless``) and no ``check_finite`` the layer skips it, and the
forward is free of host syncs.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup


class Agreement(NamedTuple):
    """This rank's proposal, or after ``agree`` the EP group's maxima (Python ints).

    Attributes:
        capacity_input: what the capacity rule takes (``layout.capacity_input``): the token
            count, a router's proposed capacity, or the fullest expert's count; 0 when unused.
        nonfinite_tokens: tokens with NaN or inf router logits (``check_finite``), else 0.
        invalid_input: 1 if this rank's input was invalid (it raises; its peers raise too).
    """

    capacity_input: Union[int, Tensor] = 0
    nonfinite_tokens: Union[int, Tensor] = 0
    invalid_input: int = 0


def device_for_backend(backend: str, device: torch.device) -> torch.device:
    """The device of a small tensor to all-reduce with ``backend``, for input on ``device``.

    The input's own device wherever the backend serves that device type (so every NCCL rank uses
    its own GPU, whatever ``torch.cuda.current_device()`` says); the CPU for gloo and MPI.

    Args:
        backend: ``dist.get_backend(group)``: ``"gloo"``, ``"nccl"``, ``"cpu:gloo,cuda:nccl"``...
        device: the layer input's device.

    Raises:
        ValueError: the backend cannot reduce tensors of ``device`` 's type (a CPU input on an
            NCCL group), naming both and the fix.
    """
    backend = backend.lower()
    if ":" in backend:  # one backend per device type
        served = {part.split(":")[0] for part in backend.split(",")}
        if device.type in served:
            return device
        if "cpu" in served:
            return torch.device("cpu")
    elif backend in ("gloo", "mpi"):
        return torch.device("cpu")
    elif device.type != "cpu":
        return device
    raise ValueError(f"the EP group's backend {backend!r} cannot all-reduce tensors on {device}, where the "
                     "MoELayer input is; move the layer and its input to the accelerator (layer.to(device)), "
                     "or build the EP group with a gloo backend")


def agree(local: Agreement, group: Optional[ProcessGroup], device: torch.device) -> Agreement:
    """The element-wise maximum of every rank's ``Agreement``: one all-reduce, one host sync.

    Args:
        local: this rank's values (ints or device scalars; device scalars are not read back
            before the all-reduce).
        group: the EP group; ``None`` (one rank) returns ``local`` as ints (as it is, with no
            device copy or host read, when it holds only ints).
        device: the layer input's device (see ``device_for_backend``).
    """
    if group is None and not any(isinstance(value, Tensor) for value in local):
        return local  # one rank, Python ints: nothing to copy to the device or read back
    where = device if group is None else device_for_backend(str(dist.get_backend(group)), device)
    values = torch.stack([torch.as_tensor(v, device=where).to(torch.long).reshape(()) for v in local])
    if group is not None:
        dist.all_reduce(values, op=dist.ReduceOp.MAX, group=group)
    return Agreement(*values.tolist())
