"""The two floors the layer is measured against, and the routing load they are sized from.

Each floor is the least work a layer of its kind must do, with nothing around it: the expert
math (forward+backward) on one contiguous buffer, then 4 raw ``all_to_all_single`` calls of one
static ``[E, C, D]`` buffer (dispatch and return, forward and backward; none when the EP group
is one rank). The wire carries the static buffers in both kinds of layer, so both floors send the
same bytes; they differ in the expert math:

- ``floor`` (padded floor): the batched matmuls over every slot, ``[E_local, R*C, D]``.
- ``floor_filled`` (filled floor): grouped GEMM (``StackedExperts.grouped``, ``torch._grouped_mm``)
  over exactly the filled rows of this rank's experts, from one forward of the layer on the
  benchmark's tokens (``routing_load``).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from expert_parallel import MoELayer
from expert_parallel.comm import exchange_fill
from expert_parallel.experts import StackedExperts

from .shapes import RunSpec
from .timing import Clock, Step


@torch.no_grad()
def routing_load(layer: MoELayer, x_SD: Tensor, group: Any) -> dict[str, Any]:
    """One forward of ``layer`` on ``x``: this rank's routing load, JSON-ready.

    Returns ``tokens_per_expert`` (this rank's choices per global expert, before capacity),
    ``capacity`` (C), ``dropped_fraction``, ``wire_bytes`` and ``padding_fraction`` (the
    ``RoutingStats`` of the dispatch this rank sends), and ``filled_rows`` ``[E_local]``: the rows each local
    expert computes here, the sum over the EP group's source ranks of ``min(count, C)`` for it
    (exchanged with ``comm.exchange_fill``, a collective: call it on every rank).
    """
    stats = layer(x_SD).stats
    fill_E = stats.tokens_per_expert.clamp(max=stats.capacity)
    fill_RL = exchange_fill(fill_E, layer.cfg.ep_size, group)
    return {"tokens_per_expert": stats.tokens_per_expert.tolist(), "capacity": int(stats.capacity),
            "dropped_fraction": float(stats.dropped_fraction), "wire_bytes": int(stats.wire_bytes),
            "padding_fraction": float(stats.padding_fraction), "filled_rows": fill_RL.sum(dim=0).tolist()}


class Matmuls(NamedTuple):
    """A floor's expert math: ``backward(forward())`` is one forward+backward; ``leaf`` is the input,
    whose ``grad`` is dropped between steps. ``benchmarks/memory.py`` measures the two halves."""

    forward: Callable[[], Tensor]
    backward: Callable[[Tensor], None]
    leaf: Tensor

    def __call__(self) -> None:
        self.backward(self.forward())


def floor_step(spec: RunSpec, world: int, matmuls: Callable[[], None], group: Any, device: torch.device) -> Step:
    """A floor: ``matmuls()`` (marked ``matmuls``), then 4 raw ``all_to_all_single`` of one
    ``[E, C, D]`` buffer (marked ``all_to_all``; nothing when the EP group is one rank)."""
    shape, ep = spec.shape, spec.ep_size or world
    send = torch.randn(shape.experts * spec.capacity() * shape.d_model, device=device, dtype=spec.torch_dtype)
    receive = torch.empty_like(send)

    def step() -> dict[str, float]:
        clock = Clock(device)
        clock.start()
        matmuls()
        clock.mark("matmuls")
        if ep > 1:
            for _ in range(4):
                dist.all_to_all_single(receive, send, group=group)
        clock.mark("all_to_all")
        return clock.read()
    return step


def padded_matmuls(spec: RunSpec, world: int, experts: StackedExperts, device: torch.device) -> Matmuls:
    """The padded floor's expert math: ``experts`` forward+backward on a full ``[E_local, R*C, D]``
    buffer."""
    shape, ep = spec.shape, spec.ep_size or world
    expert_in = torch.randn(shape.experts // ep, ep * spec.capacity(), shape.d_model, device=device,
                            dtype=spec.torch_dtype, requires_grad=True)
    return Matmuls(lambda: experts(expert_in), lambda out: out.sum().backward(), expert_in)


def filled_matmuls(spec: RunSpec, experts: StackedExperts, filled_rows: list[int], device: torch.device) -> Matmuls:
    """The filled floor's expert math: ``experts.grouped`` forward+backward on a contiguous
    ``[sum(filled_rows), D]`` input, ``filled_rows[l]`` rows through local expert ``l``."""
    rows_L = torch.tensor(filled_rows, dtype=torch.long, device=device)
    offsets_L = torch.cumsum(rows_L, 0).to(torch.int32)
    expert_M = torch.repeat_interleave(torch.arange(len(filled_rows), device=device), rows_L)
    rows_in = torch.randn(int(rows_L.sum()), spec.shape.d_model, device=device, dtype=spec.torch_dtype,
                          requires_grad=True)
    # a dense output gradient: torch._grouped_mm's backward rejects the stride-0 one of .sum()
    grad_out = torch.ones_like(rows_in)
    return Matmuls(lambda: experts.grouped(rows_in, offsets_L, expert_M), lambda out: out.backward(grad_out), rows_in)


def load_summary(per_rank: list[dict[str, Any]], ep_size: Optional[int] = None) -> Optional[dict[str, Any]]:
    """The realised load over the ranks' ``load`` records (``routing_load``): global
    ``tokens_per_expert`` (summed), its ``max_over_mean``, the mean ``dropped_fraction``, the
    filled rows per rank and ``filled_fraction``, the busiest rank's filled rows over its padded
    slots (``E_local * R * C``); ``wire_bytes_per_rank`` (one forward's dispatch, padding included;
    a training step moves 4x) and the mean ``padding_fraction`` of those bytes. ``None`` for
    records without a load (old runs)."""
    loads = [r.get("load") for r in per_rank]
    if not loads or any(load is None for load in loads):
        return None
    tokens_E = [sum(column) for column in zip(*(load["tokens_per_expert"] for load in loads))]
    rows = [sum(load["filled_rows"]) for load in loads]
    ep = ep_size or len(loads)
    slots = len(loads[0]["filled_rows"]) * ep * loads[0]["capacity"]
    mean = sum(tokens_E) / len(tokens_E)
    return {"tokens_per_expert": tokens_E, "max_over_mean": max(tokens_E) / mean if mean else None,
            "dropped_fraction": sum(load["dropped_fraction"] for load in loads) / len(loads),
            "filled_rows_per_rank": rows, "filled_fraction": max(rows) / slots if slots else None,
            "wire_bytes_per_rank": [load.get("wire_bytes") for load in loads],
            "padding_fraction": _mean([load.get("padding_fraction") for load in loads])}


def _mean(values: list[Optional[float]]) -> Optional[float]:
    """The mean, or ``None`` when a value is missing (runs from before the field)."""
    return None if None in values else sum(values) / len(values)
