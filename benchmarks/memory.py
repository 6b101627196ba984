"""Peak memory of one forward+backward, and the activation memory kept for the backward.

For every runtime the benchmark times (``benchmarks/layer.py``), ``measure`` runs one extra,
untimed forward+backward and reports, in bytes above what was live before the step:

- ``peak``: the most memory live at any point of the forward+backward (weight gradients included).
- ``held``: what the forward leaves live for the backward (saved activations, the graph's other
  buffers and the output), read at the end of the forward.
- ``saved``: the tensors autograd saved for the backward (``torch.autograd.graph.saved_tensors_hooks``),
  counted once per storage, without parameters and the step's input; what a recomputing region
  (``torch.utils.checkpoint``) keeps through its own hooks is not in it, but it is in ``held``.

How ``peak`` and ``held`` are read (``method`` in the record): on CUDA from the caching allocator
(``torch.cuda.max_memory_allocated`` and ``memory_allocated``); on the CPU from the profiler's
memory events (``torch.profiler.profile(profile_memory=True)``: every allocation and free of
PyTorch's CPU allocator on the calling thread, summed in time order). The CPU figures are live
tensor bytes, not the process's resident memory (allocator slack and page faults are not in them).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.profiler import ProfilerActivity, profile, record_function

FORWARD_END = "memory/forward_end"
# a runtime's step: forward() -> what backward(out) takes
Forward = Callable[[], Any]
Backward = Callable[[Any], None]


def measure(forward: Forward, backward: Backward, device: torch.device,
            exclude: Iterable[Tensor] = ()) -> dict[str, Any]:
    """One forward+backward of a runtime, its memory in bytes (``peak``, ``held``, ``saved``; see the
    module) and ``method``. ``exclude``: tensors not counted in ``saved`` (parameters, the input)."""
    skip = {_storage(t) for t in exclude}
    saved: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        key = _storage(tensor)
        if key not in skip and not isinstance(tensor, torch.nn.Parameter):
            saved[key] = tensor.untyped_storage().nbytes()
        return tensor

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            out = forward()
        torch.cuda.synchronize(device)
        held = torch.cuda.memory_allocated(device) - start
        backward(out)
        del out
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - start
        return {"peak": peak, "held": held, "saved": sum(saved.values()), "method": "torch.cuda allocator"}
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            out = forward()
        with record_function(FORWARD_END):
            pass
        backward(out)
        del out
    peak, held = _live_bytes(prof)
    return {"peak": peak, "held": held, "saved": sum(saved.values()),
            "method": "profiler memory events (CPU allocator)"}


def _storage(tensor: Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def _live_bytes(prof: profile) -> tuple[int, int]:
    """``(peak, at FORWARD_END)`` of the live bytes of the profiled CPU allocations, from 0 at the start."""
    events = prof.profiler.kineto_results.events()
    marker = min((e.start_ns() for e in events if e.name() == FORWARD_END), default=None)
    memory = sorted((e.start_ns(), e.nbytes()) for e in events
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = held = 0
    for when, nbytes in memory:
        if marker is not None and when > marker and held == 0:
            held = live
        live += nbytes
        peak = max(peak, live)
    return peak, held if marker is not None and held else live


def step_of(layer: torch.nn.Module, x: Tensor) -> tuple[Forward, Backward]:
    """The layer benchmark's step (``y, aux = layer(x)[:2]``, loss ``y.sum() + aux``) as a forward
    and a backward for ``measure``."""
    def forward() -> Any:
        return layer(x)[:2]

    def backward(out: Any) -> None:
        y, aux_loss = out
        (y.sum() + aux_loss).backward()
    return forward, backward
