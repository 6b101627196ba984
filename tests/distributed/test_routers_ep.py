"""Every router of issue 6 over EP=2 on gloo equals the EP=1 layer with the same full weights.

One spawn runs every case on two ranks. Each rank holds its slice of the routed experts and the
whole router and shared experts; the parent then runs the EP=1 layer on each rank's tokens with the
same RNG seed (so jitter, noisy top-k noise and GShard uniforms draw the same values) and compares
outputs, aux losses, per-expert counts and gradients: the gradient of a routed expert on EP rank q
is the sum over the group's ranks of the EP=1 gradients of q's slice; dense parameters (router,
noise projection, shared experts) get this rank's own gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch.testing import assert_close

from expert_parallel import MoEConfig, MoELayer
from tests.harness import run_ranks

pytestmark = pytest.mark.distributed

EP = 2


@dataclass(frozen=True)
class RouterCase:
    name: str
    options: dict
    tokens: tuple = (12, 12)
    train: bool = True
    seed: int = 0
    fields: dict = field(default_factory=lambda: dict(d_model=8, d_ff=12, num_experts=4, min_capacity=1))

    def config(self, ep_size: int) -> MoEConfig:
        return MoEConfig(**self.fields, **self.options, ep_size=ep_size)


CASES = [
    RouterCase("topk3-normalized-drops", dict(router="topk", top_k=3, normalize_topk=True, capacity_factor=0.6,
                                               aux_loss_weight=0.1), seed=1),
    RouterCase("mixtral-topk2-gate-after-swiglu-no-drops",
               dict(router="topk", top_k=2, gate_after_topk=True, expert="swiglu", drop_tokens=False), seed=2),
    RouterCase("noisy-topk2-train-jitter", dict(router="noisy_topk", top_k=2, importance_loss_weight=0.2,
                                                 load_loss_weight=0.3, jitter_eps=0.1, capacity=12), seed=3),
    RouterCase("noisy-topk2-eval", dict(router="noisy_topk", top_k=2, importance_loss_weight=0.2,
                                         load_loss_weight=0.3, capacity=12), train=False, seed=4),
    RouterCase("soft-uneven", dict(router="soft", expert_bias=True), tokens=(5, 9), seed=5),
    RouterCase("expert-choice-uneven", dict(router="expert_choice", capacity_factor=1.0), tokens=(6, 14),
               seed=6),
    RouterCase("expert-choice-eval-fixed-capacity", dict(router="expert_choice", capacity=3), train=False,
               seed=7),
    RouterCase("deepseek-shared-experts-z-loss",
               dict(router="topk", top_k=3, num_shared_experts=2, d_ff_shared=6, expert="swiglu",
                    z_loss_weight=0.05, capacity_factor=1.0), seed=8,
               fields=dict(d_model=8, d_ff=4, num_experts=8, min_capacity=1)),
    RouterCase("deepseek-v3-sigmoid-groups-selection-bias-router-bias-gated-shared",
               dict(router="topk", top_k=3, scoring_func="sigmoid", n_group=4, topk_group=2, group_score="top2_sum",
                    normalize_topk=True, routed_scaling_factor=2.5, bias_update_rate=1e-3, router_bias=True,
                    num_shared_experts=1, shared_expert_gate=True, expert="swiglu", capacity_factor=1.0), seed=10,
               fields=dict(d_model=8, d_ff=4, num_experts=8, min_capacity=1)),
    RouterCase("switch-jitter-z-loss", dict(router="switch", jitter_eps=0.2, z_loss_weight=0.1,
                                             capacity_factor=4.0), seed=9),
]


def full_state(case: RouterCase) -> dict[str, torch.Tensor]:
    """The EP=1 layer's parameters, made decisive and clearly non-zero."""
    torch.manual_seed(case.seed)
    layer = MoELayer(case.config(1))
    with torch.no_grad():
        layer.router.weight.mul_(3.0)
        for name, param in layer.named_parameters():
            if name == "router.noise_weight" or name.endswith(("b1", "b2")):
                param.normal_()
            if name == "router.bias":
                param.normal_(0.0, 0.5)
        if layer.router.selection_bias is not None:
            layer.router.selection_bias.normal_(0.0, 0.3)
    return {k: v.clone() for k, v in layer.state_dict().items()}


def _tokens(case: RouterCase, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(case.seed * 100 + rank)
    d_model = case.fields["d_model"]
    return (torch.randn(case.tokens[rank], d_model, generator=gen),
            torch.randn(case.tokens[rank], d_model, generator=gen))


def run_layer(case: RouterCase, rank: int, ep_size: int, state: dict) -> dict[str, Any]:
    """Forward + backward of ``case`` on ``rank``'s tokens with ``state`` sliced for this EP rank."""
    layer = MoELayer(case.config(ep_size))
    local = layer.cfg.num_local_experts
    ep_rank = rank % ep_size
    own = {k: v[ep_rank * local:(ep_rank + 1) * local] if k.startswith("experts.") else v
           for k, v in state.items()}
    layer.load_state_dict(own)
    layer.train(case.train)
    x, cotangent = _tokens(case, rank)
    x.requires_grad_()
    torch.manual_seed(case.seed * 1000 + rank)  # the draws of jitter, noise, GShard uniforms
    out = layer(x)
    ((out.output * cotangent).sum() + out.aux_loss).backward()
    grads = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in layer.named_parameters()}
    return {"y": out.output.detach(), "aux": out.aux_loss.detach(), "x_grad": x.grad.clone(), "grads": grads,
            "counts": out.stats.tokens_per_expert, "dropped": out.stats.dropped_fraction}


def run_all(rank: int, world_size: int, states: list[dict]) -> list[dict[str, Any]]:
    return [run_layer(case, rank, world_size, state) for case, state in zip(CASES, states)]


@pytest.fixture(scope="module")
def states():
    return [full_state(case) for case in CASES]


@pytest.fixture(scope="module")
def ep2_results(states):
    return run_ranks(run_all, EP, states, timeout=90)


@pytest.mark.parametrize("index", range(len(CASES)), ids=[c.name for c in CASES])
def test_ep2_equals_ep1_for_every_router(ep2_results, states, index):
    case, state = CASES[index], states[index]
    refs = [run_layer(case, rank, 1, state) for rank in range(EP)]
    local = case.config(EP).num_local_experts
    for rank in range(EP):
        got, ref, where = ep2_results[rank][index], refs[rank], f"{case.name} rank {rank}"
        _close(got["y"], ref["y"], f"{where}: output")
        _close(got["aux"], ref["aux"], f"{where}: aux")
        _close(got["x_grad"], ref["x_grad"], f"{where}: x grad")
        assert torch.equal(got["counts"], ref["counts"]), where
        for name, grad in got["grads"].items():
            if name.startswith("experts."):
                part = slice(rank * local, (rank + 1) * local)
                want = sum(r["grads"][name][part] for r in refs)
            else:
                want = ref["grads"][name]
            _close(grad, want, f"{where}: {name} grad")


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert_close(actual, expected, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")


def test_cases_exercise_what_their_names_say(ep2_results):
    by_name = {case.name: [ep2_results[r][i] for r in range(EP)] for i, case in enumerate(CASES)}
    assert any(float(r["dropped"]) > 0 for r in by_name["topk3-normalized-drops"])
    for name in ("mixtral-topk2-gate-after-swiglu-no-drops", "soft-uneven", "expert-choice-uneven"):
        assert all(float(r["dropped"]) == 0 for r in by_name[name]), name
    # expert choice: every expert of rank r takes ceil(S_r * 1.0 / 4) of its tokens
    assert [r["counts"].tolist() for r in by_name["expert-choice-uneven"]] == [[2] * 4, [4] * 4]
    assert all(r["grads"]["router.noise_weight"].abs().sum() > 0 for r in by_name["noisy-topk2-train-jitter"])
    deepseek = by_name["deepseek-v3-sigmoid-groups-selection-bias-router-bias-gated-shared"]
    assert all(r["grads"][name].abs().sum() > 0 for r in deepseek for name in ("router.bias", "shared_gate.weight"))
