"""``comm.clip_grad_norm_`` against the single-process model: EP 2 on 2 ranks; EP 2 x DP 2 and
TP 2 x EP 2 with expert TP and a column-parallel dense layer on 4 ranks.

Every rank builds the unsplit model from one seed and keeps its part (its experts' rows, with
expert TP their ``d_ff`` slice, its slice of the TP-split dense layer); the reference is that
unsplit model on one process, trained on the global batch (the mean loss over the data-parallel
replicas) and clipped by ``torch.nn.utils.clip_grad_norm_``. The returned norm must be bitwise the
same on every rank and equal the reference's; every rank's clipped gradients must be its part of
the reference's clipped gradients.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from expert_parallel import MoEConfig, MoELayer
from expert_parallel.comm import clip_grad_norm_, expert_groups, lookup, reduce_gradients, tp_gather
from tests.harness import run_ranks

D_MODEL, D_FF, NUM_EXPERTS = 8, 16, 4
# no token is dropped and the second choice is always taken: the split model routes as the whole one
MOE = dict(d_model=D_MODEL, d_ff=D_FF, num_experts=NUM_EXPERTS, top_k=2, second_policy="all", capacity_factor=4.0,
           expert_bias=True, num_shared_experts=1)
MAX_NORM = 0.02
NORMS = (2.0, math.inf)


class Net(nn.Module):
    """``out(moe(tanh(inp(x))))``; with ``tp_ranks`` the ``inp`` layer is column-parallel: this TP
    rank holds rows ``[t * D/tp, (t+1) * D/tp)`` of its weight and bias, outputs all-gathered."""

    def __init__(self, cfg: MoEConfig, tp_ranks: tuple[int, ...] = (0,)) -> None:
        super().__init__()
        self.tp_ranks = tp_ranks
        self.inp = nn.Linear(D_MODEL, D_MODEL // len(tp_ranks))
        self.moe = MoELayer(cfg)
        self.out = nn.Linear(D_MODEL, D_MODEL)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = tp_gather(self.inp(x), -1, lookup(self.tp_ranks))
        return self.out(self.moe(torch.tanh(hidden)).output)


def _batch(replica: int) -> torch.Tensor:
    return torch.randn(2, 6, D_MODEL, generator=torch.Generator().manual_seed(40 + replica))


def _loss(net: nn.Module, replica: int) -> torch.Tensor:
    return net(_batch(replica)).pow(2).mean()


def _whole() -> Net:
    torch.manual_seed(5)
    return Net(MoEConfig(**MOE))


def _part(name: str, full: torch.Tensor, shape: torch.Size, ep_position: int, tp_position: int) -> torch.Tensor:
    """This rank's part of an unsplit tensor: expert rows (dim 0) by EP position, any other narrower
    dimension (the d_ff slice of expert TP, the column-parallel rows) by TP position."""
    for dim, (mine, theirs) in enumerate(zip(shape, full.shape)):
        if mine != theirs:
            position = ep_position if name.startswith("moe.experts.") and dim == 0 else tp_position
            full = full.narrow(dim, position * mine, mine)
    return full


def clip_worker(rank: int, world: int, ep: int, tp: int) -> dict[str, Any]:
    """Spawned: for each norm, this rank's part of the model on its replica's batch, reduced and
    clipped; the returned norm and the clipped gradients."""
    whole = _whole()
    cfg = MoEConfig(**MOE, ep_size=ep, tp_size=tp, expert_tensor_parallel=tp > 1)
    groups = expert_groups(ep, tp, tp > 1)
    ep_position, tp_position = groups.ep_ranks.index(rank), groups.tp_ranks.index(rank)
    out: dict[str, Any] = {"whole": whole.state_dict(), "ep": ep_position, "tp": tp_position}
    for norm_type in NORMS:
        net = Net(cfg, groups.tp_ranks)
        with torch.no_grad():
            for name, param in net.named_parameters():
                param.copy_(_part(name, whole.state_dict()[name], param.shape, ep_position, tp_position))
        _loss(net, rank // tp).backward()
        reduce_gradients(net, groups)
        split = [net.inp.weight, net.inp.bias] if tp > 1 else []
        norm = clip_grad_norm_(net, MAX_NORM, groups, norm_type, tensor_parallel=split)
        out[norm_type] = {"norm": norm, "grads": {n: p.grad.clone() for n, p in net.named_parameters()}}
    return out


def _check(results: list[dict[str, Any]], replicas: int) -> None:
    whole = _whole()
    whole.load_state_dict(results[0]["whole"])
    for norm_type in NORMS:
        whole.zero_grad()
        (sum(_loss(whole, replica) for replica in range(replicas)) / replicas).backward()
        expected = torch.nn.utils.clip_grad_norm_(whole.parameters(), MAX_NORM, norm_type)
        assert expected > 2 * MAX_NORM  # the clip scales the gradients
        norms = [r[norm_type]["norm"] for r in results]
        assert all(torch.equal(norm, norms[0]) for norm in norms), f"ranks disagree on the norm: {norms}"
        assert_close(norms[0], expected, rtol=1e-5, atol=0)
        clipped = {n: p.grad for n, p in whole.named_parameters()}
        for rank, result in enumerate(results):
            for name, grad in result[norm_type]["grads"].items():
                assert_close(grad, _part(name, clipped[name], grad.shape, result["ep"], result["tp"]), rtol=1e-5,
                             atol=1e-7, msg=lambda m, n=name, r=rank, p=norm_type: f"rank {r}, {n}, norm {p}: {m}")


def test_ep2_norm_and_clipped_gradients_equal_the_single_process_models() -> None:
    _check(run_ranks(clip_worker, 2, 2, 1, timeout=120), replicas=2)


@pytest.mark.slow
@pytest.mark.parametrize("ep, tp", [(2, 1), (2, 2)], ids=["ep2-dp2", "tp2-ep2-expert-tp"])
def test_four_ranks_norm_and_clipped_gradients_equal_the_single_process_models(ep: int, tp: int) -> None:
    _check(run_ranks(clip_worker, 4, ep, tp, timeout=120), replicas=4 // tp)
