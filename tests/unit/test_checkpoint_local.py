"""Topology-free checkpoints in one process (no process group): a round trip against the model's
own tensors, and the errors that name the tensor (missing, unexpected, shape, dtype, no manifest,
no optimizer state). The multi-rank resharding is in tests/distributed/test_checkpoint.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from expert_parallel import MoEConfig, MoELayer
from expert_parallel.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from expert_parallel.checkpoint.__main__ import main as cli


def model(num_experts: int = 4, d_model: int = 8, seed: int = 0, extra_layer: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    cfg = MoEConfig(d_model=d_model, d_ff=16, num_experts=num_experts, router="topk", top_k=2)
    layers = [nn.Linear(d_model, d_model), MoELayer(cfg)] + ([nn.Linear(d_model, d_model)] if extra_layer else [])
    return nn.Sequential(*layers)


def trained(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    net = model(seed=seed)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2)
    x = torch.randn(6, 8)
    net[1](net[0](x)).output.square().mean().backward()
    optimizer.step()
    return net, optimizer


def test_round_trip_restores_parameters_moments_rng_and_extra(tmp_path):
    net, optimizer = trained()
    torch.manual_seed(7)
    expected_rng = torch.get_rng_state()
    save_checkpoint(tmp_path / "c", net, optimizer, extra={"step": 3, "note": "x"})
    fresh, fresh_optimizer = model(seed=1), None
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=5.0)
    torch.manual_seed(99)
    assert load_checkpoint(tmp_path / "c", fresh, fresh_optimizer) == {"step": 3, "note": "x"}
    assert torch.equal(torch.get_rng_state(), expected_rng)
    for (name, a), b in zip(net.named_parameters(), fresh.parameters()):
        assert torch.equal(a, b), name
        for key, value in optimizer.state[a].items():
            assert torch.equal(value, fresh_optimizer.state[b][key]), f"{name}.{key}"
    assert fresh_optimizer.param_groups[0]["lr"] == 1e-2


@pytest.mark.parametrize("other, message", [
    (dict(num_experts=8), r"tensor 'model\.1\.experts\.w1' has shape \[4, 8, 16\] in the checkpoint but \[8, 8, 16\]"),
    (dict(extra_layer=True), r"tensor 'model\.2\.bias' is missing from the checkpoint \(2 missing in all\)"),
])
def test_a_model_that_differs_is_an_error_naming_the_tensor(tmp_path, other, message):
    save_checkpoint(tmp_path / "c", model())
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path / "c", model(**other))


def test_unexpected_tensors_dtype_and_missing_optimizer_state_are_named(tmp_path):
    save_checkpoint(tmp_path / "big", model(extra_layer=True))
    with pytest.raises(CheckpointError, match=r"holds 'model\.2\.bias' \(2 in all\), which the model does not have"):
        load_checkpoint(tmp_path / "big", model())
    save_checkpoint(tmp_path / "c", model())
    with pytest.raises(CheckpointError, match=r"'model\.0\.bias' is float32 in the checkpoint but bfloat16"):
        load_checkpoint(tmp_path / "c", model().to(torch.bfloat16))
    net = model()
    with pytest.raises(CheckpointError, match=r"saved without optimizer state; load without the optimizer"):
        load_checkpoint(tmp_path / "c", net, torch.optim.AdamW(net.parameters()))


def test_a_directory_without_manifest_is_an_unfinished_save(tmp_path):
    save_checkpoint(tmp_path / "c", model())
    (tmp_path / "c" / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="has no manifest.json: the save that wrote it did not finish"):
        load_checkpoint(tmp_path / "c", model())


def test_inspect_lists_logical_shapes_and_expert_tensors(tmp_path, capsys):
    save_checkpoint(tmp_path / "c", model())
    assert cli(["inspect", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "saved by 1 rank(s)" in out
    assert any(line.split()[:4] == ["model.1.experts.w1", "4x8x16", "float32", "experts"] for line in out.splitlines())
    assert cli(["inspect", str(tmp_path / "missing")]) == 2


def _flip_byte(path, at: int = 40) -> None:
    data = bytearray(path.read_bytes())
    data[at % len(data)] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_corrupted_metadata_file_is_named(tmp_path):
    save_checkpoint(tmp_path / "c", model())
    (tmp_path / "c" / ".metadata").write_bytes(b"\x80\x04\x95\xff\xfe not a pickle \xc3\x28")
    with pytest.raises(CheckpointError, match=r"\.metadata of .* is corrupted .*restore the file or load an earlier"):
        load_checkpoint(tmp_path / "c", model())


def test_inspect_verify_checks_every_checksum_and_names_the_file(tmp_path, capsys):
    save_checkpoint(tmp_path / "c", model())
    assert cli(["inspect", "--verify", str(tmp_path / "c")]) == 0
    assert "verified" in capsys.readouterr().out
    storage = next((tmp_path / "c").glob("*.distcp"))
    _flip_byte(storage, at=-1)  # a byte no tensor read checks before the file checksum
    assert cli(["inspect", "--verify", str(tmp_path / "c")]) == 2
    assert f"storage file {storage.name} of {tmp_path / 'c'} is corrupted" in capsys.readouterr().err
    save_checkpoint(tmp_path / "m", model())
    _flip_byte(tmp_path / "m" / ".metadata", at=-1)
    assert cli(["inspect", "--verify", str(tmp_path / "m")]) == 2
    assert ".metadata of" in capsys.readouterr().err


def test_the_core_cli_points_from_deepspeed_to_the_integration(tmp_path, capsys):
    assert cli(["from-deepspeed", str(tmp_path), str(tmp_path / "out"), "--model", "m:f"]) == 2
    assert "python -m expert_parallel.integrations.deepspeed from-deepspeed" in capsys.readouterr().err


def test_a_failed_overwrite_leaves_the_directory_unfinished_not_stale(tmp_path, monkeypatch):
    save_checkpoint(tmp_path / "c", model())

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("torch.distributed.checkpoint.save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "c", model(seed=3))
    with pytest.raises(CheckpointError, match="has no manifest.json"):
        load_checkpoint(tmp_path / "c", model())


def test_parameters_without_optimizer_state_at_save_have_none_after_load(tmp_path):
    net, optimizer = trained()  # net[2] does not exist; give the model a parameter no gradient reaches
    net.append(nn.Linear(8, 8))
    optimizer.add_param_group({"params": list(net[2].parameters())})
    assert not any(p in optimizer.state for p in net[2].parameters())
    save_checkpoint(tmp_path / "c", net, optimizer)
    fresh = model(seed=1, extra_layer=True)
    fresh_optimizer = torch.optim.AdamW(fresh[:2].parameters(), lr=1e-2)
    fresh_optimizer.add_param_group({"params": list(fresh[2].parameters())})
    load_checkpoint(tmp_path / "c", fresh, fresh_optimizer)
    assert not any(p in fresh_optimizer.state for p in fresh[2].parameters())
    for a, b in zip(net[1].parameters(), fresh[1].parameters()):
        assert torch.equal(optimizer.state[a]["exp_avg"], fresh_optimizer.state[b]["exp_avg"])
