"""The benchmark figures show every bar whole and say why a baseline is missing."""

from __future__ import annotations

import pytest

pytest.importorskip("matplotlib")

from benchmarks import plots, results  # noqa: E402


@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions draw, kept open instead of saved."""
    drawn = {}
    monkeypatch.setattr(plots, "_save", lambda fig, folder, name: drawn.setdefault(name, fig))
    return drawn


def test_phases_plot_shows_its_tallest_bar_whole(figures):
    records = results.load_dir("layer", results.RESULTS_DIR)
    plots.plot_phases(records, results.RESULTS_DIR)
    ax = figures["phases"].axes[0]
    tops = [patch.get_y() + patch.get_height() for patch in ax.patches]
    assert max(tops) < ax.get_ylim()[1]


def test_compare_plot_names_why_autoep_is_absent(figures):
    records = [r for r in results.load_dir("layer", results.RESULTS_DIR) if r["config"]["preset"] == "switch-small"]
    assert records and all(isinstance(r["autoep"], str) for r in records)
    plots.plot_compare(records, results.RESULTS_DIR)
    notes = " ".join(text.get_text().replace("\n", " ") for text in figures["compare"].axes[0].texts)
    assert "AutoEP not measured" in notes and "SwiGLU" in notes


def test_memory_plot_draws_peak_and_held_bars_of_every_measured_runtime(figures):
    records = [r for r in results.load_dir("layer", results.RESULTS_DIR) if r.get("memory_bytes")]
    assert records  # the committed suite run measured memory
    plots.plot_memory(records, results.RESULTS_DIR)
    ax = figures["memory"].axes[0]
    bars = sum(len([k for k in r["memory_bytes"] if k != "method"]) for r in records)
    assert len(ax.patches) == 2 * bars  # a peak and a held bar each
    heights = sorted(patch.get_height() for patch in ax.patches)
    peak = max(m["peak"] for r in records for k, m in r["memory_bytes"].items() if k != "method")
    assert heights[-1] == pytest.approx(peak / 2**20)
    assert plots.plot_memory([{k: v for k, v in r.items() if k != "memory_bytes"} for r in records],
                             results.RESULTS_DIR) is None  # older runs without memory: no figure
