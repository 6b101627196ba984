"""The benchmark suite's plumbing, single process and fast: timing statistics, the phase mirror
against the real layer, the JSON record of a tiny run, the CLI's dry run."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from benchmarks import cli, results
from benchmarks import layer as layer_bench
from benchmarks.phases import EXTRA_MARKS, PHASES, phase_step
from benchmarks.shapes import SHAPES, RunSpec
from benchmarks.timing import alternate, slowest_rank, summarize
from expert_parallel import MoELayer

TINY = RunSpec("mixtral-small", replace(SHAPES["mixtral-small"], d_model=16, d_ff=32, tokens=64),
               warmup=1, repeat=3, deepspeed=False, gpu_checks=False)


def test_summarize_gives_the_median_and_quartiles():
    stats = summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (stats["median"], stats["min"], stats["max"], stats["n"]) == (3.0, 1.0, 5.0, 5)
    assert stats["p25"] == pytest.approx(1.5) and stats["p75"] == pytest.approx(4.5)


def test_slowest_rank_takes_the_maximum_per_round():
    assert slowest_rank([[1.0, 5.0], [2.0, 3.0]]) == [2.0, 5.0]


def test_alternate_interleaves_the_steps_and_drops_the_warmup():
    order = []
    steps = {name: (lambda n=name: order.append(n) or {"t": float(len(order))}) for name in ("a", "b")}
    samples = alternate(steps, warmup=1, repeat=2)
    assert order == ["a", "b"] * 3
    assert samples == {"a": {"t": [3.0, 5.0]}, "b": {"t": [4.0, 6.0]}}


@pytest.mark.parametrize("overrides", [dict(), dict(num_shared_experts=1)])
def test_phase_marks_are_the_layers_own_events_and_cover_the_step(overrides):
    torch.manual_seed(0)
    layer = MoELayer(TINY.config(1).replace(**overrides))
    x = torch.randn(64, 16, requires_grad=True)
    marks = []

    class Recorder:
        def mark(self, name):
            marks.append(name)
    y = phase_step(layer, x, Recorder())
    phases = [p for p in PHASES if p != "shared" or overrides]
    backward = [f"bwd/{p}" for p in reversed(phases) if p != "plan"]
    assert marks == [f"fwd/{p}" for p in phases] + ["fwd/output"] + backward + ["bwd/rest"]
    assert x.grad is not None and y.shape == x.shape
    marks.clear()
    layer(x)  # the hook is gone after the step
    assert marks == []


def test_a_tiny_run_writes_a_complete_json_record(tmp_path):
    raw = layer_bench.measure(0, 1, TINY, progress=False)
    timings = layer_bench.reduce_ranks([raw])
    assert set(timings) == {"layer", "phases", "floor"}
    phases = [p for p in PHASES if p != "shared"]  # mixtral-small has no shared experts
    assert set(timings["phases"]) == {f"fwd/{p}" for p in phases} | {
        f"bwd/{p}" for p in phases if p != "plan"} | set(EXTRA_MARKS) | {"total"}
    assert timings["floor"]["total"]["n"] == TINY.repeat
    record = {"config": TINY.describe(), "timings_ms": timings, "ratios": layer_bench.ratios(timings),
              "excess_over_floor_ms": layer_bench.excess_over_floor(timings), "telemetry": [raw["telemetry"]]}
    path = results.write("layer", "tiny", record, tmp_path)
    loaded = json.loads(path.read_text())
    assert loaded["schema"] == results.SCHEMA and loaded["kind"] == "layer"
    assert {"machine", "versions", "time"} <= set(loaded["environment"])
    assert loaded["ratios"]["ours_over_floor"] > 0
    assert loaded["ratios"]["ours_over_deepspeed"] is None and loaded["ratios"]["ours_over_autoep"] is None
    assert loaded["telemetry"][0]["available"] is False
    assert results.load_dir("layer", tmp_path)[0]["name"] == "tiny"


def test_targets_report_by_how_much_they_are_missed():
    found = {"ours_over_floor": 1.155, "ours_over_deepspeed": 0.5}
    spec = replace(TINY, preset="switch-small")
    met = {t["target"].split(" (")[0]: (t["met"], t["missed_by"]) for t in layer_bench.targets(spec, 2, "cpu", found)}
    assert met["ours <= 1.05 x floor"] == (False, pytest.approx(0.1))
    assert met["ours no slower than DeepSpeed MoE"] == (True, None)


def test_the_gpu_presets_build_in_a_dry_run(capsys):
    cli.main(["layer", "--preset", "mixtral", "fine-grained", "switch", "--ranks", "1", "--dtype", "bf16",
              "--dry-run"])
    out = capsys.readouterr().out
    assert out.count("layer built on meta") == 3 and "capacity=1280" in out
