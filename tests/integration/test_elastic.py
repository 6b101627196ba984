"""Failures and restarts under torchrun on localhost (gloo): a worker that dies is restarted and the
job ends with the losses of an uninterrupted run; a node (an agent and its worker) that is killed
leaves the other to resume at world size 1 and finish; the plain spawner's ``--max-restarts``."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from expert_parallel.spawn import free_port
from tests.integration.test_launch import ROOT, SMALL, TORCHRUN, _metrics, _run

psutil = pytest.importorskip("psutil")

pytestmark = pytest.mark.slow

ARGS = ["--log-every", "5", "--ckpt-every", "5", "--resume", "auto", "--timeout-s", "20", *SMALL]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """OUT of the 20-step job that the restarted jobs must reproduce, run once for the module."""
    out = tmp_path_factory.mktemp("uninterrupted")
    result = _run([sys.executable, "-m", "launch.train", "--out", str(out), "--steps", "20", *ARGS])
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_a_killed_worker_is_restarted_by_torchrun_and_ends_with_the_uninterrupted_losses(uninterrupted: Path,
                                                                                          tmp_path: Path) -> None:
    full, failed = uninterrupted, tmp_path / "failed"
    result = _run([*TORCHRUN, "--standalone", "--nproc-per-node", "2", "--max-restarts", "1", "-m", "launch.train",
                   "--out", str(failed), "--steps", "20", "--simulate-failure", "1:12", *ARGS], timeout=300)
    assert result.returncode == 0, result.stderr[-5000:]
    assert "exitcode  : 3" not in result.stderr  # torchrun's failure report: the job did not end with the failure
    summary = json.loads((failed / "summary.json").read_text())
    # resumed from the last complete checkpoint (step10's background write may not have finished by step 12)
    assert summary["start_step"] in (5, 10) and summary["world_size"] == 2
    assert [r["loss"] for r in _metrics(failed)] == [r["loss"] for r in _metrics(full)]
    assert summary["final_loss"] == json.loads((full / "summary.json").read_text())["final_loss"]


def test_the_plain_spawner_restarts_a_dead_rank_once(uninterrupted: Path, tmp_path: Path) -> None:
    full, failed = uninterrupted, tmp_path / "failed"
    result = _run([sys.executable, "-m", "launch.train", "--out", str(failed), "--steps", "20", "--max-restarts", "1",
                   "--simulate-failure", "0:12", *ARGS])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "restarting the job (1 of --max-restarts 1)" in result.stderr
    assert json.loads((failed / "summary.json").read_text())["start_step"] in (5, 10)
    assert [r["loss"] for r in _metrics(failed)] == [r["loss"] for r in _metrics(full)]


def _latest_world_size(out: Path) -> int:
    """The world size that saved ``OUT/checkpoint/latest`` (0 before the first checkpoint)."""
    try:
        name = (out / "checkpoint" / "latest").read_text().strip()
        return json.loads((out / "checkpoint" / name / "manifest.json").read_text())["world_size"]
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def _kill_node(agent: subprocess.Popen) -> None:
    """SIGKILL a torchrun agent's process group and its workers (torchrun starts each worker in a
    session of its own, so killing the agent's group alone would leave them running)."""
    try:
        workers = psutil.Process(agent.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        workers = []
    for pid in [agent.pid, *(worker.pid for worker in workers)]:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    agent.wait()


def _after_listening(endpoint: str, first: subprocess.Popen, start: Callable[[], subprocess.Popen]) -> subprocess.Popen:
    """``start()`` once ``first`` accepts connections at ``endpoint`` (a loaded machine may take
    many seconds to start a torchrun agent)."""
    host, port = endpoint.split(":")
    deadline = time.monotonic() + 120
    while True:
        assert time.monotonic() < deadline and first.poll() is None, f"nothing listens at {endpoint}"
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    return start()


@pytest.mark.timeout(480)
def test_a_lost_node_leaves_the_other_to_resume_at_world_size_one_and_finish(tmp_path: Path) -> None:
    endpoint, steps = f"127.0.0.1:{free_port()}", 40

    def node() -> subprocess.Popen:  # its own process group: killing it kills the agent and its worker
        cmd = [*TORCHRUN, "--nnodes", "1:2", "--nproc-per-node", "1", "--max-restarts", "1", "--rdzv-backend", "c10d",
               "--rdzv-endpoint", endpoint, "--rdzv-id", "elastic", "--rdzv-conf", "last_call_timeout=3",
               "-m", "launch.train", "--out", str(tmp_path), "--steps", str(steps), *ARGS]
        return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    # the c10d rendezvous store lives in whichever agent binds the port first: the first node's,
    # as the second starts once it listens
    first = node()
    second = _after_listening(endpoint, first, node)
    try:
        deadline = time.monotonic() + 180
        while _latest_world_size(tmp_path) != 2:  # a checkpoint of the two-node job
            assert time.monotonic() < deadline and first.poll() is None, "no checkpoint at world size 2"
            time.sleep(0.05)
        _kill_node(second)  # the node is lost: its agent and everything it started
        output, _ = first.communicate(timeout=240)
        assert first.returncode == 0, output[-5000:]
    finally:
        for proc in (first, second):
            _kill_node(proc)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["world_size"], summary["ep_size"], summary["steps"]) == (1, 1, steps)
    assert 0 < summary["start_step"] < steps  # resumed from the two-node job's checkpoint
    records = _metrics(tmp_path)  # the two-node job's records after its checkpoint were dropped at the restart
    assert [r["step"] for r in records] == list(range(5, steps + 1, 5))


def test_resume_auto_keeps_the_saved_global_batch_when_the_world_size_divides_it(tmp_path: Path) -> None:
    from expert_parallel import MoEConfig, MoELayer
    from expert_parallel.checkpoint import mark_latest, save_checkpoint
    from expert_parallel.comm import expert_groups
    from launch.backends import TorchBackend
    from launch.train import build_parser

    args = build_parser().parse_args(["--out", str(tmp_path), "--batch-size", "4"])
    layer = MoELayer(MoEConfig(d_model=8, d_ff=16, num_experts=4))
    for name, global_batch in (("even", 12), ("odd", 5)):  # saved by a job of 3 ranks x 4 / of 5 x 1
        save_checkpoint(tmp_path / "checkpoint" / name, layer, extra={"step": 3, "global_batch": global_batch})
        mark_latest(tmp_path / "checkpoint", name)
        for keep in (False, True):  # this job: 2 ranks x --batch-size 4
            backend = TorchBackend(MoELayer(MoEConfig(d_model=8, d_ff=16, num_experts=4)), args, expert_groups(1), 0,
                                   2, 1)
            assert backend.load(keep_global_batch=keep) == 3
            kept = keep and name == "even"
            assert (backend.batch_size, backend.global_batch) == ((6, 12) if kept else (4, 8))


def test_the_default_ep_size_is_the_largest_that_divides_world_and_experts() -> None:
    from launch.elastic import resolve_ep_size
    from launch.train import build_parser

    for world in range(1, 17):
        for experts in (1, 4, 6, 8, 12):
            args = build_parser().parse_args(["--experts", str(experts)])
            largest = max(d for d in range(1, world + 1) if world % d == 0 and experts % d == 0)
            assert resolve_ep_size(args, world) == largest
    assert resolve_ep_size(build_parser().parse_args(["--ep-size", "2"]), 8) == 2  # a given one is kept
