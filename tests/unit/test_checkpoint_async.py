"""Asynchronous checkpoints (``async_save_checkpoint``) in one process: the state is the one at the
call, whatever training does while it is written; a save killed while its files are written leaves
``latest`` on the previous complete checkpoint, which still loads."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from expert_parallel.checkpoint import (
    CheckpointError,
    async_save_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    mark_latest,
)
from tests.unit.test_checkpoint_local import model, trained

ROOT = Path(__file__).resolve().parents[2]


def test_an_async_save_holds_the_state_at_the_call_while_training_goes_on(tmp_path: Path) -> None:
    net, optimizer = trained()
    expected = {name: p.detach().clone() for name, p in net.named_parameters()}
    moments = {name: optimizer.state[p]["exp_avg"].clone() for name, p in net.named_parameters()}
    pending = async_save_checkpoint(tmp_path / "c", net, optimizer, extra={"step": 1},
                                    on_complete=lambda: mark_latest(tmp_path, "c"))
    with torch.no_grad():  # the next steps change everything in place while the files are written
        for p in net.parameters():
            p.mul_(-3.0)
            optimizer.state[p]["exp_avg"].add_(1.0)
    assert pending.wait() == tmp_path / "c"
    assert latest_checkpoint(tmp_path) == tmp_path / "c"
    fresh = model(seed=1)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    assert load_checkpoint(tmp_path / "c", fresh, fresh_optimizer) == {"step": 1}
    for name, p in fresh.named_parameters():
        assert torch.equal(p, expected[name]), name
        assert torch.equal(fresh_optimizer.state[p]["exp_avg"], moments[name]), name


CHILD = textwrap.dedent("""
    import sys, time, torch
    from expert_parallel.checkpoint import async_save_checkpoint, mark_latest, store
    from tests.unit.test_checkpoint_local import trained
    root = sys.argv[1]
    net, optimizer = trained()
    async_save_checkpoint(f"{root}/step1", net, optimizer, extra={"step": 1},
                          on_complete=lambda: mark_latest(root, "step1")).wait()
    torch.save({name: p.detach().clone() for name, p in net.named_parameters()}, f"{root}/step1.pt")
    def stall(path):  # the storage files are written: stop here, before any manifest
        print("written", flush=True)
        time.sleep(600)
    store.file_digest = stall
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    async_save_checkpoint(f"{root}/step2", net, optimizer, extra={"step": 2},
                          on_complete=lambda: mark_latest(root, "step2")).wait()
""")


def test_a_save_killed_while_writing_leaves_latest_on_the_previous_checkpoint(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "written"
    finally:
        child.kill()  # SIGKILL, mid-save
        child.wait(timeout=60)
    assert list((tmp_path / "step2").glob("*.distcp"))  # its data was written...
    assert not (tmp_path / "step2" / "manifest.json").exists()  # ...but it is not complete
    assert latest_checkpoint(tmp_path) == tmp_path / "step1"
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "step2", model(seed=1))
    fresh = model(seed=1)
    assert load_checkpoint(latest_checkpoint(tmp_path), fresh) == {"step": 1}
    saved = torch.load(tmp_path / "step1.pt")
    for name, p in fresh.named_parameters():
        assert torch.equal(p, saved[name]), name
