"""End-to-end launches of the demo job on CPU: plain spawn, torchrun (1 node x 2, 2 nodes x 1),
resume, bad flags, a dying rank. Each checks metrics.jsonl and that the loss falls."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from expert_parallel.spawn import free_port
from launch.train import build_parser, check_flags

ROOT = Path(__file__).resolve().parents[2]
# a smaller model than the demo's default: these tests check launching, not learning speed
SMALL = ["--d-model", "32", "--d-ff", "64", "--seq-len", "32", "--batch-size", "8"]
STEPS = ["--steps", "30", "--log-every", "10", *SMALL]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def _run(cmd: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _assert_trained(out: Path, steps: int = 30) -> list[dict]:
    records = _metrics(out)
    assert [r["step"] for r in records] == list(range(10, steps + 1, 10))
    for record in records:
        assert set(record) >= {"step", "loss", "aux_loss", "drop_fraction", "k_eff", "load_cv",
                               "tokens_per_s", "step_ms"}
    assert records[-1]["loss"] < 0.8 * records[0]["loss"], records
    assert json.loads((out / "summary.json").read_text())["steps"] == steps
    return records


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("plain")
    return out, _run([sys.executable, "-m", "launch.train", "--out", str(out), *STEPS])


def test_plain_launch_spawns_two_ranks_and_the_loss_falls(plain_run) -> None:
    out, result = plain_run
    assert result.returncode == 0, result.stderr
    _assert_trained(out)
    assert "summary:" in result.stdout


def test_torchrun_single_node_two_ranks_matches_the_plain_launch(tmp_path: Path, plain_run) -> None:
    result = _run([*TORCHRUN, "--nproc-per-node", "2", "--master-port", str(free_port()),
                   "-m", "launch.train", "--out", str(tmp_path), *STEPS])
    assert result.returncode == 0, result.stderr
    # the same job, launched two ways, computes the same losses
    assert [r["loss"] for r in _assert_trained(tmp_path)] == [r["loss"] for r in _metrics(plain_run[0])]


def test_torchrun_two_nodes_on_localhost_train_together(tmp_path: Path) -> None:
    endpoint = f"127.0.0.1:{free_port()}"

    def node(rank: int) -> subprocess.Popen:
        cmd = [*TORCHRUN, "--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "test",
               "-m", "launch.train", "--out", str(tmp_path), *STEPS]
        return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    nodes = [node(0), node(1)]
    try:
        outputs = [proc.communicate(timeout=180) for proc in nodes]
    finally:
        for proc in nodes:
            proc.kill()
    assert [proc.returncode for proc in nodes] == [0, 0], outputs
    records = _assert_trained(tmp_path)
    assert json.loads((tmp_path / "summary.json").read_text())["world_size"] == 2
    assert records[0]["k_eff"] > 1.0


def test_resume_continues_with_the_same_losses(tmp_path: Path) -> None:
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    args = ["--log-every", "10", "--ckpt-every", "20", *SMALL]
    assert _run([sys.executable, "-m", "launch.train", "--out", str(full), "--steps", "40", *args]).returncode == 0
    assert _run([sys.executable, "-m", "launch.train", "--out", str(resumed), "--steps", "20", *args]).returncode == 0
    result = _run([sys.executable, "-m", "launch.train", "--out", str(resumed), "--steps", "40", "--resume", *args])
    assert result.returncode == 0, result.stderr
    assert _metrics(resumed) == [
        {**r, "tokens_per_s": m["tokens_per_s"], "step_ms": m["step_ms"]}
        for r, m in zip(_metrics(full), _metrics(resumed))
    ]
    assert json.loads((resumed / "summary.json").read_text())["start_step"] == 20


@pytest.mark.parametrize("flags, message", [
    (["--ep-size", "3"], "--ep-size 3 does not divide the world size 2"),
    (["--experts", "5"], "num_experts=5 is invalid"),
    (["--preset", "nope"], "invalid choice: 'nope'"),
    (["--simulate-failure", "x"], "expected RANK:STEP"),
])
def test_a_bad_flag_is_a_one_line_error_before_any_process_starts(tmp_path, flags, message) -> None:
    start = time.perf_counter()
    result = _run([sys.executable, "-m", "launch.train", "--out", str(tmp_path), *flags], timeout=60)
    assert result.returncode == 2
    assert message in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "metrics.jsonl").exists()
    assert time.perf_counter() - start < 30


@pytest.mark.parametrize("flags, message", [
    (["--d-model", "63"], "--d-model 63 is not divisible by --heads 4"),
    (["--heads", "0"], "--heads 0: must be >= 1"),
    (["--seq-len", "0"], "--seq-len 0: must be >= 1"),
    (["--batch-size", "0"], "--batch-size 0: must be >= 1"),
    (["--layers", "1"], "--layers 1: every other block is MoE"),
    (["--ep-size", "0"], "--ep-size 0: must be >= 1"),
    (["--lr", "nan"], "--lr nan: must be a finite number > 0"),
    (["--ckpt-every", "-1"], "--ckpt-every -1 must be >= 0"),
])
def test_model_flags_the_run_cannot_build_are_rejected_by_name(flags, message) -> None:
    args = build_parser().parse_args(flags)
    with pytest.raises(ValueError, match=re.escape(message)):
        check_flags(args, world_size=2)
    check_flags(build_parser().parse_args([]), world_size=2)  # the defaults pass


def test_a_dying_rank_ends_the_job_with_a_message(tmp_path: Path) -> None:
    start = time.perf_counter()
    result = _run([sys.executable, "-m", "launch.train", "--out", str(tmp_path), "--steps", "50", *SMALL,
                   "--simulate-failure", "1:5", "--timeout-s", "30"], timeout=120)
    assert result.returncode != 0
    assert "rank 1 failed" in result.stderr
    assert time.perf_counter() - start < 60


def test_deepspeed_launcher_zero2_bf16_trains_and_resumes(tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    full, resumed = tmp_path / "full", tmp_path / "resumed"

    def deepspeed(out: Path, steps: int, *extra: str) -> subprocess.CompletedProcess:
        return _run(["deepspeed", "--num_accelerators", "2", "--master_port", str(free_port()), "--module",
                     "launch.train", "--out", str(out), "--steps", str(steps), "--log-every", "10",
                     "--ckpt-every", "20", "--deepspeed-config", "launch/ds_zero2_bf16.json", *SMALL, *extra])

    result = deepspeed(full, 30)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    _assert_trained(full)
    assert json.loads((full / "summary.json").read_text())["deepspeed"] is True
    assert (full / "checkpoint" / "step30").is_dir()  # an engine checkpoint, per-expert files
    assert list((full / "checkpoint" / "step30").glob("layer_*_expert_*_model_states.pt"))
    assert deepspeed(resumed, 20).returncode == 0
    result = deepspeed(resumed, 30, "--resume")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert [r["loss"] for r in _metrics(resumed)] == [r["loss"] for r in _metrics(full)]


def test_a_rendezvous_that_never_completes_ends_within_its_join_timeout(tmp_path: Path) -> None:
    start = time.perf_counter()  # node 1 of 2 never comes
    result = _run([*TORCHRUN, "--nnodes", "2", "--node-rank", "0", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                   "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", "lonely",
                   "--rdzv-conf", "join_timeout=5", "-m", "launch.train", "--out", str(tmp_path), *STEPS], timeout=120)
    assert result.returncode != 0
    assert "RendezvousTimeoutError" in result.stderr
    assert time.perf_counter() - start < 60
    assert not (tmp_path / "metrics.jsonl").exists()


def test_help_lists_every_flag_with_its_default() -> None:
    from launch.train import build_parser

    result = _run([sys.executable, "-m", "launch.train", "--help"], timeout=60)
    assert result.returncode == 0
    help_text = " ".join(result.stdout.split())
    for action in build_parser()._actions:
        if action.option_strings and action.dest != "help":
            name = action.option_strings[0]
            assert name in help_text
            assert f"(default: {action.default})" in help_text, f"{name} shows no default"
