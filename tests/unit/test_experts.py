"""StackedExperts' initialisation: ``nn.Linear``'s default, expert by expert."""

from __future__ import annotations

import math

import pytest
import torch

from expert_parallel.experts import StackedExperts

D_MODEL, D_FF, NUM_EXPERTS = 16, 1024, 8  # fan-ins far apart: bounds 1/4 against 1/32


def _linear_bound(in_features: int) -> float:
    """``nn.Linear(in_features, out)`` draws its weight and bias from ``U(-sqrt(k), sqrt(k))``,
    ``k = 1 / in_features`` (torch's documented default)."""
    return math.sqrt(1.0 / in_features)


@pytest.mark.parametrize("gated", [False, True], ids=["ffn", "swiglu"])
def test_every_expert_weight_is_initialised_like_the_nn_linear_it_replaces(gated):
    torch.manual_seed(0)
    experts = StackedExperts(NUM_EXPERTS, D_MODEL, D_FF, gated=gated, bias=True)
    up, down = _linear_bound(D_MODEL), _linear_bound(D_FF)  # first Linear, second Linear
    bounds = {"w1": up, "b1": up, "w2": down, "b2": down}
    if gated:
        bounds["w3"] = up
    assert {name for name, _ in experts.named_parameters()} == set(bounds)
    for name, bound in bounds.items():
        value = getattr(experts, name).detach()
        per_expert = value.abs().flatten(1).amax(dim=1)
        assert (per_expert <= bound).all(), f"{name}: max |value| per expert {per_expert.tolist()} > {bound}"
        # U(-bound, bound): the largest of n draws is above 0.9 * bound unless 0.9^n (here < 1e-5)
        assert value.abs().max() > 0.9 * bound, f"{name}: max |value| {value.abs().max():.4f} << {bound}"
        assert abs(float(value.mean())) < 0.5 * bound, f"{name}: mean {float(value.mean()):.4f} not centred"
        assert not torch.equal(value[0], value[1]), f"{name}: experts 0 and 1 start identical"


def test_every_global_expert_gets_its_own_init_whatever_the_ep_size():
    # a shared seed (data parallelism) must not clone experts across EP ranks, and the EP=1
    # layer's expert g equals expert g of the EP rank holding it
    torch.manual_seed(0)
    whole = StackedExperts(4, 8, 16, gated=True, bias=True)
    for first in (0, 2):
        torch.manual_seed(0)
        shard = StackedExperts(2, 8, 16, gated=True, bias=True, first_expert=first)
        for name in ("w1", "w2", "w3", "b1", "b2"):
            assert torch.equal(getattr(shard, name), getattr(whole, name)[first:first + 2]), (name, first)
    assert not torch.equal(whole.w1[0], whole.w1[2])


def test_placing_experts_after_construction_gives_the_weights_of_their_global_ids():
    # build, then bind: experts built as 0.. and placed as 2.. hold what experts 2.. are given at
    # construction from the same seed (the expert-TP slice likewise), with no further global RNG draw
    torch.manual_seed(0)
    whole = StackedExperts(4, 8, 16, gated=True, bias=True, tp_size=2, tp_rank=1)
    torch.manual_seed(0)
    placed = StackedExperts(2, 8, 16, gated=True, bias=True, tp_size=2)
    after = torch.rand(1)
    placed.place(2, tp_rank=1)
    for name in ("w1", "w2", "w3", "b1", "b2"):
        assert torch.equal(getattr(placed, name), getattr(whole, name)[2:4]), name
    torch.manual_seed(0)
    StackedExperts(2, 8, 16, gated=True, bias=True, tp_size=2)
    assert torch.equal(torch.rand(1), after)


def test_grouped_experts_take_any_gradient_layout():
    # .sum() sends back a stride-0 gradient, which the grouped GEMM's own backward rejects
    experts = StackedExperts(2, 16, 32, gated=True, bias=True)
    x = torch.randn(10, 16, requires_grad=True)
    offsets = torch.tensor([4, 10], dtype=torch.int32)
    experts.grouped(x, offsets, torch.tensor([0] * 4 + [1] * 6)).sum().backward()
    x_ref = x.detach().requires_grad_()

    def through(expert: int, rows: torch.Tensor) -> torch.Tensor:
        return experts(rows.unsqueeze(0).expand(2, -1, -1))[expert]
    torch.cat([through(0, x_ref[:4]), through(1, x_ref[4:])]).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_grouped_experts_called_under_torch_compile_in_fp32_run_the_grouped_gemm_eagerly():
    # dynamo traces the grouped GEMM in bf16 only: in fp32 the call stays eager (a graph break),
    # and the result is the per-expert reference's
    experts = StackedExperts(2, 16, 32, gated=True)
    x = torch.randn(10, 16)
    offsets = torch.tensor([4, 10], dtype=torch.int32)
    compiled = torch.compile(lambda rows: experts.grouped(rows, offsets), backend="eager")
    with torch.no_grad():
        expected = torch.cat([experts(x[:4].unsqueeze(0).expand(2, -1, -1))[0],
                              experts(x[4:].unsqueeze(0).expand(2, -1, -1))[1]])
        torch.testing.assert_close(compiled(x), expected)
