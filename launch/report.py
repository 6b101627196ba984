"""Figures of a training run: ``python -m launch.report OUT`` reads ``OUT/metrics.jsonl`` (written by
``launch.train``) and writes PNGs under ``OUT/report/``:

- ``loss.png``: the LM loss and the weighted aux loss over steps;
- ``expert_load.png``: one panel per MoE layer, experts x steps, each cell the expert's tokens over
  the mean tokens per expert of that step (1 = balanced);
- ``drop_rate.png``: each layer's dropped fraction of assignments over steps;
- ``max_over_mean.png``: each layer's max-over-mean load (MaxVio + 1) over steps.

Needs matplotlib (``pip install -e ".[report]"``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Optional

REPORT_INSTALL = 'pip install -e ".[report]"'
FILES = ("loss.png", "expert_load.png", "drop_rate.png", "max_over_mean.png")


def read_metrics(out: Path) -> list[dict[str, Any]]:
    """The records of ``OUT/metrics.jsonl``; ``ValueError`` naming the file when it is missing or empty."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{path}: no such file; pass the --out directory of a launch.train run")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records:
        raise ValueError(f"{path} is empty; train for at least --log-every steps first")
    return records


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ValueError(f"launch.report needs matplotlib, which is not installed; install it: {REPORT_INSTALL}") \
            from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_report(out: Path) -> list[Path]:
    """Write the figures of the run in ``out`` to ``out/report/``; returns their paths (``FILES``,
    the per-layer ones only when the metrics hold per-layer expert loads)."""
    plt = _pyplot()
    records = read_metrics(out)
    where = out / "report"
    where.mkdir(parents=True, exist_ok=True)
    steps = [r["step"] for r in records]
    written = [_loss(plt, steps, records, where / "loss.png")]
    layers = sorted(records[-1].get("moe", {}), key=lambda name: int(name.removeprefix("layer")))
    if layers:
        written.append(_load_heatmap(plt, steps, records, layers, where / "expert_load.png"))
        for key, label, name in (("drop_fraction", "dropped fraction of assignments", "drop_rate.png"),
                                 ("max_over_mean", "max / mean tokens per expert (MaxVio + 1)", "max_over_mean.png")):
            written.append(_per_layer(plt, steps, records, layers, key, label, where / name))
    return written


def _loss(plt: Any, steps: list[int], records: list[dict], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["loss"] for r in records], label="LM loss", color="tab:blue")
    ax.set_xlabel("step")
    ax.set_ylabel("LM loss (cross-entropy)")
    ax.grid(alpha=0.3)
    aux = [r.get("aux_loss") for r in records]
    if any(aux):
        twin = ax.twinx()
        twin.plot(steps, aux, label="aux loss (weighted)", color="tab:orange", linestyle="--")
        twin.set_ylabel("aux loss (weighted)")
        fig.legend(loc="upper right", bbox_to_anchor=(0.88, 0.88))
    ax.set_title("Training loss")
    return _save(plt, fig, path)


def _load_heatmap(plt: Any, steps: list[int], records: list[dict], layers: list[str], path: Path) -> Path:
    columns = min(len(layers), 2)
    rows = math.ceil(len(layers) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.5 * columns + 1.5, 3.2 * rows + 0.6), squeeze=False,
                             layout="constrained")
    shares = {layer: _relative_load(records, layer) for layer in layers}
    top = max(2.0, max(max(max(row) for row in grid) for grid in shares.values() if grid))
    image = None
    for ax, layer in zip(axes.flat, layers):
        grid = shares[layer]  # [experts][steps]
        image = ax.imshow(grid, aspect="auto", origin="lower", cmap="magma", vmin=0.0, vmax=top,
                          interpolation="nearest", extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, len(grid) - 0.5))
        ax.set_title(f"MoE {layer}")
        ax.set_xlabel("step")
        ax.set_ylabel("expert")
        if len(grid) <= 16:
            ax.set_yticks(range(len(grid)))
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    fig.colorbar(image, ax=axes, label="tokens / mean per expert (1 = balanced)")
    fig.suptitle("Expert load over steps (summed over the EP group)")
    return _save(plt, fig, path, tight=False)


def _relative_load(records: list[dict], layer: str) -> list[list[float]]:
    """``[experts][steps]``: each step's tokens per expert over their mean (0 where a step has none)."""
    columns = []
    for record in records:
        load = record.get("moe", {}).get(layer, {}).get("tokens_per_expert")
        if load is None:
            columns.append(None)
            continue
        mean = sum(load) / len(load)
        columns.append([value / mean if mean else 0.0 for value in load])
    width = max(len(c) for c in columns if c is not None)
    columns = [c if c is not None else [0.0] * width for c in columns]
    return [list(row) for row in zip(*columns)]


def _per_layer(plt: Any, steps: list[int], records: list[dict], layers: list[str], key: str, label: str,
               path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    for layer in layers:
        values: list[Optional[float]] = [r.get("moe", {}).get(layer, {}).get(key) for r in records]
        ax.plot(steps, [math.nan if v is None else v for v in values], label=f"MoE {layer}", marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel(label)
    ax.set_ylim(bottom=0.0)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(label[0].upper() + label[1:] + " per MoE layer")
    return _save(plt, fig, path)


def _save(plt: Any, fig: Any, path: Path, tight: bool = True) -> Path:
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: Optional[list[str]] = None) -> None:
    """``python -m launch.report OUT``."""
    parser = argparse.ArgumentParser(prog="python -m launch.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="the --out directory of a launch.train run")
    args = parser.parse_args(argv)
    try:
        written = write_report(Path(args.out))
    except ValueError as error:
        parser.error(str(error))
    print("wrote " + ", ".join(str(path) for path in written))


if __name__ == "__main__":
    sys.exit(main())
