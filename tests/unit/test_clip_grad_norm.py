"""``comm.clip_grad_norm_`` on one process: torch's norm and clip, its argument checks, a model
without gradients and a non-finite norm (the multi-rank counting: tests/distributed)."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from torch import nn

from expert_parallel import MoEConfig, MoELayer
from expert_parallel.comm import clip_grad_norm_, expert_groups, grad_norm


def _layer_with_grads() -> tuple[MoELayer, MoELayer]:
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(d_model=8, d_ff=16, num_experts=4, num_shared_experts=1))
    layer(torch.randn(12, 8)).output.pow(2).sum().backward()
    twin = copy.deepcopy(layer)
    for param, copied in zip(layer.parameters(), twin.parameters()):
        copied.grad = param.grad.clone()
    return layer, twin


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_one_rank_equals_torch_clip_grad_norm(norm_type: float) -> None:
    ours, theirs = _layer_with_grads()
    norm = clip_grad_norm_(ours, 0.1, expert_groups(1), norm_type)
    expected = torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.1, norm_type)
    torch.testing.assert_close(norm, expected, rtol=1e-6, atol=0)
    assert expected > 0.1
    for mine, reference in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(mine.grad, reference.grad, rtol=1e-6, atol=0)


@pytest.mark.parametrize("max_norm, norm_type, message", [
    (0.0, 2.0, "max_norm=0.0 must be a finite number > 0"),
    (float("nan"), 2.0, "max_norm=nan must be a finite number > 0"),
    (1.0, 0.0, "norm_type=0.0 must be a number > 0 or inf"),
    (1.0, -math.inf, "norm_type=-inf must be a number > 0 or inf"),
])
def test_bad_arguments_are_named(max_norm: float, norm_type: float, message: str) -> None:
    layer, _ = _layer_with_grads()
    with pytest.raises(ValueError, match=re.escape(message)):
        clip_grad_norm_(layer, max_norm, expert_groups(1), norm_type)


def test_a_tensor_parallel_parameter_must_be_a_dense_one_of_the_module() -> None:
    layer, _ = _layer_with_grads()
    for wrong in (nn.Linear(2, 2).weight, layer.experts.w1):
        with pytest.raises(ValueError, match="tensor_parallel holds a parameter that is not a dense parameter"):
            clip_grad_norm_(layer, 1.0, expert_groups(1), tensor_parallel=[wrong])


def test_no_gradients_give_a_zero_norm() -> None:
    layer = MoELayer(MoEConfig(d_model=8, d_ff=16, num_experts=4))
    assert clip_grad_norm_(layer, 1.0, expert_groups(1)).item() == 0.0


def test_grad_norm_measures_without_scaling() -> None:
    layer, twin = _layer_with_grads()
    expected = torch.nn.utils.get_total_norm([p.grad for p in twin.parameters()])
    torch.testing.assert_close(grad_norm(layer, expert_groups(1)), expected, rtol=1e-6, atol=0)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(layer.parameters(), twin.parameters()))


def test_a_non_finite_norm_is_returned_or_raised_as_torch_does() -> None:
    layer, _ = _layer_with_grads()
    layer.experts.w2.grad[0, 0, 0] = math.inf
    assert clip_grad_norm_(layer, 1.0, expert_groups(1)).item() == math.inf
    layer.experts.w2.grad[0, 0, 0] = math.nan
    with pytest.raises(RuntimeError, match=r"the total norm of order 2.0 of the gradients is non-finite \(nan\)"):
        clip_grad_norm_(layer, 1.0, expert_groups(1), error_if_nonfinite=True)
