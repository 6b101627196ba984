"""PNG plots of the results in ``benchmarks/results/`` (matplotlib, headless)."""

from __future__ import annotations

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


def _label(record: dict[str, Any]) -> str:
    cfg = record["config"]
    return f"{cfg['preset']}\n{cfg['ranks']}x{cfg['device'].split(':')[0]} {cfg['dtype']}"


def plot_phases(records: list[dict[str, Any]], folder: Path) -> Optional[Path]:
    """Stacked bars: our phases (forward+backward each) next to the floor's two parts."""
    records = [r for r in records if "phases" in r["timings_ms"]]
    if not records:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(3 + 2.2 * len(records), 4.5))
    colors = plt.get_cmap("tab10").colors
    for i, record in enumerate(records):
        phases, floor = record["timings_ms"]["phases"], record["timings_ms"]["floor"]
        bottom = 0.0
        for j, name in enumerate(PHASES):
            ms = sum(phases.get(f"{d}/{name}", {"median": 0.0})["median"] for d in ("fwd", "bwd"))
            ax.bar(i - 0.2, ms, 0.38, bottom=bottom, color=colors[j], label=name if i == 0 else None)
            bottom += ms
        ax.bar(i + 0.2, floor["matmuls"]["median"], 0.38, color=colors[4], hatch="//", edgecolor="white",
               label="floor: matmuls" if i == 0 else None)
        ax.bar(i + 0.2, floor["all_to_all"]["median"], 0.38, bottom=floor["matmuls"]["median"], color=colors[3],
               hatch="//", edgecolor="white", label="floor: raw all-to-all" if i == 0 else None)
    ax.set_xticks(range(len(records)), [_label(r) for r in records], fontsize=8)
    ax.set_ylabel("ms per forward+backward (median)")
    ax.set_title("Phases of one step (left) vs the floor (right)")
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, folder, "phases")


def plot_compare(records: list[dict[str, Any]], folder: Path) -> Optional[Path]:
    """Ours vs floor vs DeepSpeed MoE vs DeepSpeed AutoEP, median with the interquartile range."""
    if not records:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(3 + 2.2 * len(records), 4.5))
    steps = [("layer", "ours"), ("floor", "floor"), ("deepspeed", "DeepSpeed MoE"), ("autoep", "DeepSpeed AutoEP")]
    labelled: set[str] = set()
    for i, record in enumerate(records):
        for j, (step, label) in enumerate(steps):
            total = record["timings_ms"].get(step, {}).get("total")
            if total is None:
                continue
            err = [[total["median"] - total["p25"]], [total["p75"] - total["median"]]]
            ax.bar(i + (j - 1.5) * 0.21, total["median"], 0.2, yerr=err, capsize=3,
                   color=f"C{j}", label=None if label in labelled else label)
            labelled.add(label)
        ratio = record["ratios"]
        text = f"ours/floor {ratio['ours_over_floor']:.2f}"
        if ratio.get("ours_over_deepspeed"):
            text += f"\nours/DS {ratio['ours_over_deepspeed']:.2f}"
        if ratio.get("ours_over_autoep"):
            text += f"\nours/AutoEP {ratio['ours_over_autoep']:.2f}"
        ax.annotate(text, (i, 0), xytext=(0, -30), textcoords="offset points", ha="center", va="top", fontsize=7)
    ax.set_xticks(range(len(records)), [_label(r) for r in records], fontsize=8)
    ax.set_ylabel("ms per forward+backward (median, IQR)")
    ax.set_title("MoE layer: ours vs floor vs DeepSpeed (MoE, AutoEP), same run")
    ax.legend(fontsize=8)
    return _save(fig, folder, "compare")


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


def plot_model(records: list[dict[str, Any]], folder: Path) -> Optional[Path]:
    """Predicted step time and efficiency, 8 to 1024 GPUs."""
    if not records:
        return None
    plt = _pyplot()
    record = records[-1]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    rows = record["predictions"] + [dict(r, preset=f"{r['preset']} (E = GPUs)")
                                    for r in record["predictions_experts_per_gpu"]]
    for name in dict.fromkeys(r["preset"] for r in rows):
        mine = [r for r in rows if r["preset"] == name]
        left.plot([r["gpus"] for r in mine], [r["step"] for r in mine], marker="o", label=name)
        right.plot([r["gpus"] for r in mine], [r["efficiency"] for r in mine], marker="o", label=name)
    for ax, label in ((left, "predicted ms per forward+backward"), (right, "efficiency (expert math / step)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("GPUs (8 per node)")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    cluster = record["gpu_cluster"]
    fig.suptitle(f"alpha-beta model, weak scaling: NVLink {cluster['intra_bytes_per_s'] / 1e9:.0f} GB/s, "
                 f"inter-node {cluster['inter_bytes_per_s'] / 1e9:.0f} GB/s per GPU, "
                 f"{cluster['flops_per_s'] / 1e12:.0f} TFLOP/s", fontsize=9)
    return _save(fig, folder, "model")


def plot_all(out: Optional[str] = None, figures: tuple[str, ...] = ("phases", "compare", "scaling", "model")) \
        -> list[Path]:
    """Draw the chosen figures from the results in ``out``; returns the PNG paths written."""
    folder = Path(out) if out else results.RESULTS_DIR
    layer = results.load_dir("layer", folder)
    makers = {"phases": lambda: plot_phases(layer, folder), "compare": lambda: plot_compare(layer, folder),
              "scaling": lambda: plot_scaling(results.load_dir("scaling", folder), folder),
              "model": lambda: plot_model(results.load_dir("model", folder), folder)}
    return [path for name in figures if (path := makers[name]()) is not None]
