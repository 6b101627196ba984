"""The launcher initialises the demo model once: every replicated weight (dense, routers, shared
experts) is the same on every rank, and each routed expert is its global expert, the same at any
EP size (``--preset deepseek`` at EP 2 used to start with per-rank shared experts and refuse its
first checkpoint)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from launch.corpus import CharCorpus
from launch.train import build_job, build_parser
from tests.harness import run_ranks

from .test_launch import SMALL, _run

FLAGS = ["--preset", "deepseek", "--experts", "4", "--layers", "2", *SMALL]


def _weights(rank: int, world: int, flags: list[str]) -> dict[str, torch.Tensor]:
    args = build_parser().parse_args(flags)
    model = build_job(args, CharCorpus.named(args.corpus), rank, world, torch.device("cpu")).backend.model
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def test_replicas_match_across_ranks_and_routed_experts_are_the_ep1_models_rows() -> None:
    ranks = run_ranks(_weights, 2, FLAGS, timeout=120)
    whole = _weights(0, 1, FLAGS)  # EP 1: every expert on one process
    routed = [name for name in whole if ".ffn.experts." in name]
    assert routed and any(".shared_experts." in name for name in whole)
    for name, param in whole.items():
        if name in routed:  # rank r holds global experts [2r, 2r + 2)
            for rank, weights in enumerate(ranks):
                assert torch.equal(weights[name], param[2 * rank:2 * rank + 2]), f"{name} on rank {rank}"
        else:
            assert torch.equal(ranks[0][name], ranks[1][name]), f"{name} differs between the ranks"
            assert torch.equal(ranks[0][name], param), f"{name} differs from the EP 1 model's"


@pytest.mark.slow
def test_deepseek_preset_at_ep2_trains_and_checkpoints(tmp_path: Path) -> None:
    result = _run([sys.executable, "-m", "launch.train", "--out", str(tmp_path), "--steps", "4", "--log-every", "2",
                   "--ckpt-every", "2", *FLAGS])
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "checkpoint" / "latest").read_text().strip() == "step4"


def test_deepspeed_drop_in_experts_are_drawn_per_global_expert() -> None:
    pytest.importorskip("deepspeed")
    from expert_parallel import MoEConfig
    from launch.model import DeepSpeedMoEFFN, seed_routed_experts

    def experts(ep_size: int, ep_rank: int) -> torch.Tensor:
        layer = DeepSpeedMoEFFN(MoEConfig(d_model=8, d_ff=16, num_experts=4, ep_size=ep_size, top_k=2))
        torch.manual_seed(3)
        seed_routed_experts(layer, ep_rank)
        return layer.moe.deepspeed_moe.experts.w1.detach()

    whole = experts(1, 0)  # DeepSpeed copies one template into every expert: these are distinct
    assert all(not torch.equal(whole[0], whole[e]) for e in range(1, 4))
    assert torch.equal(experts(2, 1), whole[2:])
