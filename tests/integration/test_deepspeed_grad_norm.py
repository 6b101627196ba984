"""What DeepSpeed's ``gradient_clipping`` measures with our drop-in ``MoE`` at EP 2 on 2 ranks
(CPU, fp32, ZeRO 0, 1 and 2), against the norm of the single-process model's gradient of the same
mean loss, and what ``expert_parallel.comm.clip_grad_norm_`` measures on the engine's reduced
gradients (ZeRO 0, where they stay in ``param.grad``). docs/deepspeed.md reports the finding."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.harness import run_ranks

from . import deepspeed_helpers as helpers

STAGES = (0, 1, 2)


def norm_worker(rank: int, world: int) -> dict[str, Any]:
    """Spawned: per ZeRO stage, the norm the engine clips by in one step; with ZeRO 0 also our
    norm of the engine's reduced gradients (a bound it never reaches: nothing is scaled); this
    rank's starting weights."""
    from deepspeed.runtime.utils import clip_grad_norm_ as deepspeed_clip_grad_norm_

    from expert_parallel.comm import clip_grad_norm_, expert_groups

    helpers.init_deepspeed_comm()
    out: dict[str, Any] = {}
    for stage in STAGES:
        engine = helpers.make_engine("ours", world, stage, False, distinct_experts=True, **helpers.PARITY_MOE)
        if stage == 0:
            out["weights"] = {name: param.detach().clone() for name, param in engine.module.named_parameters()}
            out["first_expert"] = engine.module.moe.deepspeed_moe.first_expert
        torch.manual_seed(0)
        engine.backward(engine(*helpers.batch(rank, 0, False)))
        if stage == 0:  # the engine's fp32 clipping discards the norm: ask the function it calls
            out["ours"] = clip_grad_norm_(engine.module, 1e9, expert_groups(world)).item()
            out[stage] = float(deepspeed_clip_grad_norm_(engine.module.parameters(), 1e9, mpu=engine.mpu))
        engine.step()
        if stage:
            out[stage] = float(engine.get_global_grad_norm())
    return out


def _reference_norms(results: list[dict[str, Any]]) -> tuple[float, list[float]]:
    """The single-process model (EP 1, every expert) with the ranks' weights, and the gradient of
    the mean over the ranks of each rank's loss on its batch: its norm, and each rank's local norm
    (the dense gradient and that rank's experts' rows only)."""
    model = helpers.tiny_model_ep1()
    ranks = sorted(results, key=lambda r: r["first_expert"])
    with torch.no_grad():
        for name, param in model.named_parameters():
            rows = [r["weights"][name] for r in ranks]
            param.copy_(torch.cat(rows) if "experts" in name else rows[0])
    loss = 0.0
    for rank in range(len(results)):
        torch.manual_seed(0)
        loss = loss + model(*helpers.batch(rank, 0, False)) / len(results)
    loss.backward()
    grads = {name: param.grad for name, param in model.named_parameters()}
    local = [torch.nn.utils.get_total_norm([grad[r["first_expert"]:r["first_expert"] + len(r["weights"][name])]
                                            if "experts" in name else grad for name, grad in grads.items()]).item()
             for r in results]
    return torch.nn.utils.get_total_norm(list(grads.values())).item(), local


@pytest.mark.slow
def test_deepspeed_gradient_clipping_norm_against_the_single_process_model() -> None:
    pytest.importorskip("deepspeed")
    results = run_ranks(norm_worker, 2, timeout=240)
    expected, local = _reference_norms(results)
    for result in results:
        assert result["ours"] == pytest.approx(expected, rel=1e-5)  # ours: the whole model's, on every rank
        for stage in (1, 2):  # ZeRO 1 and 2 count each expert once: right
            assert result[stage] == pytest.approx(expected, rel=1e-5), stage
        # without ZeRO (fp32) DeepSpeed clips by the mean over the ranks of each rank's norm of the
        # dense gradient and its own experts': smaller than the model's (docs/deepspeed.md)
        assert result[0] == pytest.approx(sum(local) / len(local), rel=1e-5)
        assert result[0] < 0.9 * expected
