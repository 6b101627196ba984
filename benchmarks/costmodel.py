"""An alpha-beta (latency/bandwidth) model of one MoE layer's forward+backward step.

    t_step = t_fwd + t_bwd + t_local
    t_pass = d + x + r + (n - 1) * max(d + r, x)          (n chunks; n = 1: d + x + r, no overlap)
             d = r = t_a2a(b / n): one chunk's dispatch (return) of the [E, C, D] buffer (b bytes
             per rank, padding included), x = the pass's expert time / n (the forward a third of
             t_experts, the backward two thirds)
    t_a2a    flat:         max over links of  alpha_l + p_l * peer + p_l * (b / R) / B_l
                           p_intra = min(R, g) - 1 peers on the node (g GPUs per node),
                           p_inter = R - min(R, g) on other nodes; the links run concurrently
             hierarchical: alpha_intra + (g - 1) peer + (g - 1) (b / g) / B_intra     (on the node)
                         + alpha_inter + (N - 1) peer + (N - 1) (b / N) / B_inter     (N = R / g nodes)
    t_experts = FLOPs of the filled rows (min(E C, k S) per rank; E C padded) / sustained FLOP/s
    t_local   = passes * S * k * D * bytes / memory bandwidth   (route, plan, pack, combine)

Chunking pipelines each pass over ``n`` slices of the buffer: the all-to-all of one chunk runs
while the experts compute another, but every chunk pays the all-to-all's latencies again, so
``best_chunks`` is an argmin. Hierarchical sends the same bytes across nodes as flat (the static
buffer is not deduplicated per node) in ``N - 1`` messages instead of ``R - g``, at the price of a
first stage on NVLink; with one node it is the flat all-to-all. The constants come from named
``CLUSTERS``: ``h800-deepep`` is fitted to DeepEP's published tables (``benchmarks/published.py``),
``h100-8x400g`` takes the H100's figures at the efficiency DeepEP reaches on the H800.
``calibrate`` fits the curve's shape (latency, bandwidth, FLOP rate, local passes) to our CPU runs
in ``benchmarks/results``. Left out: the data-parallel gradient all-reduce, shared experts,
attention, and any skew (even routing).
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Optional

import numpy as np

from . import published, results
from .shapes import SHAPES, RunSpec, Shape

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
A2A = ("flat", "hierarchical")
CHUNKS = (1, 2, 4, 8, 16, 32)


@dataclass(frozen=True)
class Cluster:
    """Hardware constants per GPU (SI units). ``*_alpha_s``: fixed latency of one all-to-all
    stage on the link; ``peer_s``: cost of each peer message; ``*_bytes_per_s``: bandwidth per
    direction; ``flops_per_s``: sustained expert-matmul rate; ``local_passes``: passes over the
    ``[S*k, D]`` rows of route/plan/pack/combine at ``memory_bytes_per_s``."""

    gpus_per_node: int = 8
    intra_alpha_s: float = 10e-6
    intra_bytes_per_s: float = 160e9
    inter_alpha_s: float = 10e-6
    inter_bytes_per_s: float = 50e9
    peer_s: float = 0.5e-6
    flops_per_s: float = 989e12 * 0.6
    memory_bytes_per_s: float = 3.35e12
    local_passes: float = 12.0


def _clusters() -> dict[str, Cluster]:
    """``h800``: the H800's stated figures (NVLink ~160 GB/s, one 400 Gb/s NIC ~50 GB/s per GPU,
    dense BF16 989 TFLOP/s at 60%, HBM3 3.35 TB/s) with assumed latencies; ``h800-deepep``: its
    latencies fitted to DeepEP's low-latency table, then its bandwidths to the normal-kernel
    table; ``h100-8x400g``: H100 SXM (NVLink 450 GB/s, 400 Gb/s NIC, same FLOP/s and HBM) at
    ``h800-deepep``'s latencies and its fitted/stated bandwidth ratios."""
    h800 = Cluster()
    rows = published.published_rows()
    latencies = published.fit([r for r in rows if r["table"] == "low-latency"], h800,
                              ("intra_alpha", "inter_alpha", "peer", "intra_s_per_byte", "inter_s_per_byte"))
    deepep = published.fit([r for r in rows if r["table"] == "normal"], latencies,
                           ("intra_s_per_byte", "inter_s_per_byte"))
    deepep = replace(deepep, **{f.name: float(getattr(deepep, f.name)) for f in fields(Cluster)
                                if f.type == "float"})
    h100 = replace(deepep, intra_bytes_per_s=450e9 * deepep.intra_bytes_per_s / h800.intra_bytes_per_s)
    return {"h800": h800, "h800-deepep": deepep, "h100-8x400g": h100}


CLUSTERS = _clusters()


def parse_cluster(text: str) -> Cluster:
    """``"NAME"``, ``"NAME,key=value,..."`` or ``"key=value,..."`` (on ``h100-8x400g``): a preset
    of ``CLUSTERS`` with ``Cluster`` fields overridden, e.g. ``h800-deepep,inter_bytes_per_s=25e9``."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    base = CLUSTERS["h100-8x400g"]
    if parts and "=" not in parts[0]:
        if parts[0] not in CLUSTERS:
            raise ValueError(f"--cluster {parts[0]!r} is unknown; choose one of {sorted(CLUSTERS)} "
                             "or give key=value overrides")
        base, parts = CLUSTERS[parts.pop(0)], parts
    names = {f.name: f.type for f in fields(Cluster)}
    changes: dict[str, Any] = {}
    for part in parts:
        key, _, value = part.partition("=")
        if key not in names or not value:
            raise ValueError(f"--cluster override {part!r} is not key=value with a key of {sorted(names)}")
        changes[key] = int(value) if names[key] == "int" else float(value)
    return replace(base, **changes)


def a2a_terms(buffer_bytes: float, ep: int, gpus_per_node: int, a2a: str = "flat") -> published.Terms:
    """The branches of one all-to-all of ``buffer_bytes`` per rank over ``ep`` ranks (see the
    module docstring); ``published.evaluate`` turns them into seconds."""
    local = min(ep, gpus_per_node)
    if a2a == "hierarchical" and ep > local:
        nodes = ep // gpus_per_node
        intra = published.link("intra", local - 1, (local - 1) * buffer_bytes / local)
        inter = published.link("inter", nodes - 1, (nodes - 1) * buffer_bytes / nodes)
        return [{k: intra.get(k, 0.0) + inter.get(k, 0.0) for k in {**intra, **inter}}]
    chunk = buffer_bytes / ep
    branches = [published.link("intra", local - 1, (local - 1) * chunk)] if local > 1 else []
    return branches + ([published.link("inter", ep - local, (ep - local) * chunk)] if ep > local else [])


def all_to_all_s(buffer_bytes: float, ep: int, cluster: Cluster, a2a: str = "flat") -> float:
    """Seconds for one all-to-all of ``buffer_bytes`` per rank over ``ep`` ranks."""
    return published.evaluate(a2a_terms(buffer_bytes, ep, cluster.gpus_per_node, a2a), cluster)


def expert_rows(spec: RunSpec, ep: int, filled: bool) -> float:
    """Rows one rank's experts compute: every slot (``E * C``) or, filled, the expected filled
    slots under even routing, ``E * min(C, k * S / E)``."""
    shape = spec.shape
    slots = shape.experts // ep * ep * spec.capacity()
    return min(slots, shape.top_k * shape.tokens) if filled else slots


def pipeline_s(comm_s: float, compute_s: float, chunks: int) -> float:
    """One pass over ``chunks`` slices: ``comm_s`` is one chunk's dispatch + return, ``compute_s``
    the whole pass's expert time. ``chunks = 1`` is ``comm_s + compute_s`` (no overlap)."""
    compute = compute_s / chunks
    return comm_s + compute + (chunks - 1) * max(comm_s, compute)


def step_s(spec: RunSpec, ep: int, cluster: Cluster, a2a: str = "flat", chunks: int = 1,
           filled: bool = False) -> dict[str, float]:
    """Predicted seconds of one forward+backward: ``expert_math``, ``all_to_all`` (the 4
    all-to-alls of every chunk, latencies included), ``local``, ``step`` (with the overlap of
    ``chunks``), ``floor`` (step without local work) and ``efficiency`` (expert_math / step)."""
    shape = spec.shape
    experts = spec.expert_flops(ep) * expert_rows(spec, ep, filled) / expert_rows(spec, ep, False) \
        / cluster.flops_per_s
    one_way = all_to_all_s(spec.a2a_bytes() / chunks, ep, cluster, a2a)
    overlapped = pipeline_s(2 * one_way, experts / 3, chunks) + pipeline_s(2 * one_way, 2 * experts / 3, chunks)
    local = cluster.local_passes * shape.tokens * shape.top_k * shape.d_model * BYTES[spec.dtype] \
        / cluster.memory_bytes_per_s
    step = overlapped + local
    return {"expert_math": experts, "all_to_all": 4 * chunks * one_way, "local": local, "step": step,
            "floor": overlapped, "efficiency": experts / step}


def best_chunks(spec: RunSpec, ep: int, cluster: Cluster, a2a: str = "flat", filled: bool = True,
                candidates: tuple[int, ...] = CHUNKS) -> tuple[int, dict[str, float]]:
    """The ``num_chunks`` of ``candidates`` with the least predicted step, and that step."""
    return min(((n, step_s(spec, ep, cluster, a2a, n, filled)) for n in candidates), key=lambda c: c[1]["step"])


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
    """Fit the model to measured runs (one node: the intra link's per-peer cost and bandwidth, the
    padded floor's FLOP rate, the local passes); returns the calibrated cluster and, per run,
    the measured padded layer (``layer_padded``, or ``layer`` in runs without it) vs the padded
    prediction."""
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
                     memory_bytes_per_s=statistics.median(bandwidths), intra_alpha_s=0.0,
                     local_passes=local_s / moved if moved else base.local_passes)
    if rows:
        solution = np.linalg.lstsq(np.array(rows, dtype=float), np.array(times), rcond=None)[0]
        fitted = replace(fitted, peer_s=max(solution[0], 0.0), intra_bytes_per_s=1 / max(solution[1], 1e-15))
    checks = []
    for point in points:
        spec = _point_spec(point)
        predicted = step_s(spec, spec.ep_size, fitted)  # padded, as the floor the FLOP rate comes from
        timings = point["timings_ms"]
        measured = timings.get("layer_padded", timings["layer"])["total"]["median"]
        checks.append({"preset": spec.preset, "ranks": point["config"]["ranks"], "tokens": spec.shape.tokens,
                       "measured_ms": measured, "predicted_ms": predicted["step"] * 1e3,
                       "error": predicted["step"] * 1e3 / measured - 1})
    return fitted, checks


def predict(presets: list[str], gpus: list[int], cluster: Cluster, dtype: str, tokens: Optional[int],
            experts_per_gpu: Optional[int], chunks: tuple[int, ...] = CHUNKS) -> list[dict[str, Any]]:
    """Weak scaling (tokens per GPU fixed; EP = min(GPUs, experts), or with ``experts_per_gpu``
    the experts grow with the GPUs and EP = GPUs), filled expert compute. Per point, ms of the
    step for flat and hierarchical all-to-all, unchunked and at their best ``num_chunks``."""
    rows = []
    for name in presets:
        shape = SHAPES[name] if tokens is None else replace(SHAPES[name], tokens=tokens)
        for count in gpus:
            grown = replace(shape, experts=count * experts_per_gpu) if experts_per_gpu else shape
            ep = count if experts_per_gpu else min(count, shape.experts)
            spec = RunSpec(preset=name, shape=grown, dtype=dtype, ep_size=ep)
            row: dict[str, Any] = {"preset": name, "gpus": count, "ep_size": ep, "experts": grown.experts}
            for a2a in A2A:
                plain = step_s(spec, ep, cluster, a2a, 1, True)
                n, best = best_chunks(spec, ep, cluster, a2a, True, chunks)
                row[a2a] = {"step": plain["step"] * 1e3, "chunked_step": best["step"] * 1e3, "best_chunks": n,
                            **{k: v * 1e3 if k != "efficiency" else v for k, v in plain.items() if k != "step"}}
            rows.append(row)
    return rows


def deepseek_v3(cluster: Cluster) -> dict[str, Any]:
    """Our layer at DeepSeek-V3's shape on its EP64 (8 nodes), 4096 tokens per GPU, bf16: the
    routed-MoE GPU time per token over its 58 MoE layers, next to the whole model's published
    180K GPU-hours per trillion tokens (a bound the MoE part alone must stay under)."""
    v3 = published.DEEPSEEK_V3
    spec = RunSpec("deepseek-v3", SHAPES["deepseek-v3"], dtype="bf16", ep_size=v3["ep"])
    budget_ms = v3["gpu_hours_per_trillion_tokens"] * 3600 / 1e12 * 1e3
    out: dict[str, Any] = {**v3, "published_gpu_ms_per_token": budget_ms}
    for a2a in A2A:
        n, best = best_chunks(spec, v3["ep"], cluster, a2a)
        plain = step_s(spec, v3["ep"], cluster, a2a, 1, True)
        for label, parts in ((f"{a2a}", plain), (f"{a2a}_chunked", best)):
            out[label] = {"gpu_ms_per_token": v3["moe_layers"] * parts["step"] / spec.shape.tokens * 1e3,
                          "chunks": n if label.endswith("chunked") else 1,
                          **{k: v3["moe_layers"] * parts[k] / spec.shape.tokens * 1e3
                             for k in ("expert_math", "all_to_all", "local")}}
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``model`` subcommand's flags."""
    parser.add_argument("--cluster", default="h100-8x400g",
                        help=f"a preset ({', '.join(CLUSTERS)}) and/or key=value overrides of its fields, e.g. "
                             "h800-deepep,inter_bytes_per_s=25e9 (default h100-8x400g)")
    parser.add_argument("--calibrate", nargs="*", help="result JSON files (default: all layer/scaling results)")
    parser.add_argument("--preset", nargs="+", default=["mixtral", "fine-grained", "deepseek-v3"],
                        choices=sorted(SHAPES))
    parser.add_argument("--gpus", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256, 512, 1024])
    parser.add_argument("--chunks", type=int, nargs="+", default=list(CHUNKS), help="num_chunks to choose from")
    parser.add_argument("--dtype", default="bf16", choices=sorted(BYTES))
    parser.add_argument("--tokens", type=int, help="tokens per GPU (default: the preset's)")
    parser.add_argument("--experts-per-gpu", type=int, default=1, help="the switch (E = GPUs) curve's experts per GPU")
    parser.add_argument("--out", help="results folder (default benchmarks/results)")


def _print_published(table: list[dict[str, Any]]) -> None:
    print("DeepEP's published tables (H800) vs the model: us, nominal h800 / fitted h800-deepep (error)")
    for row in table:
        print(f"  {row['table']:11} {row['op']:8} EP{row['ep']:<3} {row['published_gbps']:4} GB/s -> "
              f"{row['published_us']:7.0f} us | h800 {row['h800_us']:7.0f} ({100 * row['h800_error']:+4.0f}%) | "
              f"h800-deepep {row['h800-deepep_us']:7.0f} ({100 * row['h800-deepep_error']:+4.0f}%)")


def main(args: argparse.Namespace) -> None:
    """Compare with the published numbers, calibrate on the CPU results, predict the cluster."""
    cluster = parse_cluster(args.cluster)
    table = published.compare(published.published_rows(), {k: CLUSTERS[k] for k in ("h800", "h800-deepep")})
    _print_published(table)
    records = results.load(args.calibrate) if args.calibrate else (
        results.load_dir("layer", args.out) + results.load_dir("scaling", args.out))
    fitted, checks = calibrate(records, Cluster()) if _points(records) else (None, [])
    if fitted is not None:
        print("calibrated on the measured CPU runs (one node):", {k: f"{v:.3g}" for k, v in asdict(fitted).items()})
    for check in checks:
        print(f"  {check['preset']:20} {check['ranks']} rank(s) {check['tokens']:6} tok: measured "
              f"{check['measured_ms']:8.2f} ms, model {check['predicted_ms']:8.2f} ms ({100 * check['error']:+.0f}%)")
    chunks = tuple(args.chunks)
    rows = predict(args.preset, args.gpus, cluster, args.dtype, args.tokens, None, chunks)
    grown = predict(["switch"], args.gpus, cluster, args.dtype, args.tokens, args.experts_per_gpu, chunks)
    print(f"predicted step (ms, forward+backward, filled compute) on {args.cluster}: {asdict(cluster)}")
    for row in rows + grown:
        flat, hier = row["flat"], row["hierarchical"]
        print(f"  {row['preset']:12} {row['gpus']:5} GPUs EP {row['ep_size']:4} E {row['experts']:5}: flat "
              f"{flat['step']:8.2f} / {flat['chunked_step']:8.2f} at {flat['best_chunks']:2} chunks; hierarchical "
              f"{hier['step']:8.2f} / {hier['chunked_step']:8.2f} at {hier['best_chunks']:2} chunks "
              f"(experts {flat['expert_math']:.2f}, a2a {flat['all_to_all']:.2f}, local {flat['local']:.2f})")
    v3 = deepseek_v3(CLUSTERS["h800-deepep"])  # the hardware DeepSeek-V3 trained on
    variants = ("flat", "flat_chunked", "hierarchical", "hierarchical_chunked")
    print("DeepSeek-V3 shape on EP64 of h800-deepep: routed-MoE GPU-ms per token "
          + ", ".join(f"{k} {v3[k]['gpu_ms_per_token']:.3f}" for k in variants)
          + f"; the whole model's published budget {v3['published_gpu_ms_per_token']:.3f}")
    path = results.write("model", args.dtype, {
        "cluster_name": args.cluster, "cluster": asdict(cluster),
        "clusters": {k: asdict(v) for k, v in CLUSTERS.items()},
        "published": table, "deepseek_v3": v3, "calibrated_cpu": asdict(fitted) if fitted else None,
        "calibration_checks": checks, "predictions": rows, "predictions_experts_per_gpu": grown}, args.out)
    print(f"  -> {path}")
    from . import plots
    print(f"  -> {plots.plot_model([results.load([path])[0]], path.parent)}")
