"""The drop-in ``MoE`` under ``deepspeed.initialize(mpu=...)``: DeepSpeed's tensor-parallel MoE
cases (ep_size, tp_size, enable_expert_tensor_parallelism, use_residual) on 4 gloo ranks.

As DeepSpeed's own test of its MoE asserts: each layer holds ``world / ep_size`` experts, and
DeepSpeed's expert model-parallel size is ``tp_size`` exactly when expert tensor parallelism is
on. Beyond that, one engine forward / backward / step per case: the ranks of a TP group (same
tokens) return the same output, the experts hold their TP slice, and the step changes them.
Without expert TP (where DeepSpeed's plain-expert MoE is exact) our layer's output and input
gradient equal DeepSpeed's own MoE under the same mpu. (DeepSpeed does not sum the partial outputs
of TP-split plain experts, so with expert TP the reference is the core test
tests/distributed/test_tensor_parallel.py.)
All cases run in one spawn, each with DeepSpeed's group state reset as a fresh process has it.
"""

from __future__ import annotations

import itertools
from typing import Any
from unittest import mock

import pytest
import torch
from torch import nn

deepspeed = pytest.importorskip("deepspeed")

from tests.harness import run_ranks  # noqa: E402
from tests.integration.deepspeed_helpers import init_deepspeed_comm  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

WORLD, HIDDEN = 4, 16
CASES = list(itertools.product([(1, 2), (1, 4), (2, 2)], (True, False), (True, False)))


class TensorParallelMPU:
    """A Megatron-style mpu: TP groups of consecutive ranks, data-parallel groups strided."""

    def __init__(self, tp_size: int) -> None:
        import torch.distributed as dist

        self.rank, self.world, self.tp_size = dist.get_rank(), dist.get_world_size(), tp_size
        for start in range(0, self.world, tp_size):  # new_group is collective: every rank, same order
            group = dist.new_group(list(range(start, start + tp_size)))
            if start <= self.rank < start + tp_size:
                self.tp_group = group
        for lane in range(tp_size):
            group = dist.new_group(list(range(lane, self.world, tp_size)))
            if self.rank % tp_size == lane:
                self.dp_group = group

    def get_model_parallel_rank(self) -> int:
        return self.rank % self.tp_size

    def get_model_parallel_world_size(self) -> int:
        return self.tp_size

    def get_model_parallel_group(self):
        return self.tp_group

    def get_data_parallel_rank(self) -> int:
        return self.rank // self.tp_size

    def get_data_parallel_world_size(self) -> int:
        return self.world // self.tp_size

    def get_data_parallel_group(self):
        return self.dp_group


def _run_case(rank: int, ep_size: int, tp_size: int, expert_tp: bool, use_residual: bool) -> dict[str, Any]:
    from deepspeed.utils import groups

    from expert_parallel.integrations.deepspeed import MoE

    groups._release_process_group_references()  # no groups, no mpu: as in a fresh process
    torch.manual_seed(0)  # the same expert slice template on every rank
    width = 4 * HIDDEN // tp_size  # the expert given is one TP slice, as in DeepSpeed's test
    expert = nn.Sequential(nn.Linear(HIDDEN, width), nn.ReLU(), nn.Linear(width, HIDDEN))
    model = MoE(hidden_size=HIDDEN, expert=expert, num_experts=WORLD, ep_size=ep_size, use_residual=use_residual,
                enable_expert_tensor_parallelism=expert_tp, min_capacity=0)
    optimizer = torch.optim.AdamW(params=model.parameters(), lr=1e-2)
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "steps_per_print": 10 ** 6}
    engine, *_ = deepspeed.initialize(config=config, model=model, optimizer=optimizer, dist_init_required=False,
                                      mpu=TensorParallelMPU(tp_size))
    before = engine.module.deepspeed_moe.experts.w1.detach().clone()
    x = torch.randn(4, 6, HIDDEN, generator=torch.Generator().manual_seed(rank // tp_size))  # one replica's tokens
    torch.manual_seed(rank // tp_size)  # the gate's draws: alike on the ranks of one TP group
    output, l_aux, _ = engine(x)
    engine.backward(output.pow(2).mean() + l_aux)
    engine.step()
    layer = engine.module.deepspeed_moe
    return {"num_local_experts": engine.num_local_experts,
            "expert_model_parallel_world_size": groups._get_expert_model_parallel_world_size(),
            "config": (layer.cfg.tp_size, layer.cfg.expert_tensor_parallel, layer.cfg.d_ff),
            "w1_shape": tuple(layer.experts.w1.shape), "stepped": not torch.equal(before, layer.experts.w1),
            "output": output.detach()}


def _gloo_all_gather_into_tensor(output: torch.Tensor, tensor: torch.Tensor, group=None, async_op: bool = False):
    """``deepspeed.comm.all_gather_into_tensor`` as gloo can run it: DeepSpeed's ``gather_tokens``
    gathers into a flat buffer, whose shape gloo rejects; a list all-gather fills the same buffer."""
    import torch.distributed as dist

    parts = list(output.view(dist.get_world_size(group), *tensor.shape).unbind(0))
    dist.all_gather(parts, tensor.contiguous(), group=group)


def _against_deepspeed(rank: int, ep_size: int, tp_size: int) -> dict[str, Any]:
    """DeepSpeed's MoE and ours (same weights, distinct experts) under an mpu without expert TP,
    where DeepSpeed splits the tokens of a TP group around its all-to-alls: outputs, input grads."""
    import copy

    from deepspeed.moe.layer import MoE as DeepSpeedMoE
    from deepspeed.utils import groups

    from expert_parallel.integrations.deepspeed import MoE

    groups._release_process_group_references()
    groups.mpu = TensorParallelMPU(tp_size)
    torch.manual_seed(0)
    expert = nn.Sequential(nn.Linear(HIDDEN, 4 * HIDDEN), nn.ReLU(), nn.Linear(4 * HIDDEN, HIDDEN))
    reference = DeepSpeedMoE(HIDDEN, expert, num_experts=WORLD, ep_size=ep_size)
    reference.set_deepspeed_parallelism()
    ep_rank = groups._get_expert_parallel_rank(reference.expert_group_name)
    with torch.no_grad():  # distinct experts per EP rank (alike on its replicas), so misrouting shows
        generator = torch.Generator().manual_seed(1 + ep_rank)
        for param in reference.deepspeed_moe.experts.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    ours = MoE(HIDDEN, copy.deepcopy(expert), num_experts=WORLD, ep_size=ep_size)
    ours.load_state_dict(reference.state_dict())
    ours.set_deepspeed_parallelism()
    out = {}
    gloo_gather = mock.patch.object(deepspeed.comm, "all_gather_into_tensor", _gloo_all_gather_into_tensor)
    for name, layer in (("deepspeed", reference), ("ours", ours)):
        # 32 tokens, top-1 of 4 experts: capacity 8, divisible by every tp_size (DeepSpeed asserts it)
        x = torch.randn(4, 8, HIDDEN, generator=torch.Generator().manual_seed(rank // tp_size)).requires_grad_()
        torch.manual_seed(rank // tp_size)  # random token selection: the same draws in both
        with gloo_gather:
            y, l_aux, _ = layer(x)
            (y.pow(2).sum() + l_aux).backward()
        out[name] = {"y": y.detach(), "x_grad": x.grad}
    return out


def deepspeed_tp_worker(rank: int, world: int, cases: list) -> list[dict[str, Any]]:
    """Spawned: every case in order (each builds its own mpu, groups and engine), and DeepSpeed's
    MoE beside ours for the cases without expert TP."""
    init_deepspeed_comm()
    results = []
    for (ep_size, tp_size), expert_tp, use_residual in cases:
        result = _run_case(rank, ep_size, tp_size, expert_tp, use_residual)
        if not expert_tp and not use_residual:
            result["against_deepspeed"] = _against_deepspeed(rank, ep_size, tp_size)
        results.append(result)
    return results


@pytest.fixture(scope="module")
def results():
    return run_ranks(deepspeed_tp_worker, WORLD, CASES, timeout=240)


@pytest.mark.parametrize("index", range(len(CASES)), ids=[
    f"ep{ep}-tp{tp}-{'etp' if etp else 'no_etp'}-{'residual' if res else 'plain'}" for (ep, tp), etp, res in CASES])
def test_moe_under_an_mpu_runs_deepspeeds_tensor_parallel_cases(results, index):
    (ep_size, tp_size), expert_tp, _ = CASES[index]
    per_rank = [r[index] for r in results]
    for rank, got in enumerate(per_rank):
        # DeepSpeed's own assertions
        assert got["num_local_experts"] == WORLD // ep_size
        assert got["expert_model_parallel_world_size"] == (tp_size if expert_tp else 1)
        # the layer took the mpu's TP group; experts hold their TP slice of d_ff (64) with expert TP
        assert got["config"] == (tp_size, expert_tp, 4 * HIDDEN if expert_tp else 4 * HIDDEN // tp_size)
        assert got["w1_shape"] == (WORLD // ep_size, HIDDEN, 4 * HIDDEN // tp_size)
        assert got["stepped"], f"rank {rank}: the engine step left the experts unchanged"
        assert torch.isfinite(got["output"]).all()
        # the ranks of one TP group hold the same tokens and must return the same output
        first = per_rank[rank // tp_size * tp_size]["output"]
        torch.testing.assert_close(got["output"], first, rtol=1e-5, atol=1e-6, msg=f"rank {rank} vs its TP group")
        if "against_deepspeed" in got:  # DeepSpeed's own MoE under the same mpu
            pair = got["against_deepspeed"]
            for key in ("y", "x_grad"):
                torch.testing.assert_close(pair["ours"][key], pair["deepspeed"][key], rtol=1e-5, atol=1e-6,
                                           msg=f"rank {rank} {key} vs DeepSpeed's MoE")
