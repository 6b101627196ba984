"""TP 2 x EP 2 on 4 ranks equals the unsplit single-process layer.

World 4: TP groups (0, 1), (2, 3) each hold one data-parallel replica's tokens; EP groups (0, 2),
(1, 3). With and without expert tensor parallelism, with padded and filled expert compute, for
GShard and top-k routers: every rank's output and input gradient equal the unsplit layer's on its
replica, and after ``reduce_gradients`` the router, shared-expert and expert gradients (slice-wise:
this rank's experts, and with expert TP its ``d_ff`` slice) equal the mean over the replicas of
the unsplit layer's. The TP-split layer is built from the same seed as the unsplit one, so its
experts are checked to be slices of the unsplit experts too.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
from torch.testing import assert_close

from expert_parallel import MoEConfig, MoELayer
from expert_parallel.comm import expert_groups, reduce_gradients
from tests.harness import run_ranks

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

TP, EP, WORLD = 2, 2, 4
D_MODEL, D_FF, NUM_EXPERTS = 8, 16, 4
ROUTERS = {
    # capacity 4 of 8 even-split slots: tokens drop; the random 2nd expert draws the same u everywhere
    "gshard-ffn-bias": dict(router="gshard", capacity_factor=0.5, min_capacity=0, expert_bias=True),
    "topk-swiglu-shared": dict(router="topk", top_k=2, capacity_factor=0.75, min_capacity=0, expert="swiglu",
                               num_shared_experts=1),
}
CASES = [(name, etp, compute) for name, etp, compute in
         itertools.product(ROUTERS, (True, False), ("padded", "filled"))]
# the dimension of d_ff in each expert parameter (b2 is not split)
D_FF_DIM = {"w1": 2, "w3": 2, "b1": 1, "w2": 1}
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


def _config(name: str, compute: str) -> MoEConfig:
    return MoEConfig(d_model=D_MODEL, d_ff=D_FF, num_experts=NUM_EXPERTS, expert_compute=compute, **ROUTERS[name])


def _replica_data(replica: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(50 + replica)
    return torch.randn(2, 8, D_MODEL, generator=generator), torch.randn(2, 8, D_MODEL, generator=generator)


def _run(layer: MoELayer, replica: int) -> dict[str, Any]:
    x, cotangent = _replica_data(replica)
    x.requires_grad_()
    torch.manual_seed(100 + replica)  # the router's draws: alike on the ranks of one TP group
    out = layer(x)
    ((out.output * cotangent).sum() + out.aux_loss).backward()
    return {"y": out.output.detach(), "aux": out.aux_loss.detach(), "x_grad": x.grad,
            "capacity": int(out.stats.capacity), "wire_bytes": int(out.stats.wire_bytes)}


def tp_worker(rank: int, world: int, cases: list[tuple[str, bool, str]]) -> list[dict[str, Any]]:
    """Spawned: each case's TP x EP layer (built from seed 11), run on this rank's replica, reduced."""
    results = []
    for name, etp, compute in cases:
        cfg = _config(name, compute).replace(ep_size=EP, tp_size=TP, expert_tensor_parallel=etp)
        torch.manual_seed(11)
        layer = MoELayer(cfg)
        groups = expert_groups(EP, TP, etp)
        params = {n: p.detach().clone() for n, p in layer.named_parameters()}
        result = _run(layer, rank // TP)
        reduce_gradients(layer, groups)
        result.update(params=params, grads={n: p.grad.clone() for n, p in layer.named_parameters()},
                      ep_rank=groups.ep_ranks.index(rank), tp_rank=groups.tp_ranks.index(rank),
                      tp_ranks=groups.tp_ranks, filled=layer.filled_compute)
        results.append(result)
    return results


@pytest.fixture(scope="module")
def results():
    return run_ranks(tp_worker, WORLD, CASES, timeout=120)


def _slice(name: str, full: torch.Tensor, ep_rank: int, tp_rank: int, etp: bool) -> torch.Tensor:
    """This rank's part of an unsplit parameter: its experts, and with expert TP its d_ff slice."""
    if not name.startswith("experts."):
        return full
    local = NUM_EXPERTS // EP
    part = full[ep_rank * local:(ep_rank + 1) * local]
    param = name.split(".")[1]
    if etp and param in D_FF_DIM:
        width = D_FF // TP
        part = part.narrow(D_FF_DIM[param], tp_rank * width, width)
    return part


@pytest.mark.parametrize("index", range(len(CASES)), ids=["-".join(map(str, c)).replace("True", "etp").replace(
    "False", "no_etp") for c in CASES])
def test_tp2_ep2_forward_backward_equals_the_unsplit_layer(results, index):
    name, etp, compute = CASES[index]
    torch.manual_seed(11)
    reference = MoELayer(_config(name, compute))
    runs = []
    for replica in range(WORLD // TP):
        reference.zero_grad()
        run = _run(reference, replica)
        run["grads"] = {n: p.grad.clone() for n, p in reference.named_parameters()}
        runs.append(run)
    mean_grads = {n: sum(run["grads"][n] for run in runs) / len(runs) for n in runs[0]["grads"]}
    full_params = dict(reference.named_parameters())
    for rank, per_rank in enumerate(results):
        got, want = per_rank[index], runs[rank // TP]
        assert got["tp_ranks"] == (rank // TP * TP, rank // TP * TP + 1)
        assert got["filled"] == (compute == "filled")
        assert got["capacity"] == want["capacity"] and got["capacity"] % TP == 0
        assert_close(got["y"], want["y"], **TOLERANCE, msg=f"rank {rank} output")
        assert_close(got["aux"], want["aux"], **TOLERANCE)
        assert_close(got["x_grad"], want["x_grad"], **TOLERANCE, msg=f"rank {rank} input gradient")
        assert got["params"].keys() == mean_grads.keys()
        for param in mean_grads:
            expect = _slice(param, full_params[param].detach(), got["ep_rank"], got["tp_rank"], etp)
            assert torch.equal(got["params"][param], expect), f"rank {rank} {param}: not the unsplit init's slice"
            expect = _slice(param, mean_grads[param], got["ep_rank"], got["tp_rank"], etp)
            assert_close(got["grads"][param], expect, **TOLERANCE, msg=f"rank {rank} {param} gradient")


def test_each_tp_rank_reports_the_bytes_of_its_share_of_the_slots(results):
    # a rank sends the other EP rank's experts, C / TP slots each: (E - E_local) * C / TP * D * 4
    for rank_results in results:
        for case, result in zip(CASES, rank_results):
            expected = (NUM_EXPERTS - NUM_EXPERTS // EP) * result["capacity"] // TP * D_MODEL * 4
            assert result["wire_bytes"] == expected, case
