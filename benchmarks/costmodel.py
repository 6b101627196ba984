"""An alpha-beta (latency/bandwidth) model of one MoE layer's forward+backward step.

    t_step = t_experts + 4 * t_all_to_all + t_local
    t_experts    = expert FLOPs at full capacity / sustained FLOP rate
    t_all_to_all = max(a_intra * p_intra + b * p_intra / (R * B_intra),
                       a_inter * p_inter + b * p_inter / (R * B_inter))
                   b bytes of the [E, C, D] buffer per rank, R the EP size, p_intra = min(R, g) - 1
                   peers on the same node (g GPUs per node), p_inter = R - min(R, g) on other nodes
    t_local      = passes * S * k * D * bytes / memory bandwidth   (route, plan, pack, combine)

Efficiency is ``t_experts / t_step``: the share of the step spent in expert math. The model has no
overlap of communication with compute (the layer has none) and leaves out the data-parallel
gradient all-reduce. ``calibrate`` fits ``a`` and ``B`` to the raw all-to-alls, the FLOP rate to the
floor's matmuls and ``passes`` to the measured local phases of ``benchmarks/results`` runs, and
reports how well the calibrated model predicts those runs; ``predict`` then projects 8 to 1024
GPUs with the hardware figures given on the command line.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import asdict, dataclass, replace
from typing import Any, Optional

import numpy as np

from . import results
from .shapes import SHAPES, RunSpec, Shape

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}

# Published step times with stated shapes that this model could be checked against. We list none:
# the DeepSpeed-MoE (Rajbhandari et al. 2022), Tutel (Hwang et al. 2023) and GShard (Lepikhin et al.
# 2021) papers report speedups over their baselines, end-to-end throughput and training days,
# and we could not recall a per-layer step time with its full shape (tokens per GPU, d_model,
# d_ff, experts, k, capacity factor, link bandwidth) with confidence. Add entries here as
# {"source", "where", "shape", "gpus", "step_ms"} when they are checked against the papers.
PUBLISHED: list[dict[str, Any]] = []


@dataclass(frozen=True)
class Cluster:
    """Hardware figures. Defaults: H100 SXM nodes of 8 GPUs, NVLink 4 (450 GB/s per direction),
    one 400 Gb/s NIC per GPU (50 GB/s), dense bf16 989 TFLOP/s at 60% sustained, HBM3 3.35 TB/s;
    the latencies are assumptions, not measurements."""

    gpus_per_node: int = 8
    intra_alpha_s: float = 5e-6
    intra_bytes_per_s: float = 450e9
    inter_alpha_s: float = 10e-6
    inter_bytes_per_s: float = 50e9
    flops_per_s: float = 989e12 * 0.6
    memory_bytes_per_s: float = 3.35e12
    local_passes: float = 12.0


def all_to_all_s(buffer_bytes: float, ep: int, cluster: Cluster) -> float:
    """Seconds for one equal-split all-to-all of ``buffer_bytes`` per rank over ``ep`` ranks."""
    if ep <= 1:
        return 0.0
    chunk = buffer_bytes / ep
    intra = min(ep, cluster.gpus_per_node) - 1
    inter = ep - 1 - intra
    t_intra = intra * (cluster.intra_alpha_s + chunk / cluster.intra_bytes_per_s)
    t_inter = inter * (cluster.inter_alpha_s + chunk / cluster.inter_bytes_per_s) if inter else 0.0
    return max(t_intra, t_inter)


def step_s(spec: RunSpec, ep: int, cluster: Cluster) -> dict[str, float]:
    """Predicted seconds of one forward+backward per phase group, plus ``step`` and ``efficiency``."""
    shape = spec.shape
    experts = spec.expert_flops(ep) / cluster.flops_per_s
    a2a = 4 * all_to_all_s(spec.a2a_bytes(), ep, cluster)
    local = cluster.local_passes * shape.tokens * shape.top_k * shape.d_model * BYTES[spec.dtype] \
        / cluster.memory_bytes_per_s
    step = experts + a2a + local
    return {"expert_math": experts, "all_to_all": a2a, "local": local, "step": step,
            "floor": experts + a2a, "efficiency": experts / step}


def _point_spec(point: dict[str, Any]) -> RunSpec:
    cfg = point["config"]
    shape = Shape(**cfg["shape"])
    return RunSpec(preset=cfg["preset"], shape=shape, dtype=cfg["dtype"], ep_size=cfg["ep_size"] or cfg["ranks"],
                   capacity_factor=cfg["capacity_factor"])


def _points(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The measured runs to calibrate on: layer and scaling points with even routing (the model
    assumes it; ``--skew`` runs are left out)."""
    out = []
    for record in records:
        out.extend(record.get("points", [record]) if record["kind"] in ("scaling", "layer") else [])
    return [point for point in out if not point["config"].get("skew")]


def calibrate(records: list[dict[str, Any]], base: Cluster) -> tuple[Cluster, list[dict[str, Any]]]:
    """Fit the model to measured runs (one node: only the intra link); returns the calibrated
    cluster and, per run, measured vs predicted step time."""
    points = _points(records)
    if not points:
        raise ValueError("no layer or scaling results to calibrate on; run `python -m benchmarks layer` first")
    rows, times = [], []
    flops = matmul_s = local_s = moved = 0.0
    bandwidths = []
    for point in points:
        spec, floor = _point_spec(point), point["timings_ms"]["floor"]
        ep = spec.ep_size
        flops += spec.expert_flops(ep)
        matmul_s += floor["matmuls"]["median"] * 1e-3
        bandwidths.append(point.get("copy_gbps", 10.0) * 1e9)
        if ep > 1:
            rows.append([ep - 1, (ep - 1) * spec.a2a_bytes() / ep])
            times.append(floor["all_to_all"]["median"] * 1e-3 / 4)
        local = (point.get("excess_over_floor_ms") or {}).get("route+plan+pack+combine")
        if local is not None:  # passes over the [S*k, D] rows at the measured copy bandwidth
            local_s += local * 1e-3 * bandwidths[-1]
            moved += spec.shape.tokens * spec.shape.top_k * spec.shape.d_model * BYTES[spec.dtype]
    # ratios of sums: the big runs, where the time is, weigh most
    fitted = replace(base, gpus_per_node=max(p["config"]["ranks"] for p in points), flops_per_s=flops / matmul_s,
                     memory_bytes_per_s=statistics.median(bandwidths),
                     local_passes=local_s / moved if moved else base.local_passes)
    if rows:
        solution = np.linalg.lstsq(np.array(rows, dtype=float), np.array(times), rcond=None)[0]
        alpha, inverse_bw = max(solution[0], 0.0), max(solution[1], 1e-15)
        fitted = replace(fitted, intra_alpha_s=alpha, intra_bytes_per_s=1 / inverse_bw)
    checks = []
    for point in points:
        spec = _point_spec(point)
        predicted = step_s(spec, spec.ep_size, fitted)["step"] * 1e3
        measured = point["timings_ms"]["layer"]["total"]["median"]
        checks.append({"preset": spec.preset, "ranks": point["config"]["ranks"], "tokens": spec.shape.tokens,
                       "measured_ms": measured, "predicted_ms": predicted, "error": predicted / measured - 1})
    return fitted, checks


def predict(presets: list[str], gpus: list[int], cluster: Cluster, dtype: str,
            tokens: Optional[int], experts_per_gpu: Optional[int]) -> list[dict[str, Any]]:
    """Weak-scaling predictions: tokens per GPU fixed; EP = min(GPUs, experts), or with
    ``experts_per_gpu`` the expert count grows with the GPUs (GShard style) and EP = GPUs."""
    rows = []
    for name in presets:
        shape = SHAPES[name] if tokens is None else replace(SHAPES[name], tokens=tokens)
        for count in gpus:
            grown = replace(shape, experts=count * experts_per_gpu) if experts_per_gpu else shape
            ep = count if experts_per_gpu else min(count, shape.experts)
            spec = RunSpec(preset=name, shape=grown, dtype=dtype, ep_size=ep)
            rows.append({"preset": name, "gpus": count, "ep_size": ep, "experts": grown.experts,
                         **{k: v * 1e3 if k != "efficiency" else v for k, v in step_s(spec, ep, cluster).items()}})
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``model`` subcommand's flags."""
    defaults = Cluster()
    parser.add_argument("--calibrate", nargs="*", help="result JSON files (default: all layer/scaling results)")
    parser.add_argument("--preset", nargs="+", default=["mixtral", "fine-grained", "switch"], choices=sorted(SHAPES))
    parser.add_argument("--gpus", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256, 512, 1024])
    parser.add_argument("--gpus-per-node", type=int, default=defaults.gpus_per_node)
    parser.add_argument("--nvlink-gbps", type=float, default=defaults.intra_bytes_per_s / 1e9,
                        help="intra-node GB/s per GPU per direction")
    parser.add_argument("--inter-gbps", type=float, default=defaults.inter_bytes_per_s / 1e9,
                        help="inter-node GB/s per GPU per direction")
    parser.add_argument("--tflops", type=float, default=defaults.flops_per_s / 1e12,
                        help="sustained expert-matmul TFLOP/s per GPU")
    parser.add_argument("--hbm-gbps", type=float, default=defaults.memory_bytes_per_s / 1e9)
    parser.add_argument("--local-passes", type=float,
                        help="passes over the [S*k, D] rows for route/plan/pack/combine (default: calibrated)")
    parser.add_argument("--dtype", default="bf16", choices=sorted(BYTES))
    parser.add_argument("--tokens", type=int, help="tokens per GPU (default: the preset's)")
    parser.add_argument("--experts-per-gpu", type=int, help="grow the experts with the GPUs (GShard style)")
    parser.add_argument("--out", help="results folder (default benchmarks/results)")


def main(args: argparse.Namespace) -> None:
    """Calibrate on the CPU results, then predict the GPU cluster given by the flags."""
    records = results.load(args.calibrate) if args.calibrate else (
        results.load_dir("layer", args.out) + results.load_dir("scaling", args.out))
    fitted, checks = calibrate(records, Cluster())
    print("calibrated on the measured runs (one node):", {k: f"{v:.3g}" for k, v in asdict(fitted).items()})
    for check in checks:
        print(f"  {check['preset']:20} {check['ranks']} rank(s) {check['tokens']:6} tok: measured "
              f"{check['measured_ms']:8.2f} ms, model {check['predicted_ms']:8.2f} ms ({100 * check['error']:+.0f}%)")
    gpu = Cluster(gpus_per_node=args.gpus_per_node, intra_bytes_per_s=args.nvlink_gbps * 1e9,
                  inter_bytes_per_s=args.inter_gbps * 1e9, flops_per_s=args.tflops * 1e12,
                  memory_bytes_per_s=args.hbm_gbps * 1e9,
                  local_passes=args.local_passes or fitted.local_passes)
    rows = predict(args.preset, args.gpus, gpu, args.dtype, args.tokens, None)
    grown = predict(["switch"], args.gpus, gpu, args.dtype, args.tokens, args.experts_per_gpu or 1)
    for row in rows + grown:
        print(f"  {row['preset']:14} {row['gpus']:5} GPUs EP {row['ep_size']:4} E {row['experts']:5}: step "
              f"{row['step']:7.2f} ms (experts {row['expert_math']:.2f}, "
              f"a2a {row['all_to_all']:.2f}, local {row['local']:.2f}), efficiency {row['efficiency']:.2f}")
    path = results.write("model", f"{args.dtype}", {
        "calibrated_cpu": asdict(fitted), "calibration_checks": checks, "gpu_cluster": asdict(gpu),
        "predictions": rows, "predictions_experts_per_gpu": grown, "published": PUBLISHED,
        "published_note": "no published per-layer step time with a fully stated shape was used; see "
                          "PUBLISHED in benchmarks/costmodel.py"}, args.out)
    print(f"  -> {path}")
