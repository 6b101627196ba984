"""The benchmark's DeepSpeed AutoEP baseline computes what our layer computes.

``benchmarks.baselines.autoep_moe`` hands DeepSpeed a one-block Mixtral and times the block
AutoEP puts in its place. Before its numbers mean anything next to ours, it must be the same
function: with AutoEP's weights copied into a dropless Mixtral ``MoELayer`` (EP over the same 2
gloo ranks, the same expert slice per rank), outputs and gradients must agree. AutoEP is the
independent reference here (DeepSpeed's code, Hugging Face's Mixtral weights layout).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

from benchmarks.baselines import autoep_moe, autoep_status  # noqa: E402
from benchmarks.shapes import SHAPES, RunSpec, Shape  # noqa: E402
from expert_parallel import MoELayer, presets  # noqa: E402
from tests.harness import run_ranks  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

SHAPE = Shape(d_model=32, d_ff=48, experts=8, top_k=2, tokens=64)


def _compare(rank: int, world: int) -> dict[str, torch.Tensor]:
    spec = RunSpec(preset="mixtral-test", shape=SHAPE)
    block, why_not = autoep_moe(spec, world, torch.device("cpu"))
    assert block is not None, why_not
    autoep = block.block
    layer = MoELayer(presets.mixtral(SHAPE.d_model, SHAPE.d_ff, SHAPE.experts, ep_size=world))
    with torch.no_grad():  # AutoEP stores experts as [E_local, F, D] / [E_local, D, F] (Linear layout)
        layer.router.weight.copy_(autoep.router.gate.weight)
        layer.experts.w1.copy_(autoep.experts.w1.transpose(1, 2))
        layer.experts.w3.copy_(autoep.experts.w3.transpose(1, 2))
        layer.experts.w2.copy_(autoep.experts.w2.transpose(1, 2))
    generator = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(SHAPE.tokens, SHAPE.d_model, generator=generator)
    probe = torch.randn(SHAPE.tokens, SHAPE.d_model, generator=generator)
    out = {}
    for name, module, w1_grad in (("ours", layer, lambda: layer.experts.w1.grad),
                                  ("autoep", block, lambda: autoep.experts.w1.grad.transpose(1, 2))):
        x_in = x.clone().requires_grad_()
        y = module(x_in)[0]
        (y * probe).sum().backward()
        out[name] = {"y": y.detach(), "x_grad": x_in.grad, "w1_grad": w1_grad()}
    return out


def _compare_and_bf16_step(rank: int, world: int) -> tuple[dict[str, torch.Tensor], tuple[set, torch.dtype]]:
    """Spawned: both checks in one start-up of the ranks (each imports DeepSpeed and transformers)."""
    return _compare(rank, world), _bf16_step(rank, world)


@pytest.fixture(scope="module")
def autoep_runs() -> list[tuple[dict[str, torch.Tensor], tuple[set, torch.dtype]]]:
    return run_ranks(_compare_and_bf16_step, 2, timeout=240)


def test_autoep_block_matches_a_dropless_mixtral_layer_on_two_ranks(autoep_runs):
    for rank, (result, _) in enumerate(autoep_runs):
        ours, ref = result["ours"], result["autoep"]
        assert ref["y"].abs().max() > 0
        for key in ("y", "x_grad", "w1_grad"):
            torch.testing.assert_close(ours[key], ref[key], rtol=1e-4, atol=1e-6,
                                       msg=lambda m, key=key, rank=rank: f"rank {rank} {key}: {m}")


def _bf16_step(rank: int, world: int) -> tuple[set, torch.dtype]:
    block, why_not = autoep_moe(RunSpec(preset="mixtral-test", shape=SHAPE, dtype="bf16"), world, torch.device("cpu"))
    assert block is not None, why_not
    x = torch.randn(SHAPE.tokens, SHAPE.d_model, dtype=torch.bfloat16, requires_grad=True)
    y, aux_loss = block(x)
    (y.float().sum() + aux_loss).backward()
    return {p.dtype for p in block.parameters()}, x.grad.dtype


def test_autoep_block_builds_and_steps_in_bf16(autoep_runs):
    for _, (dtypes, grad_dtype) in autoep_runs:
        assert dtypes == {torch.bfloat16} and grad_dtype == torch.bfloat16


def test_autoep_status_names_why_a_preset_is_not_measured():
    def status(preset: str, **options) -> str:
        return autoep_status(RunSpec(preset=preset, shape=SHAPES[preset], **options))

    assert status("mixtral-small") == "" and status("fine-grained-small") == ""
    assert "SwiGLU" in status("switch-small")  # ReLU FFN experts: not a Mixtral
    assert "fp16" in status("mixtral-small", dtype="fp16")
