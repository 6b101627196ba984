"""Under ``deepspeed.initialize``: training parity with DeepSpeed's MoE, ZeRO 0/1/2, fp32 and bf16,
gradient clipping, and engine checkpoints (2 gloo ranks on CPU)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("deepspeed")

from tests.harness import RankError, run_ranks  # noqa: E402
from tests.integration import deepspeed_helpers as helpers  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

STEPS = 4
# (ep_size, ZeRO stage, bf16) on 2 ranks: ep 2, and ep 1 x dp 2
RUNS = [(2, 0, False), (2, 1, False), (2, 2, False), (1, 0, False), (1, 1, False), (1, 2, False),
        (2, 1, True), (2, 2, True), (1, 0, True), (1, 2, True)]


@pytest.fixture(scope="module")
def training() -> list[dict]:
    return run_ranks(helpers.engine_training_worker, 2, RUNS, STEPS, timeout=280)


@pytest.mark.parametrize("run", RUNS, ids=[f"ep{ep}-zero{stage}-{'bf16' if bf16 else 'fp32'}"
                                          for ep, stage, bf16 in RUNS])
def test_loss_matches_deepspeeds_moe_step_by_step(training, run):
    bf16 = run[2]
    for rank_losses in training:
        ours, ref = rank_losses[run]["ours"], rank_losses[run]["deepspeed"]
        tolerance = dict(rtol=0.0, atol=5e-3) if bf16 else dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.tensor(ours), torch.tensor(ref), **tolerance)
        assert ours[-1] < ours[0], f"loss did not decrease: {ours}"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> list[dict]:
    directory = str(tmp_path_factory.mktemp("ckpt"))
    results = run_ranks(helpers.checkpoint_worker, 2, directory, 1, timeout=240)
    return [{**result, "directory": directory} for result in results]


def test_save_load_gives_bit_identical_parameters_and_the_same_next_loss(checkpoint):
    for result in checkpoint:
        assert result["reloaded"].keys() == result["saved"].keys()
        for name, value in result["saved"].items():
            assert torch.equal(result["reloaded"][name], value), name
        assert result["reloaded_loss"] == result["next_loss"]


def test_engine_writes_one_file_per_global_expert(checkpoint):
    files = checkpoint[0]["files"]
    assert [f"layer_0_expert_{e}_mp_rank_00_model_states.pt" in files for e in range(4)] == [True] * 4


def test_weights_saved_at_ep2_load_at_ep1_and_compute_the_same_function(checkpoint):
    for result in checkpoint:
        assert result["ep1_same_weights"]
        torch.testing.assert_close(result["ep1_output"], result["ep2_output"], rtol=1e-5, atol=1e-6)


def test_weights_saved_at_ep1_load_at_ep2_as_each_ranks_slice_of_global_experts(checkpoint):
    for rank, per_rank in enumerate(checkpoint):
        result = per_rank["ep1_to_ep2"]
        saved, loaded, local = result["saved"], result["loaded"], result["num_local_experts"]
        assert local == 2 and loaded.keys() == saved.keys()
        experts = [name for name in saved if ".experts." in name]
        assert experts, "no expert parameters found"
        for name in experts:  # stacked [E, ...] at ep 1, [E_local, ...] at ep 2
            assert saved[name].shape[0] == 4, name
            part = saved[name][rank * local:(rank + 1) * local]
            assert torch.equal(loaded[name], part), f"rank {rank}: {name} is not global experts " \
                f"{rank * local}..{(rank + 1) * local - 1} of the ep-1 checkpoint"
            assert not torch.equal(part[0], part[1]), f"{name}: the experts are not distinct; the check is blind"
        for name in saved.keys() - set(experts):
            assert torch.equal(loaded[name], saved[name]), f"rank {rank}: {name}"


def test_weights_saved_at_ep1_compute_the_same_function_at_ep2(checkpoint):
    for rank, per_rank in enumerate(checkpoint):
        result = per_rank["ep1_to_ep2"]
        torch.testing.assert_close(result["ep2_output"], result["ep1_output"], rtol=1e-5, atol=1e-6,
                                   msg=lambda m, r=rank: f"rank {r}: {m}")


def test_engine_checkpoint_converts_to_a_topology_free_one_with_every_expert_in_place(checkpoint, tmp_path):
    from expert_parallel.checkpoint import load_checkpoint, read_manifest
    from expert_parallel.checkpoint.__main__ import main as core_cli
    from expert_parallel.integrations.deepspeed.__main__ import main as cli

    out = tmp_path / "converted"
    assert core_cli(["from-deepspeed", checkpoint[0]["directory"], str(out)]) == 2  # points to the integration
    assert not out.exists()
    assert cli(["from-deepspeed", checkpoint[0]["directory"], str(out), "--tag", "step2",
                "--model", "tests.integration.deepspeed_helpers:tiny_model_ep1"]) == 0
    assert not any(key.startswith("optim.") for key in read_manifest(out)["tensors"])  # weights only, as documented
    model = helpers.tiny_model_ep1(seed=77)
    assert load_checkpoint(out, model) == {"converted_from": f"{checkpoint[0]['directory']}/step2"}
    loaded = dict(model.named_parameters())
    for rank, result in enumerate(checkpoint):  # rank r's experts are rows 2r, 2r+1 of the logical tensors
        for name, value in result["saved"].items():
            whole = loaded[name].detach()
            assert torch.equal(whole[2 * rank:2 * rank + 2] if ".experts." in name else whole, value), name


def test_zero3_is_rejected_by_deepspeed_with_a_clear_message():
    with pytest.raises(RankError, match="not supported with ZeRO Stage 3"):
        run_ranks(helpers.zero3_worker, 1, timeout=120)
