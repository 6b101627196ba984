"""The launcher's expert-load metrics (closed forms), the selection-bias update after a step, the
report's PNGs, the flag errors, and one end-to-end launch (the shared ``plain_run``) with routing
recorded and per-layer load in metrics.jsonl."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from expert_parallel import MoEConfig, MoELayer, RoutingStats
from launch import observe
from launch.observe import Observer, check_observe_flags, moe_metrics
from launch.report import FILES, write_report


def _stats(tokens: list[int], dropped: float, k_eff: float) -> RoutingStats:
    zero = torch.zeros(())
    return RoutingStats(torch.tensor(tokens), torch.tensor(dropped), zero.view(1), zero, torch.tensor(k_eff), zero,
                        zero.long(), zero.long(), zero.long(), zero)


def test_per_layer_metrics_are_the_closed_forms_of_the_loads():
    metrics = moe_metrics([_stats([6, 2, 0, 0], 0.25, 1.5), _stats([1, 1, 1, 1], 0.0, 2.0)], None)
    first = metrics["layer0"]
    assert first["tokens_per_expert"] == [6, 2, 0, 0]
    assert first["max_over_mean"] == pytest.approx(6 / 2)
    assert first["load_cv"] == pytest.approx(((16 + 0 + 4 + 4) / 4) ** 0.5 / 2)
    assert (first["drop_fraction"], first["k_eff"]) == (0.25, 1.5)
    assert metrics["layer1"]["max_over_mean"] == 1.0 and metrics["layer1"]["load_cv"] == 0.0


def _args(tmp_path: Path, **flags) -> argparse.Namespace:
    fields = dict(out=str(tmp_path), tensorboard=False, record_routing=False, bias_update_rate=0.0, hf_model=None,
                  hf_path=None)
    return argparse.Namespace(**{**fields, **flags})


def test_bias_update_rate_steps_the_selection_bias_after_each_step(tmp_path):
    layer = MoELayer(MoEConfig(d_model=8, d_ff=8, num_experts=4, router="topk", top_k=1, bias_update_rate=0.1))
    layer.router.count_selection(torch.tensor([5, 1, 1, 1]))
    Observer(_args(tmp_path, bias_update_rate=0.1), layer, 0).after_step()
    torch.testing.assert_close(layer.router.selection_bias, torch.tensor([-0.1, 0.1, 0.1, 0.1]))
    Observer(_args(tmp_path), layer, 0).after_step()  # rate 0: nothing moves
    torch.testing.assert_close(layer.router.selection_bias, torch.tensor([-0.1, 0.1, 0.1, 0.1]))


def test_flag_errors_name_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(observe, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r'--tensorboard needs the tensorboard.*pip install -e "\.\[tensorboard\]"'):
        check_observe_flags(_args(tmp_path, tensorboard=True))
    pytest.importorskip("transformers")
    from launch.train import build_parser, check_flags
    with pytest.raises(ValueError, match="mixtral model's router has no selection bias"):
        check_flags(build_parser().parse_args(["--hf-model", "mixtral", "--bias-update-rate", "0.01"]), 2)
    check_flags(build_parser().parse_args(["--hf-model", "deepseek_v3", "--bias-update-rate", "0.01"]), 2)


def test_the_report_writes_labelled_pngs_for_every_figure(tmp_path):
    pytest.importorskip("matplotlib")
    lines = [{"step": step, "loss": 4.0 / step, "aux_loss": 0.01,
              "moe": {f"layer{i}": {"tokens_per_expert": [step, 10, 5, 1 + i], "max_over_mean": 1.5,
                                    "drop_fraction": 0.1 * i, "k_eff": 2.0, "load_cv": 0.3} for i in range(3)}}
             for step in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    written = write_report(tmp_path)
    assert [path.name for path in written] == list(FILES)
    for path in written:
        assert path.parent == tmp_path / "report" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no such file"):
        write_report(tmp_path / "missing")


@pytest.mark.slow
def test_a_launch_records_routing_and_logs_each_layers_expert_load(plain_run, tmp_path):
    out, result = plain_run  # 4 layers (2 MoE), routing recorded, logged every 10 steps
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        assert sorted(record["moe"]) == ["layer0", "layer1"]
        for layer in record["moe"].values():  # summed over both EP ranks: 2 ranks x 8 x 32 tokens, top-2
            assert sum(layer["tokens_per_expert"]) <= 2 * 2 * 8 * 32 and len(layer["tokens_per_expert"]) == 8
    calls = torch.load(out / "routing" / "step000030_rank1.pt")
    assert [name for name, _, _ in calls] == ["blocks.1.ffn", "blocks.3.ffn"]
    shutil.copytree(out, tmp_path / "out")  # the report writes into OUT: into a copy of the shared run's
    report = subprocess.run([sys.executable, "-m", "launch.report", str(tmp_path / "out")], capture_output=True,
                            text=True)
    assert report.returncode == 0 and (tmp_path / "out" / "report" / "expert_load.png").is_file()


def test_tensorboard_gets_the_scalars_and_each_layers_load_histogram(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    observer = Observer(_args(tmp_path, tensorboard=True), torch.nn.Linear(2, 2), 0)
    observer.log(3, {"loss": 2.5, "aux_loss": 0.01, "grad_norm": 1.5}, [_stats([6, 2, 0, 0], 0.25, 1.5)])
    observer.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/grad_norm", "moe/layer0/max_over_mean"} <= set(events.Tags()["scalars"])
    assert [(e.step, e.value) for e in events.Scalars("moe/layer0/max_over_mean")] == [(3, 3.0)]
    assert events.Tags()["histograms"] == ["moe/layer0/expert_load"]
