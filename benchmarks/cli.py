"""``python -m benchmarks {layer,scaling,model,plot,presets}``: the benchmark suite's CLI."""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from typing import Any, Optional

import torch
from tqdm import tqdm

from expert_parallel import MoELayer

from . import layer as layer_bench
from . import results
from .floors import load_summary
from .runtime import launch, tune_malloc, under_torchrun, world_sizes
from .shapes import DTYPES, SHAPES, RunSpec, spec_from_args, weight_bytes

SMALL = [name for name in SHAPES if name.endswith("-small")]
FIGURES = ("phases", "compare", "memory", "sweep", "scaling", "model")


def _common(parser: argparse.ArgumentParser, presets_default: list[str]) -> None:
    parser.add_argument("--preset", nargs="+", default=presets_default, choices=sorted(SHAPES),
                        help=f"shape presets (default {' '.join(presets_default)})")
    parser.add_argument("--tokens", type=int, help="tokens per rank (default: the preset's)")
    parser.add_argument("--ep-size", type=int, help="expert-parallel size (default: all ranks)")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--capacity-factor", type=float, nargs="+", default=[1.25],
                        help="capacity factor; several values (layer only) run a capacity sweep: one run per "
                             "value, written together to sweep-<preset>-....json (default 1.25)")
    parser.add_argument("--skew", type=float, default=0.0, metavar="ALPHA",
                        help="skew every runtime's router so expert i gets ~1/(i+1)^ALPHA of the tokens "
                             "(Zipf-like, as early in training); 0 = unskewed (default)")
    parser.add_argument("--second-policy", default="all", help="GShard 2nd-expert policy (all: fixed load)")
    parser.add_argument("--agree-capacity", action="store_true",
                        help="derive the capacity per batch (one all-reduce) instead of fixing it")
    parser.add_argument("--num-chunks", type=int, default=1,
                        help="split the capacity into chunks whose all-to-alls overlap the expert compute "
                             "(MoEConfig.num_chunks; default 1: no overlap)")
    parser.add_argument("--a2a", default="flat", choices=("flat", "hierarchical"),
                        help="the layer's all-to-all: flat, or hierarchical (within nodes, then across)")
    parser.add_argument("--ranks-per-node", type=int,
                        help="ranks per node for --a2a hierarchical (default: the launcher's LOCAL_WORLD_SIZE)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--threads-per-rank", type=int, default=1, help="torch threads per spawned rank")
    parser.add_argument("--no-phases", action="store_true", help="skip the phase breakdown")
    parser.add_argument("--no-deepspeed", action="store_true", help="skip DeepSpeed's MoE and AutoEP")
    parser.add_argument("--no-autoep", action="store_true", help="skip DeepSpeed's AutoEP (DeepSpeed's MoE still runs)")
    parser.add_argument("--variants", action="store_true",
                        help="also time our layer with recompute='experts' and under torch.compile (same weights)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    parser.add_argument("--no-gpu-checks", action="store_true", help="skip the host-sync / CUDA graph checks")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="results folder (default benchmarks/results)")
    parser.add_argument("--malloc-tuning", action="store_true",
                        help="keep freed memory in glibc's heap in the spawned ranks (both runtimes; see "
                             "docs/benchmarks.md)")
    parser.add_argument("--dry-run", action="store_true",
                        help="build the configs (and the layer on the meta device) without running")


def _dry_run(spec: RunSpec, world: int) -> None:
    cfg = spec.config(world) if world > 1 else replace(spec, ep_size=1).config(1)
    with torch.device("meta"):
        layer = MoELayer(cfg.replace(ep_size=1)) if cfg.ep_size == 1 else None
    print(f"{spec.preset}: {cfg.num_experts} experts (k={cfg.num_choices}, {cfg.expert}), d_model={cfg.d_model}, "
          f"d_ff={cfg.d_ff}, {spec.shape.tokens} tokens/rank, capacity={spec.capacity()}, ep_size={cfg.ep_size}; "
          f"per rank: expert weights {weight_bytes(spec, world) / 2**30:.2f} GiB, all-to-all "
          f"{spec.a2a_bytes() / 2**20:.1f} MiB, expert fwd+bwd {spec.expert_flops(world) / 1e12:.2f} TFLOP"
          + (f", capacity factor {spec.capacity_factor:g}" + (f", skew {spec.skew:g}" if spec.skew else ""))
          + ("; layer built on meta" if layer is not None else ""))


def _run_layer(spec: RunSpec, ranks: int, threads: int, progress: bool = True) -> Optional[dict[str, Any]]:
    """Measure one spec on ``ranks`` ranks; the JSON-ready record (on rank 0) or None."""
    per_rank = launch(layer_bench.measure, ranks, spec, progress, threads_per_rank=threads)
    if per_rank is None:
        return None
    world = len(per_rank)
    timings = layer_bench.reduce_ranks(per_rank)
    found = layer_bench.ratios(timings)
    used = layer_bench.reduce_memory(per_rank)
    memory_found = layer_bench.memory_ratios(used)
    first = per_rank[0]
    return {"config": {**spec.describe(), "ranks": world, "threads_per_rank": threads,
                       "backend": first["backend"], "device": first["device"],
                       "filled_compute": first["filled_compute"]},
            "timings_ms": timings, "ratios": found, "memory_bytes": used, "memory_ratios": memory_found,
            "load": load_summary(per_rank, spec.ep_size),
            "excess_over_floor_ms": layer_bench.excess_over_floor(timings),
            "excess_over": layer_bench.excess_floor(timings),
            "targets": layer_bench.targets(spec, world, first["device"], {**found, **memory_found}),
            "deepspeed": first["deepspeed"], "autoep": first["autoep"], "gpu_checks": first["gpu_checks"],
            "telemetry": [r["telemetry"] for r in per_rank], "copy_gbps": first["copy_gbps"]}


def _print_targets(targets: list[dict[str, Any]]) -> None:
    for target in targets:
        verdict = "met" if target["met"] else f"MISSED by {100 * (target['missed_by'] or 0):.1f}%"
        print(f"  target {target['target']}: {target['measured']:.3f} -> {verdict}")


def _print_layer(record: dict[str, Any]) -> None:
    cfg, timings, found, load = record["config"], record["timings_ms"], record["ratios"], record["load"]
    print(f"\n{cfg['preset']}: {cfg['ranks']} rank(s) ({cfg['backend']}, {cfg['device']}), {cfg['dtype']}, "
          f"{cfg['shape']['tokens']} tokens/rank, capacity factor {cfg['capacity_factor']:g} (capacity "
          f"{cfg['capacity']}), skew {cfg['skew']:g}, ours = {'filled' if cfg['filled_compute'] else 'padded'}, "
          f"{cfg['num_chunks']} chunk(s), {cfg['a2a']} all-to-all")
    if load:
        print(f"  load: max/mean {load['max_over_mean']:.2f}, dropped {100 * load['dropped_fraction']:.1f}%, filled "
              f"rows per rank {load['filled_rows_per_rank']} ({100 * load['filled_fraction']:.0f}% of the slots); "
              f"dispatch sends {load['wire_bytes_per_rank'][0] / 2**20:.2f} MiB/rank, "
              f"{100 * load['padding_fraction']:.0f}% padding")
    for step, phases in timings.items():
        parts = "  ".join(f"{name} {value['median']:.2f}" for name, value in phases.items() if name != "total")
        total = phases["total"]
        print(f"  {step:12} {total['median']:9.2f} ms  [p25 {total['p25']:.2f}, p75 {total['p75']:.2f}]  {parts}")
    print("  " + "  ".join(f"{k} {v:.3f}" for k, v in found.items() if v is not None))
    used = record.get("memory_bytes") or {}
    if used:
        print(f"  memory (MiB; peak / held for the backward / saved by autograd; {used['method']}): " + ", ".join(
            f"{name} {m['peak'] / 2**20:.1f} / {m['held'] / 2**20:.1f} / {m['saved'] / 2**20:.1f}"
            for name, m in used.items() if name != "method"))
        print("  " + "  ".join(f"{k} {v:.3f}" for k, v in record["memory_ratios"].items() if v is not None))
    if record["excess_over_floor_ms"]:
        print(f"  above {record['excess_over']} (ms): " + ", ".join(
            f"{k} {v:.2f}" for k, v in record["excess_over_floor_ms"].items()))
    _print_targets(record["targets"])
    print(f"  deepspeed: {record['deepspeed']}; autoep: {record['autoep']}")


def _tag(name: str, spec: RunSpec, record: dict[str, Any]) -> str:
    """``<preset>-r<ranks>-<dtype>-<device>[-skew<alpha>][-chunks<n>][-hier<ranks per node>]``: the
    results file's name."""
    tag = f"{name}-r{record['config']['ranks']}-{spec.dtype}-{record['config']['device'].split(':')[0]}"
    tag += f"-skew{spec.skew:g}" if spec.skew else ""
    tag += f"-chunks{spec.num_chunks}" if spec.num_chunks > 1 else ""
    return tag + (f"-hier{spec.ranks_per_node or 'local'}" if spec.a2a == "hierarchical" else "")


def _sweep(name: str, specs: list[RunSpec], points: list[dict[str, Any]], out: Optional[str]) -> None:
    """Write and print one preset's capacity sweep (``layer.capacity_sweep``, its targets, the runs)."""
    first = points[0]["config"]
    summary = layer_bench.capacity_sweep(points)
    summary["targets"] = layer_bench.targets(specs[0], first["ranks"], first["device"], summary["cost"])
    factors = "".join(f"{f:>9g}" for f in summary["capacity_factors"])
    print(f"\n{name}: capacity sweep, median ms at capacity factor {factors}")
    for (runtime, ms), (key, ratio) in zip(summary["median_ms"].items(), summary["cost"].items()):
        if any(m is not None for m in ms):
            print(f"  {runtime:12}" + "".join("        -" if m is None else f"{m:9.2f}" for m in ms)
                  + ("" if ratio is None else f"   {key} {ratio:.3f}"))
    _print_targets(summary["targets"])
    print(f"  -> {results.write('sweep', _tag(name, specs[0], points[0]), {**summary, 'points': points}, out)}")


def cmd_layer(args: argparse.Namespace) -> None:
    """One run per preset, and per capacity factor: several factors make a sweep, one file per preset."""
    for name in args.preset:
        specs = [spec_from_args(args, name, capacity_factor=factor) for factor in args.capacity_factor]
        if args.dry_run:
            for spec in specs:
                _dry_run(spec, args.ranks)
            continue
        points = []
        for spec in specs:
            record = _run_layer(spec, args.ranks, args.threads_per_rank)
            if record is not None:
                _print_layer(record)
                points.append(record)
                if len(specs) == 1:
                    print(f"  -> {results.write('layer', _tag(name, spec, record), record, args.out)}")
        if len(specs) > 1 and points:
            _sweep(name, specs, points, args.out)


def cmd_scaling(args: argparse.Namespace) -> None:
    """Weak (tokens per rank fixed) or strong (global tokens fixed) scaling over rank counts."""
    if len(args.capacity_factor) > 1:
        raise ValueError(f"scaling takes one --capacity-factor, got {args.capacity_factor}; sweep capacity "
                         "factors with `python -m benchmarks layer --capacity-factor ...`")
    for name in args.preset:
        base = spec_from_args(args, name)
        tag = f"{args.mode}-{name}-{base.dtype}"
        previous = results.load_dir("scaling", args.out)
        points = [p for r in previous if r["name"] == tag and under_torchrun() for p in r["points"]]
        global_tokens = args.global_tokens or base.shape.tokens * max(args.ranks_list)
        sizes = world_sizes(args.ranks_list)
        for ranks in tqdm(sizes, desc=f"{args.mode} scaling {name}", disable=len(sizes) == 1):
            tokens = base.shape.tokens if args.mode == "weak" else global_tokens // ranks
            spec = replace(base, shape=replace(base.shape, tokens=tokens), ep_size=None)
            if args.dry_run:
                _dry_run(spec, ranks)
                continue
            record = _run_layer(spec, ranks, args.threads_per_rank, progress=False)
            if record is not None:
                points = [p for p in points if p["config"]["ranks"] != record["config"]["ranks"]] + [record]
        if points and not args.dry_run:
            points.sort(key=lambda p: p["config"]["ranks"])
            path = results.write("scaling", tag, {"mode": args.mode, "global_tokens": global_tokens,
                                                  "points": points}, args.out)
            for p in points:
                print(f"  {p['config']['ranks']} rank(s), {p['config']['shape']['tokens']} tokens/rank: "
                      f"layer {p['timings_ms']['layer']['total']['median']:.2f} ms, floor "
                      f"{p['timings_ms']['floor']['total']['median']:.2f} ms, "
                      f"ours/floor {p['ratios']['ours_over_floor']:.3f}")
            print(f"  -> {path}")


def cmd_model(args: argparse.Namespace) -> None:
    from . import costmodel
    costmodel.main(args)


def cmd_plot(args: argparse.Namespace) -> None:
    from . import plots
    for path in plots.plot_all(args.out, args.figures):
        print(path)


def cmd_presets(args: argparse.Namespace) -> None:
    for name, shape in SHAPES.items():
        print(f"{name:20} d_model={shape.d_model} d_ff={shape.d_ff} experts={shape.experts} "
              f"k={shape.top_k} expert={shape.expert} tokens/rank={shape.tokens}")


def parser() -> argparse.ArgumentParser:
    """The CLI's parser (subcommands ``layer``, ``scaling``, ``model``, ``plot``, ``presets``)."""
    root = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    sub = root.add_subparsers(dest="command", required=True)
    layer = sub.add_parser("layer", help="ours vs floor vs DeepSpeed, with the phase breakdown")
    _common(layer, SMALL)
    layer.add_argument("--ranks", type=int, default=2, help="spawned gloo ranks (ignored under torchrun)")
    layer.set_defaults(fn=cmd_layer)
    scaling = sub.add_parser("scaling", help="weak or strong scaling over rank counts")
    _common(scaling, ["mixtral-small"])
    scaling.add_argument("--mode", choices=("weak", "strong"), default="weak")
    scaling.add_argument("--ranks-list", type=int, nargs="+", default=[1, 2, 4])
    scaling.add_argument("--global-tokens", type=int, help="strong scaling: tokens over all ranks")
    scaling.set_defaults(fn=cmd_scaling, no_phases=True)
    model = sub.add_parser("model", help="alpha-beta cost model: calibrate on results, predict 8-1024 GPUs")
    from .costmodel import add_arguments
    add_arguments(model)
    model.set_defaults(fn=cmd_model)
    plot = sub.add_parser("plot", help="PNG plots of the results")
    plot.add_argument("--out", help="results folder (default benchmarks/results)")
    plot.add_argument("--figures", nargs="+", default=list(FIGURES), choices=FIGURES)
    plot.set_defaults(fn=cmd_plot)
    presets = sub.add_parser("presets", help="list the shape presets")
    presets.set_defaults(fn=cmd_presets)
    return root


def main(argv: Optional[list[str]] = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parser().parse_args(argv)
    if getattr(args, "malloc_tuning", False):
        tune_malloc()
    args.fn(args)
