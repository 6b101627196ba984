"""One configuration, measured side by side in one run: MoELayer forward+backward as configured
(filled expert compute where grouped GEMM runs) and a padded copy with the same weights (with
``spec.variants``: also a copy with ``recompute="experts"`` and ``torch.compile`` of the layer), the
phase breakdown, the two floors (``benchmarks/floors.py``: the expert math alone, over every slot
or over the filled rows only, + raw ``all_to_all_single`` of the static buffers), DeepSpeed's MoE
on the same shape and DeepSpeed's AutoEP on a one-block Mixtral of that shape (SwiGLU presets).
Steps alternate round by round, so all see the same machine state. After the timed rounds each
runtime runs one more, untimed forward+backward for its memory (``benchmarks/memory.py``).

    python -m benchmarks layer --preset mixtral-small --ranks 2
"""

from __future__ import annotations

import copy
import time
from typing import Any, NamedTuple, Optional

import torch
import torch.distributed as dist
from tqdm import tqdm

from expert_parallel import MoELayer
from expert_parallel.comm import lookup
from expert_parallel.telemetry import PowerSampler

from . import floors, gpu_checks, memory, skew
from .baselines import autoep_moe, deepspeed_moe
from .phases import phase_step
from .runtime import bench_device
from .shapes import RunSpec
from .timing import Clock, Step, alternate, slowest_rank, summarize


def _layer_step(layer: torch.nn.Module, x: torch.Tensor, device: torch.device) -> Step:
    """Forward and backward of a layer returning ``(y, aux_loss, ...)``; loss ``y.sum() + aux``
    (``memory.step_of``, the step whose memory is measured)."""
    forward, backward = memory.step_of(layer, x)

    def step() -> dict[str, float]:
        clock = Clock(device)
        clock.start()
        out = forward()
        clock.mark("forward")
        backward(out)
        clock.mark("backward")
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


def _tokens(spec: RunSpec, device: torch.device) -> torch.Tensor:
    """This rank's benchmark tokens ``[S, D]`` (from the global RNG; skewed when ``spec.skew``)."""
    x = torch.randn(spec.shape.tokens, spec.shape.d_model, device=device, dtype=spec.torch_dtype)
    return skew.skew_tokens(x, spec).requires_grad_()


def _variant(layer: MoELayer, device: torch.device, dtype: torch.dtype, **changes: Any) -> MoELayer:
    """``layer`` rebuilt with ``cfg.replace(**changes)`` and the same weights (built on meta, so
    no second init; the global RNG is not touched)."""
    with torch.device("meta"), torch.random.fork_rng(devices=[]):
        variant = MoELayer(layer.cfg.replace(**changes))
    variant = variant.to(dtype).to_empty(device=device)  # allocated once, in the final dtype
    variant.load_state_dict(layer.state_dict())
    if changes.get("expert_compute") == "padded" and variant.filled_compute:
        raise RuntimeError("expert_compute='padded' built a filled layer; the padded step would time the wrong path")
    return variant


class Ours(NamedTuple):
    """What ``_ours`` builds: the steps to alternate, the modules and input leaves whose gradients
    are dropped between steps, the layer as configured, the tokens and this rank's routing load."""

    steps: dict[str, Step]
    modules: list[torch.nn.Module]
    leaves: list[torch.Tensor]
    layer: MoELayer
    x: torch.Tensor
    load: dict[str, Any]
    memory: dict[str, tuple[memory.Forward, memory.Backward]]


def _ours(spec: RunSpec, world: int, device: torch.device) -> Ours:
    """Our layers, the floors and their steps (see ``Ours``); the global RNG seeds the layer and
    the tokens, as it did before there were more steps.

    Steps, in the order they alternate: ``layer`` (as configured: filled compute where grouped
    GEMM runs), ``layer_padded`` (the same weights, padded compute; only when ``layer`` is filled),
    with ``spec.variants`` ``layer_recompute`` (the same weights, ``recompute="experts"``) and
    ``layer_compiled`` (``torch.compile(layer)``: the same module), ``phases``, ``floor`` (padded
    floor), ``floor_filled`` (filled floor; only when ``layer`` is filled). ``leaves`` are the
    tensors whose gradients are dropped between steps; ``memory`` the steps whose memory is measured.
    """
    cfg = spec.config(world)
    layer = MoELayer(cfg).to(device, spec.torch_dtype)
    x = _tokens(spec, device)
    skew.set_router(layer.router.weight, spec)
    group = lookup(layer.ep_ranks)
    load = floors.routing_load(layer, x, group)
    modules: list[torch.nn.Module] = [layer]
    runtimes: dict[str, torch.nn.Module] = {"layer": layer}
    if layer.filled_compute:
        runtimes["layer_padded"] = _variant(layer, device, spec.torch_dtype, expert_compute="padded")
    if spec.variants:
        runtimes["layer_recompute"] = _variant(layer, device, spec.torch_dtype, recompute="experts")
        runtimes["layer_compiled"] = torch.compile(layer)
    modules += [module for name, module in runtimes.items() if name not in ("layer", "layer_compiled")]
    steps: dict[str, Step] = {name: _layer_step(module, x, device) for name, module in runtimes.items()}
    steps_memory = {name: memory.step_of(module, x) for name, module in runtimes.items()}
    if spec.phases:
        def timed_phases() -> dict[str, float]:
            clock = Clock(device)
            clock.start()
            phase_step(layer, x, clock)
            return clock.read()
        steps["phases"] = timed_phases
    floor_experts = copy.deepcopy(layer.experts)
    modules.append(floor_experts)
    matmuls = {"floor": floors.padded_matmuls(spec, world, floor_experts, device)}
    if layer.filled_compute:
        matmuls["floor_filled"] = floors.filled_matmuls(spec, floor_experts, load["filled_rows"], device)
    for name, floor in matmuls.items():
        steps[name] = floors.floor_step(spec, world, floor, group, device)
        steps_memory[name] = floor.forward, floor.backward
    return Ours(steps, modules, [x] + [floor.leaf for floor in matmuls.values()], layer, x, load, steps_memory)


def measure(rank: int, world: int, spec: RunSpec, progress: bool = True) -> dict[str, Any]:
    """Build and time every step of ``spec`` on this rank; raw per-round samples come back,
    with the routing load (``floors.routing_load``) and whether the layer ran filled compute."""
    device = bench_device()
    torch.manual_seed(spec.seed + rank)
    steps, modules, leaves, layer, x, load, steps_memory = _ours(spec, world, device)
    deepspeed_note = autoep_note = "disabled (--no-deepspeed)"
    if spec.deepspeed:
        reference, deepspeed_note = deepspeed_moe(spec, world, device)
        autoep, autoep_note = autoep_moe(spec, world, device) if spec.autoep else (None, "disabled (--no-autoep)")
        for name, module in (("deepspeed", reference), ("autoep", autoep)):
            if module is not None:
                modules.append(module)
                steps[name] = _layer_step(module, x, device)
                steps_memory[name] = memory.step_of(module, x)

    def drop_grads() -> None:
        for module in modules:
            module.zero_grad(set_to_none=True)
        for leaf in leaves:
            leaf.grad = None

    rounds = tqdm(range(spec.warmup + spec.repeat), desc=f"{spec.preset} x{world}", leave=False,
                  disable=not progress or rank != 0)
    samples = alternate(steps, spec.warmup, spec.repeat, before_each=drop_grads, progress=rounds)
    used = {}
    if spec.memory:
        exclude = [*leaves, *(p for module in modules for p in module.parameters())]
        for name, (forward, backward) in steps_memory.items():
            drop_grads()
            used[name] = memory.measure(forward, backward, device, exclude)
        drop_grads()
    telemetry = _energy(layer, x, spec, device, drop_grads)
    checks = {}
    if spec.gpu_checks:
        checks = {"sync_free_forward": gpu_checks.sync_free_forward(layer, x),
                  "cuda_graph_forward": gpu_checks.graph_capturable_forward(layer, x)}
    return {"samples": samples, "memory": used, "telemetry": telemetry, "gpu_checks": checks, "device": str(device),
            "deepspeed": deepspeed_note or "measured", "autoep": autoep_note or "measured",
            "filled_compute": layer.filled_compute, "load": load,
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


# ratio name -> (numerator step, denominator step); medians of the step totals
RATIOS = {"ours_over_floor": ("layer", "floor"), "ours_over_filled_floor": ("layer", "floor_filled"),
          "ours_padded_over_floor": ("layer_padded", "floor"), "ours_over_deepspeed": ("layer", "deepspeed"),
          "ours_over_autoep": ("layer", "autoep"), "filled_over_padded": ("layer", "layer_padded"),
          "phases_over_layer": ("phases", "layer"), "recompute_over_ours": ("layer_recompute", "layer"),
          "compiled_over_ours": ("layer_compiled", "layer")}
# memory ratio name -> (numerator step, denominator step, figure of benchmarks/memory.py)
MEMORY_RATIOS = {"ours_held_over_autoep": ("layer", "autoep", "held"),
                 "ours_peak_over_autoep": ("layer", "autoep", "peak"),
                 "ours_held_over_deepspeed": ("layer", "deepspeed", "held"),
                 "ours_peak_over_deepspeed": ("layer", "deepspeed", "peak"),
                 "recompute_held_over_ours": ("layer_recompute", "layer", "held"),
                 "recompute_peak_over_ours": ("layer_recompute", "layer", "peak")}
# runtime name in the capacity sweep -> its step
SWEPT = {"ours": "layer", "ours_padded": "layer_padded", "deepspeed": "deepspeed", "autoep": "autoep",
         "floor": "floor", "filled_floor": "floor_filled"}


def ratios(timings: dict[str, dict[str, dict[str, float]]]) -> dict[str, Optional[float]]:
    """The ``RATIOS`` from medians: ours (the layer as configured, filled on CPU fp32) over the padded
    floor, the filled floor, DeepSpeed's MoE and AutoEP, ours padded over the padded floor, filled
    over padded, and the phase-timed step's overhead (``None`` for a step not measured)."""
    med = {step: phases["total"]["median"] for step, phases in timings.items()}
    return {name: med[top] / med[bottom] if top in med and bottom in med else None
            for name, (top, bottom) in RATIOS.items()}


def reduce_memory(per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """Per runtime, the largest rank's ``peak``, ``held`` and ``saved`` bytes (``memory.measure``),
    and the ``method`` they were read with; ``{}`` when memory was not measured."""
    measured = per_rank[0].get("memory") or {}
    figures = ("peak", "held", "saved")
    out: dict[str, Any] = {name: {key: max(r["memory"][name][key] for r in per_rank) for key in figures}
                           for name in measured}
    if measured:
        out["method"] = next(iter(measured.values()))["method"]
    return out


def memory_ratios(used: dict[str, Any]) -> dict[str, Optional[float]]:
    """The ``MEMORY_RATIOS`` of ``reduce_memory``'s figures (``None`` where a runtime was not measured)."""
    return {name: used[top][key] / used[bottom][key] if top in used and bottom in used and used[bottom][key] else None
            for name, (top, bottom, key) in MEMORY_RATIOS.items()}


def excess_floor(timings: dict[str, Any]) -> str:
    """The floor the phases are held against: ``floor_filled`` where it ran (the layer computed the
    filled rows only), else the padded ``floor``."""
    return "floor_filled" if "floor_filled" in timings else "floor"


def excess_over_floor(timings: dict[str, dict[str, dict[str, float]]]) -> Optional[dict[str, float]]:
    """Where the time above the floor (``excess_floor``) goes (medians, ms): local work, experts,
    all-to-alls."""
    if "phases" not in timings:
        return None
    phases = {name: value["median"] for name, value in timings["phases"].items()}
    floor = {name: value["median"] for name, value in timings[excess_floor(timings)].items()}

    def both(name: str) -> float:
        return phases.get(f"fwd/{name}", 0.0) + phases.get(f"bwd/{name}", 0.0)
    local = sum(both(n) for n in ("route", "plan", "pack", "combine")) + phases.get("fwd/output", 0.0) \
        + phases.get("bwd/rest", 0.0)
    return {"route+plan+pack+combine": local, "shared experts": both("shared"),
            "experts - floor matmuls": both("experts") - floor["matmuls"],
            "all-to-alls - raw all_to_all_single": both("dispatch") + both("return") - floor["all_to_all"]}


def capacity_sweep(points: list[dict[str, Any]]) -> dict[str, Any]:
    """One preset's records at several capacity factors (``_run_layer`` records): the factors, the
    median step time of every ``SWEPT`` runtime at each (``None`` where not measured), and ``cost``,
    the time at the largest factor over the time at the smallest, ``<runtime>_cf<hi>_over_cf<lo>``
    (``ours_cf2_over_cf1`` for a 1.0 .. 2.0 sweep)."""
    factors = [p["config"]["capacity_factor"] for p in points]
    median_ms = {name: [p["timings_ms"].get(step, {}).get("total", {}).get("median") for p in points]
                 for name, step in SWEPT.items()}
    low, high = factors.index(min(factors)), factors.index(max(factors))
    cost = {f"{name}_cf{factors[high]:g}_over_cf{factors[low]:g}":
            ms[high] / ms[low] if ms[high] is not None and ms[low] else None for name, ms in median_ms.items()}
    return {"capacity_factors": factors, "median_ms": median_ms, "cost": cost}


def targets(spec: RunSpec, world: int, device: str, found: dict[str, Optional[float]]) -> list[dict]:
    """The performance targets that apply to this run and were measured in it (a ratio that is
    missing or ``None`` in ``found`` is left out), met or missed and by how much.

    CPU, 2 gloo ranks, fp32, ``*-small``: ours <= 0.90 x padded floor (at capacity factor 1.25),
    <= 1.10 x filled floor, <= 0.85 x DeepSpeed's MoE, <= 0.95 x AutoEP, and capacity factor
    1.0 -> 2.0 costs ours <= 10% more time (``capacity_sweep``'s ``ours_cf2_over_cf1``); memory: ours'
    activation memory (``held``) <= AutoEP's at capacity factor 1.25, and ``recompute="experts"``'s
    <= 0.6 x ours (``memory_ratios``, in ``found`` when measured). GPU,
    EP=1, bf16: mixtral <= 1.08 and fine-grained <= 1.5 x padded floor, and the goal <= 0.85 x
    padded floor for both.
    """
    wanted = []
    if device == "cpu" and world == 2 and spec.dtype == "fp32" and spec.preset.endswith("-small"):
        where = " (CPU, 2 gloo ranks, fp32)"
        wanted = [("ours <= 1.10 x filled floor" + where, "ours_over_filled_floor", 1.10),
                  ("ours <= 0.85 x DeepSpeed MoE" + where, "ours_over_deepspeed", 0.85),
                  ("ours <= 0.95 x DeepSpeed AutoEP" + where, "ours_over_autoep", 0.95),
                  ("capacity factor 1.0 -> 2.0 costs ours <= 10% more time" + where, "ours_cf2_over_cf1", 1.10)]
        wanted.append(("recompute='experts' activation memory <= 0.6 x ours" + where, "recompute_held_over_ours", 0.6))
        if spec.capacity_factor == 1.25:
            wanted.insert(0, ("ours <= 0.90 x padded floor at capacity factor 1.25" + where, "ours_over_floor", 0.90))
            wanted.append(("ours' activation memory <= AutoEP's at capacity factor 1.25" + where,
                           "ours_held_over_autoep", 1.0))
    elif device.startswith("cuda") and (spec.ep_size or world) == 1 and spec.dtype == "bf16":
        limit = {"mixtral": 1.08, "fine-grained": 1.5}.get(spec.preset)
        if limit is not None:
            where = f" ({spec.preset}, EP=1, bf16)"
            wanted = [(f"fwd+bwd <= {limit} x padded floor" + where, "ours_over_floor", limit),
                      ("goal: fwd+bwd <= 0.85 x padded floor" + where, "ours_over_floor", 0.85)]
    out = []
    for text, key, limit in wanted:
        value = found.get(key)
        if value is not None:
            out.append({"target": text, "limit": limit, "measured": value, "met": value <= limit,
                        "missed_by": None if value <= limit else value / limit - 1})
    return out

