"""PNG plots of the results in ``benchmarks/results/`` (matplotlib, headless)."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any, Optional

from . import results
from .phases import PHASES


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig: Any, folder: Path, name: str) -> Path:
    path = folder / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    _pyplot().close(fig)
    return path


# step -> legend label, in bar order; a step a record lacks (older runs) is skipped
STEPS = {"layer": "ours (filled)", "layer_padded": "ours (padded)", "floor": "padded floor",
         "floor_filled": "filled floor", "deepspeed": "DeepSpeed MoE", "autoep": "DeepSpeed AutoEP"}
# the memory figure's runtimes: STEPS and our variants (``--variants``)
MEMORY_STEPS = {**STEPS, "layer_recompute": "ours, recompute='experts'", "layer_compiled": "ours, torch.compile"}
# ratio key -> its short annotation
RATIO_NOTES = {"ours_over_floor": "ours/padded floor", "ours_over_filled_floor": "ours/filled floor",
               "filled_over_padded": "filled/padded", "ours_over_deepspeed": "ours/DS",
               "ours_over_autoep": "ours/AutoEP"}


# baselines a record may lack, each with the reason the run stored (record[step], e.g. record["autoep"])
BASELINE_NAMES = {"deepspeed": "DeepSpeed MoE", "autoep": "AutoEP"}


def _why_absent(reason: str) -> str:
    """The stored reason a baseline did not run, wrapped to the width of a bar group."""
    return "\n".join(textwrap.wrap(reason, 40))


def _label(record: dict[str, Any]) -> str:
    cfg = record["config"]
    skew = f", skew {cfg['skew']:g}" if cfg.get("skew") else ""
    return f"{cfg['preset']}{skew}\n{cfg['ranks']}x{cfg['device'].split(':')[0]} {cfg['dtype']}"


def _step_style(record: dict[str, Any], step: str) -> tuple[str, str]:
    """``(legend label, colour)`` of ``step``: ``layer`` is a padded layer in runs from before filled
    compute (no ``filled_compute`` in the config) and where grouped GEMM did not run."""
    if step == "layer" and not record["config"].get("filled_compute", False):
        step = "layer_padded"
    return STEPS[step], f"C{list(STEPS).index(step)}"


def plot_phases(records: list[dict[str, Any]], folder: Path) -> Optional[Path]:
    """Stacked bars: our phases (forward+backward each) next to the two parts of the floor they are
    held against (the filled floor where it ran, else the padded floor)."""
    records = [r for r in records if "phases" in r["timings_ms"]]
    if not records:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(3 + 2.2 * len(records), 4.5))
    colors = plt.get_cmap("tab10").colors
    tallest = 0.0
    for i, record in enumerate(records):
        floor_step = record.get("excess_over", "floor")
        phases, floor = record["timings_ms"]["phases"], record["timings_ms"][floor_step]
        floor_name = "filled floor" if floor_step == "floor_filled" else "floor"
        bottom = 0.0
        for j, name in enumerate(PHASES):
            ms = sum(phases.get(f"{d}/{name}", {"median": 0.0})["median"] for d in ("fwd", "bwd"))
            ax.bar(i - 0.2, ms, 0.38, bottom=bottom, color=colors[j], label=name if i == 0 else None)
            bottom += ms
        ax.bar(i + 0.2, floor["matmuls"]["median"], 0.38, color=colors[4], hatch="//", edgecolor="white",
               label=f"{floor_name}: matmuls" if i == 0 else None)
        ax.bar(i + 0.2, floor["all_to_all"]["median"], 0.38, bottom=floor["matmuls"]["median"], color=colors[3],
               hatch="//", edgecolor="white", label=f"{floor_name}: raw all-to-all" if i == 0 else None)
        tallest = max(tallest, bottom, floor["matmuls"]["median"] + floor["all_to_all"]["median"])
    # headroom for the legend above the tallest bar (autoscaling let the legend hide its top)
    ax.set_ylim(0, tallest * 1.35)
    ax.set_xticks(range(len(records)), [_label(r) for r in records], fontsize=8)
    ax.set_ylabel("ms per forward+backward (median)")
    ax.set_title("Phases of one step (left) vs the floor (right)")
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, folder, "phases")


def plot_compare(records: list[dict[str, Any]], folder: Path) -> Optional[Path]:
    """Per run (preset, and the skewed runs next to them): ours filled and padded, the padded and the
    filled floor, DeepSpeed MoE and AutoEP, median with the interquartile range; the main ratios."""
    if not records:
        return None
    records = sorted(records, key=lambda r: (r["config"]["preset"], r["config"].get("skew", 0.0)))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(3 + 2.6 * len(records), 4.8))
    width = 0.8 / len(STEPS)
    labelled: set[str] = set()
    for i, record in enumerate(records):
        for j, step in enumerate(STEPS):
            total = record["timings_ms"].get(step, {}).get("total")
            if total is None:
                continue
            label, color = _step_style(record, step)
            err = [[total["median"] - total["p25"]], [total["p75"] - total["median"]]]
            ax.bar(i + (j - (len(STEPS) - 1) / 2) * width, total["median"], width * 0.95, yerr=err, capsize=2,
                   color=color, label=None if label in labelled else label)
            labelled.add(label)
        found = record.get("ratios", {})
        text = "\n".join(f"{note} {found[key]:.2f}" for key, note in RATIO_NOTES.items() if found.get(key))
        text += "".join(f"\n{name} not measured:\n{_why_absent(record[step])}" for step, name in BASELINE_NAMES.items()
                        if step not in record["timings_ms"] and isinstance(record.get(step), str))
        ax.annotate(text, (i, 0), xytext=(0, -30), textcoords="offset points", ha="center", va="top", fontsize=7)
    ax.set_xticks(range(len(records)), [_label(r) for r in records], fontsize=8)
    ax.set_ylabel("ms per forward+backward (median, IQR)")
    ax.set_title("MoE layer: ours (filled, padded) vs the floors vs DeepSpeed (MoE, AutoEP), same run")
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, folder, "compare")


def plot_memory(records: list[dict[str, Any]], folder: Path) -> Optional[Path]:
    """Per run: every runtime's peak memory of one forward+backward (light bar) and the activation
    memory its forward holds for the backward (dark bar over it), MiB (``memory_bytes``)."""
    records = sorted((r for r in records if r.get("memory_bytes")),
                     key=lambda r: (r["config"]["preset"], r["config"].get("skew", 0.0)))
    if not records:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(3 + 2.8 * len(records), 4.8))
    width = 0.8 / len(MEMORY_STEPS)
    labelled: set[str] = set()
    for i, record in enumerate(records):
        for j, (step, label) in enumerate(MEMORY_STEPS.items()):
            used = record["memory_bytes"].get(step)
            if used is None:
                continue
            color = f"C{j}"
            at = i + (j - (len(MEMORY_STEPS) - 1) / 2) * width
            ax.bar(at, used["peak"] / 2**20, width * 0.95, color=color, alpha=0.35)
            ax.bar(at, used["held"] / 2**20, width * 0.95, color=color, label=None if label in labelled else label)
            labelled.add(label)
    ax.set_xticks(range(len(records)), [_label(r) for r in records], fontsize=8)
    ax.set_ylabel("MiB: held for the backward (dark), peak (light)")
    ax.set_title(f"Memory of one forward+backward ({records[0]['memory_bytes'].get('method', '')})", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, folder, "memory")


def plot_sweep(records: list[dict[str, Any]], folder: Path) -> Optional[Path]:
    """Capacity sweeps (``sweep-*.json``): median step time vs capacity factor, one line per
    runtime, one panel per sweep."""
    if not records:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(records), figsize=(max(6.0, 4.5 * len(records)), 4), squeeze=False)
    labels = dict(zip(("ours", "ours_padded", "floor", "filled_floor", "deepspeed", "autoep"), STEPS.values()))
    for ax, record in zip(axes[0], records):
        factors = record["capacity_factors"]
        for j, (runtime, label) in enumerate(labels.items()):
            points = [(f, ms) for f, ms in zip(factors, record["median_ms"].get(runtime, [])) if ms is not None]
            if points:
                style = "--" if "floor" in runtime else "-"
                ax.plot(*zip(*points), style, marker="o", color=f"C{j}", label=label)
        ax.set_xticks(factors)
        ax.set_xlabel("capacity factor")
        ax.set_ylabel("ms per forward+backward (median)")
        ax.set_title(_label(record["points"][0]).replace("\n", ", "), fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle("Step time vs capacity factor", fontsize=9)
    return _save(fig, folder, "sweep")


def plot_scaling(records: list[dict[str, Any]], folder: Path) -> Optional[Path]:
    """Step time vs ranks for weak and strong scaling sweeps."""
    if not records:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(records), figsize=(4.5 * len(records), 4), squeeze=False)
    for ax, record in zip(axes[0], records):
        ranks = [p["config"]["ranks"] for p in record["points"]]
        for step, label in (("layer", "ours"), ("floor", "floor")):
            medians = [p["timings_ms"][step]["total"]["median"] for p in record["points"]]
            ax.plot(ranks, medians, marker="o", label=label)
        ax.set_xticks(ranks)
        ax.set_xlabel("gloo ranks")
        ax.set_ylabel("ms per forward+backward")
        tokens = "tokens/rank fixed" if record["mode"] == "weak" else f"{record['global_tokens']} tokens in all"
        ax.set_title(f"{record['mode']} scaling, {record['points'][0]['config']['preset']} ({tokens})", fontsize=9)
        ax.legend(fontsize=8)
    return _save(fig, folder, "scaling")


def _plot_published(ax: Any, rows: list[dict[str, Any]], table: str) -> None:
    """One DeepEP table: published us per EP size (markers) and the model's, nominal and fitted."""
    for i, op in enumerate(("dispatch", "combine")):
        mine = [r for r in rows if r["table"] == table and r["op"] == op]
        ep = [r["ep"] for r in mine]
        ax.plot(ep, [r["published_us"] for r in mine], "o", color=f"C{i}", label=f"{op}: published")
        ax.plot(ep, [r["h800-deepep_us"] for r in mine], "-", color=f"C{i}", label=f"{op}: model, fitted")
        ax.plot(ep, [r["h800_us"] for r in mine], ":", color=f"C{i}", label=f"{op}: model, nominal")
    worst = max(abs(r["h800-deepep_error"]) for r in rows if r["table"] == table)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("EP size (8 GPUs per node)")
    ax.set_ylabel("us per all-to-all")
    ax.set_title(f"DeepEP {table} kernels, H800 (fitted: max |error| {100 * worst:.0f}%)", fontsize=9)
    ax.legend(fontsize=6)


def plot_model(records: list[dict[str, Any]], folder: Path) -> Optional[Path]:
    """The cost model: DeepEP's published all-to-all times against the model (nominal H800
    figures and the constants fitted to them), and the predicted step of the chosen cluster, flat
    vs hierarchical all-to-all, unchunked and at the best ``num_chunks``."""
    records = [r for r in records if "cluster" in r]  # older model files predate the published check
    if not records:
        return None
    plt = _pyplot()
    record = records[-1]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    _plot_published(axes[0], record["published"], "normal")
    _plot_published(axes[1], record["published"], "low-latency")
    rows = record["predictions"] + [dict(r, preset=f"{r['preset']} (E = GPUs)")
                                    for r in record["predictions_experts_per_gpu"]]
    ax = axes[2]
    for i, name in enumerate(dict.fromkeys(r["preset"] for r in rows)):
        mine = [r for r in rows if r["preset"] == name]
        gpus = [r["gpus"] for r in mine]
        ax.plot(gpus, [r["flat"]["step"] for r in mine], "-", color=f"C{i}", label=f"{name}: flat")
        ax.plot(gpus, [r["flat"]["chunked_step"] for r in mine], "o-", color=f"C{i}", markersize=3,
                label=f"{name}: flat, best chunks")
        ax.plot(gpus, [r["hierarchical"]["step"] for r in mine], "--", color=f"C{i}", label=f"{name}: hierarchical")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(f"GPUs ({record['cluster']['gpus_per_node']} per node)")
    ax.set_ylabel("predicted ms per forward+backward")
    ax.set_title(f"{record['cluster_name']}: weak scaling, filled compute", fontsize=9)
    ax.legend(fontsize=6, loc="center right")
    return _save(fig, folder, "model")


def plot_all(out: Optional[str] = None,
             figures: tuple[str, ...] = ("phases", "compare", "memory", "sweep", "scaling", "model")) -> list[Path]:
    """Draw the chosen figures from the results in ``out``; returns the PNG paths written."""
    folder = Path(out) if out else results.RESULTS_DIR
    layer = results.load_dir("layer", folder)
    makers = {"phases": lambda: plot_phases(layer, folder), "compare": lambda: plot_compare(layer, folder),
              "memory": lambda: plot_memory(layer, folder),
              "sweep": lambda: plot_sweep(results.load_dir("sweep", folder), folder),
              "scaling": lambda: plot_scaling(results.load_dir("scaling", folder), folder),
              "model": lambda: plot_model(results.load_dir("model", folder), folder)}
    return [path for name in figures if (path := makers[name]()) is not None]
