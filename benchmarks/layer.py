"""One configuration, measured side by side in one run: MoELayer forward+backward, its phase
breakdown, the floor (the expert matmuls alone at full capacity + raw ``all_to_all_single`` of
the same bytes), DeepSpeed's MoE on the same shape and DeepSpeed's AutoEP on a one-block Mixtral
of that shape (SwiGLU presets). Steps alternate round by round, so all see the same machine state.

    python -m benchmarks layer --preset mixtral-small --ranks 2
"""

from __future__ import annotations

import copy
import time
from typing import Any, Optional

import torch
import torch.distributed as dist
from tqdm import tqdm

from expert_parallel import MoELayer
from expert_parallel.comm import lookup
from expert_parallel.telemetry import PowerSampler

from . import gpu_checks
from .baselines import autoep_moe, deepspeed_moe
from .phases import phase_step
from .runtime import bench_device
from .shapes import RunSpec
from .timing import Clock, Step, alternate, slowest_rank, summarize


def _layer_step(layer: torch.nn.Module, x: torch.Tensor, device: torch.device) -> Step:
    """Forward and backward of a layer returning ``(y, aux_loss, ...)``; loss ``y.sum() + aux``."""
    def step() -> dict[str, float]:
        clock = Clock(device)
        clock.start()
        y, aux_loss = layer(x)[:2]
        clock.mark("forward")
        (y.sum() + aux_loss).backward()
        clock.mark("backward")
        return clock.read()
    return step


def _floor_step(spec: RunSpec, world: int, experts: torch.nn.Module, group: Any,
                device: torch.device) -> Step:
    """The floor: the batched expert matmuls (forward+backward) on a full ``[E_local, ep*C, D]``
    buffer, then 4 raw ``all_to_all_single`` of one ``[E, C, D]`` buffer (dispatch and return,
    forward and backward); no all-to-all when the EP group is one rank."""
    shape, ep = spec.shape, spec.ep_size or world
    rows = ep * spec.capacity()
    expert_in = torch.randn(shape.experts // ep, rows, shape.d_model, device=device, dtype=spec.torch_dtype,
                            requires_grad=True)
    send = torch.randn(shape.experts * spec.capacity() * shape.d_model, device=device, dtype=spec.torch_dtype)
    receive = torch.empty_like(send)

    def step() -> dict[str, float]:
        clock = Clock(device)
        clock.start()
        experts(expert_in).sum().backward()
        clock.mark("matmuls")
        if ep > 1:
            for _ in range(4):
                dist.all_to_all_single(receive, send, group=group)
        clock.mark("all_to_all")
        return clock.read()
    return step


def _copy_gbps(device: torch.device) -> float:
    """Memory bandwidth of a plain copy (GB/s read+write), for the cost model's calibration."""
    src = torch.empty(16 * 2**20, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(5):
        clock = Clock(device, sync_ranks=False)
        clock.start()
        dst.copy_(src)
        clock.mark("copy")
        best = min(best, clock.read()["copy"])
    return 2 * src.numel() * src.element_size() / (best * 1e-3) / 1e9


def measure(rank: int, world: int, spec: RunSpec, progress: bool = True) -> dict[str, Any]:
    """Build and time every step of ``spec`` on this rank; raw per-round samples come back."""
    device = bench_device()
    torch.manual_seed(spec.seed + rank)
    cfg = spec.config(world)
    layer = MoELayer(cfg).to(device, spec.torch_dtype)
    x = torch.randn(spec.shape.tokens, spec.shape.d_model, device=device, dtype=spec.torch_dtype,
                    requires_grad=True)
    modules: list[torch.nn.Module] = [layer]
    steps: dict[str, Step] = {"layer": _layer_step(layer, x, device)}
    if spec.phases:
        def timed_phases() -> dict[str, float]:
            clock = Clock(device)
            clock.start()
            phase_step(layer, x, clock)
            return clock.read()
        steps["phases"] = timed_phases
    floor_experts = copy.deepcopy(layer.experts)
    modules.append(floor_experts)
    steps["floor"] = _floor_step(spec, world, floor_experts, lookup(layer.ep_ranks), device)
    deepspeed_note = autoep_note = "disabled (--no-deepspeed)"
    if spec.deepspeed:
        reference, deepspeed_note = deepspeed_moe(spec, world, device)
        autoep, autoep_note = autoep_moe(spec, world, device)
        for name, module in (("deepspeed", reference), ("autoep", autoep)):
            if module is not None:
                modules.append(module)
                steps[name] = _layer_step(module, x, device)

    def drop_grads() -> None:
        for module in modules:
            module.zero_grad(set_to_none=True)
        x.grad = None

    rounds = tqdm(range(spec.warmup + spec.repeat), desc=f"{spec.preset} x{world}", leave=False,
                  disable=not progress or rank != 0)
    samples = alternate(steps, spec.warmup, spec.repeat, before_each=drop_grads, progress=rounds)
    telemetry = _energy(layer, x, spec, device, drop_grads)
    checks = {}
    if spec.gpu_checks:
        checks = {"sync_free_forward": gpu_checks.sync_free_forward(layer, x),
                  "cuda_graph_forward": gpu_checks.graph_capturable_forward(layer, x)}
    return {"samples": samples, "telemetry": telemetry, "gpu_checks": checks, "device": str(device),
            "deepspeed": deepspeed_note or "measured", "autoep": autoep_note or "measured",
            "copy_gbps": _copy_gbps(device), "backend": dist.get_backend() if dist.is_initialized() else None}


def _energy(layer: MoELayer, x: torch.Tensor, spec: RunSpec, device: torch.device, drop_grads) -> dict:
    """The layer alone, ``repeat`` steps back to back, under the power sampler."""
    sampler = PowerSampler(device.index if device.type == "cuda" else None)
    if not sampler.available:
        return sampler.summary().to_dict()
    step = _layer_step(layer, x, device)
    start = time.perf_counter()
    with sampler:
        for _ in range(spec.repeat):
            drop_grads()
            step()
    summary = sampler.summary(tokens=spec.repeat * spec.shape.tokens).to_dict()
    summary["steps"], summary["wall_s"] = spec.repeat, time.perf_counter() - start
    summary["joules_per_step"] = summary["energy_j"] / spec.repeat
    return summary


def reduce_ranks(per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """Per step and phase: the slowest rank per round, then median and spread over rounds;
    ``total`` per step is the slowest rank's sum of phases."""
    timings: dict[str, dict[str, dict[str, float]]] = {}
    for step in per_rank[0]["samples"]:
        phases = per_rank[0]["samples"][step]
        timings[step] = {phase: summarize(slowest_rank([r["samples"][step][phase] for r in per_rank]))
                         for phase in phases}
        sums = [[sum(values) for values in zip(*r["samples"][step].values())] for r in per_rank]
        timings[step]["total"] = summarize(slowest_rank(sums))
    return timings


def ratios(timings: dict[str, dict[str, dict[str, float]]]) -> dict[str, Optional[float]]:
    """Ours / floor, ours / DeepSpeed MoE, ours / DeepSpeed AutoEP and the phase-timed step's overhead,
    from medians (``None`` for a runtime not measured)."""
    med = {step: phases["total"]["median"] for step, phases in timings.items()}

    def over(other: str) -> Optional[float]:
        return med["layer"] / med[other] if other in med else None
    return {"ours_over_floor": over("floor"), "ours_over_deepspeed": over("deepspeed"),
            "ours_over_autoep": over("autoep"),
            "phases_over_layer": med["phases"] / med["layer"] if "phases" in med else None}


def excess_over_floor(timings: dict[str, dict[str, dict[str, float]]]) -> Optional[dict[str, float]]:
    """Where the time above the floor goes (medians, ms): local work, experts, all-to-alls."""
    if "phases" not in timings:
        return None
    phases = {name: value["median"] for name, value in timings["phases"].items()}
    floor = {name: value["median"] for name, value in timings["floor"].items()}

    def both(name: str) -> float:
        return phases.get(f"fwd/{name}", 0.0) + phases.get(f"bwd/{name}", 0.0)
    local = sum(both(n) for n in ("route", "plan", "pack", "combine")) + phases.get("fwd/output", 0.0) \
        + phases.get("bwd/rest", 0.0)
    return {"route+plan+pack+combine": local, "shared experts": both("shared"),
            "experts - floor matmuls": both("experts") - floor["matmuls"],
            "all-to-alls - raw all_to_all_single": both("dispatch") + both("return") - floor["all_to_all"]}


def targets(spec: RunSpec, world: int, device: str, found: dict[str, Optional[float]]) -> list[dict]:
    """The issue's performance targets that apply to this run, met or missed and by how much."""
    wanted = []
    if device == "cpu" and world == 2 and spec.dtype == "fp32" and spec.preset.endswith("-small"):
        wanted = [("ours <= 1.05 x floor (CPU, 2 gloo ranks, fp32)", "ours_over_floor", 1.05),
                  ("ours no slower than DeepSpeed MoE", "ours_over_deepspeed", 1.0)]
    elif device.startswith("cuda") and (spec.ep_size or world) == 1 and spec.dtype == "bf16":
        limit = {"mixtral": 1.08, "fine-grained": 1.5}.get(spec.preset)
        if limit is not None:
            wanted = [(f"fwd+bwd <= {limit} x floor ({spec.preset}, EP=1, bf16)", "ours_over_floor", limit)]
    out = []
    for text, key, limit in wanted:
        value = found.get(key)
        out.append({"target": text, "limit": limit, "measured": value,
                    "met": None if value is None else value <= limit,
                    "missed_by": None if value is None or value <= limit else value / limit - 1})
    return out


if __name__ == "__main__":  # ``python -m benchmarks.layer ...`` = ``python -m benchmarks layer ...``
    import sys

    from .cli import main
    main(["layer", *sys.argv[1:]])
