"""MoEConfig validation and MoELayer input / process-group errors: messages name field and value."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist

from expert_parallel import MoEConfig, MoELayer
from expert_parallel.comm import resolve_ranks_per_node
from expert_parallel.layout import layer_capacity
from tests.unit.layer_helpers import D_MODEL, make_input, make_layer

BASE = dict(d_model=8, d_ff=16, num_experts=4)


def _config(**overrides) -> MoEConfig:
    return MoEConfig(**{**BASE, **overrides})


@pytest.mark.parametrize(("overrides", "pattern"), [
    (dict(num_experts=6, ep_size=4), r"num_experts=6 .*not divisible by ep_size=4; choose ep_size among the divisors "
                                     r"of 6: \[1, 2, 3, 6\], or MoEConfig.num_experts as a multiple of 4"),
    (dict(top_k=0), r"top_k=0 .*between 1 and num_experts=4"),
    (dict(top_k=5, router="switch"), r"top_k=5 .*between 1 and num_experts=4"),
    (dict(top_k=1), r"top_k=1 .*router='gshard' routes top-2; set top_k=2"),
    (dict(top_k=3), r"top_k=3 .*router='gshard' routes top-2"),
    (dict(router="switch", top_k=2), r"top_k=2 .*router='switch' routes top-1; set top_k=1"),
    (dict(d_model=0), r"d_model=0 .*integer >= 1"),
    (dict(d_ff=-3), r"d_ff=-3 .*integer >= 1"),
    (dict(num_experts=0), r"num_experts=0 .*integer >= 1"),
    (dict(ep_size=0), r"ep_size=0 .*integer >= 1"),
    (dict(capacity_factor=0.0), r"capacity_factor=0.0 .*> 0"),
    (dict(capacity_factor=-1.0), r"capacity_factor=-1.0 .*> 0"),
    (dict(capacity_factor=float("nan")), r"capacity_factor=nan .*finite number"),
    (dict(capacity_factor=float("inf")), r"capacity_factor=inf .*finite number"),
    (dict(capacity_factor="1.25"), r"capacity_factor='1.25' .*finite number"),
    (dict(jitter_eps=None), r"jitter_eps=None .*finite number"),
    (dict(z_loss_weight=True), r"z_loss_weight=True .*finite number"),
    (dict(capacity=True), r"capacity=True .*integer >= 1"),
    (dict(min_capacity=2.0), r"min_capacity=2.0 .*integer >= 0"),
    (dict(check_finite="yes"), r"check_finite='yes' .*True or False"),
    (dict(drop_tokens=1), r"drop_tokens=1 .*True or False"),
    (dict(eval_capacity_factor=0.0), r"eval_capacity_factor=0.0 .*> 0"),
    (dict(router="hash"), r"router='hash' .*choose one of"),
    (dict(expert="moe"), r"expert='moe' .*choose one of"),
    (dict(activation="tanh"), r"activation='tanh' .*choose one of"),
    (dict(second_policy="sometimes"), r"second_policy='sometimes' .*choose one of"),
    (dict(capacity=8, drop_tokens=False), r"capacity=8 .*drop_tokens=False"),
    (dict(capacity=0), r"capacity=0 .*integer >= 1"),
    (dict(min_capacity=-1), r"min_capacity=-1 .*>= 0"),
    (dict(second_threshold=0.7), r"second_threshold=0.7 .*\[0, 0.5\]"),
    (dict(aux_loss_weight=-0.1), r"aux_loss_weight=-0.1 .*>= 0"),
    (dict(tp_size=0), r"tp_size=0 .*integer >= 1"),
    (dict(expert_tensor_parallel=1, tp_size=2), r"expert_tensor_parallel=1 .*True or False"),
    (dict(expert_tensor_parallel=True), r"expert_tensor_parallel=True .*tp_size=1; set tp_size > 1"),
    (dict(tp_size=2, capacity=5), r"capacity=5 .*tp_size=2 .*divisible by tp_size"),
    (dict(tp_size=3, expert_tensor_parallel=True), r"d_ff=16 .*tp_size=3 .*divisible by tp_size"),
    (dict(tp_size=2, expert_tensor_parallel=True, num_chunks=2),
     r"num_chunks=2 .*does not take expert_tensor_parallel"),
    (dict(num_chunks=0), r"MoEConfig.num_chunks=0 is invalid: it must be an integer >= 1"),
    (dict(num_chunks=2.0), r"MoEConfig.num_chunks=2.0 is invalid: it must be an integer >= 1"),
    (dict(a2a="ring"), r"MoEConfig.a2a='ring' is invalid: choose one of \['flat', 'hierarchical'\]"),
    (dict(a2a="hierarchical", ranks_per_node=0), r"MoEConfig.ranks_per_node=0 is invalid: it must be an integer >= 1"),
    (dict(ranks_per_node=2), r"MoEConfig.ranks_per_node=2 is invalid: it sizes the nodes of a2a='hierarchical'; set "
                             r"a2a='hierarchical' or ranks_per_node=None"),
    (dict(num_experts=8, ep_size=4, a2a="hierarchical", ranks_per_node=3),
     r"MoEConfig.ranks_per_node=3 is invalid: ep_size=4 is not a multiple of it; choose ranks_per_node dividing "
     r"ep_size \(EP groups of whole nodes\), or a2a='flat'"),
])
def test_invalid_config_raises_value_error_naming_field_and_value(overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        _config(**overrides)


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(router="switch", top_k=1),
    dict(num_experts=8, ep_size=4),
    dict(capacity=1),
    dict(drop_tokens=False),
    dict(second_policy="threshold", second_threshold=0.5),
    dict(expert="swiglu", expert_bias=True),
    dict(min_capacity=0, aux_loss_weight=0.0),
    dict(capacity_factor=1, eval_capacity_factor=np.float32(1.5)),  # any finite real number
    dict(tp_size=3, capacity=6),  # experts not split: d_ff need not divide
    dict(tp_size=2, expert_tensor_parallel=True),
    dict(num_chunks=3, a2a="hierarchical"),
    dict(num_experts=8, ep_size=4, a2a="hierarchical", ranks_per_node=2),
    dict(a2a="hierarchical", ranks_per_node=8),  # ep_size=1: no all-to-all, nothing to split
])
def test_valid_configs_are_accepted(overrides):
    cfg = _config(**overrides)
    for name, value in overrides.items():
        assert getattr(cfg, name) == value


def test_replace_validates_again():
    with pytest.raises(ValueError, match="capacity_factor=0"):
        _config().replace(capacity_factor=0)


def test_num_local_experts_splits_experts_over_ep_ranks():
    assert _config(num_experts=8, ep_size=4).num_local_experts == 2


def test_capacity_is_rounded_up_to_a_multiple_of_tp_size():
    # 16 tokens, top-2 of 4 experts, factor 1.25: 10 slots; each of 3 TP ranks sends an equal share
    assert layer_capacity(_config(min_capacity=0), 16, True, False) == 10
    assert layer_capacity(_config(min_capacity=0, tp_size=3), 16, True, False) == 12
    assert layer_capacity(_config(dropless=True, tp_size=4), 6, True, False) == 8
    assert layer_capacity(_config(dropless=True, max_tokens_per_rank=5, tp_size=4), 0, True, False) == 8


def test_tp_size_above_one_without_process_group_raises_runtime_error():
    with pytest.raises(RuntimeError, match=r"tp_size=2 need an initialised"):
        MoELayer(_config(tp_size=2))


def test_layer_input_of_wrong_width_names_d_model():
    with pytest.raises(ValueError, match=rf"shape \(4, {D_MODEL + 1}\).*d_model={D_MODEL}"):
        make_layer()(torch.randn(4, D_MODEL + 1))


def test_layer_rejects_scalar_input():
    with pytest.raises(ValueError, match=f"d_model={D_MODEL}"):
        make_layer()(torch.tensor(1.0))


def test_layer_rejects_integer_input():
    with pytest.raises(ValueError, match=r"floating-point tensor, got torch.int64"):
        make_layer()(torch.ones(4, D_MODEL, dtype=torch.long))


def test_layer_rejects_input_dtype_different_from_weights():
    with pytest.raises(ValueError, match=r"torch.float64 differs .*torch.float32"):
        make_layer()(make_input(4).double())


def test_ep_size_above_one_without_process_group_raises_runtime_error():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match=r"ep_size=2 .*init_process_group"):
        MoELayer(_config(ep_size=2))


def test_layer_holds_one_expert_set_per_local_rank():
    layer = MoELayer(_config(expert="swiglu", expert_bias=True))
    assert layer.router.weight.shape == (4, 8)
    assert layer.experts.w1.shape == (4, 8, 16) and layer.experts.w3.shape == (4, 8, 16)
    assert layer.experts.w2.shape == (4, 16, 8)
    assert layer.experts.b1.shape == (4, 16) and layer.experts.b2.shape == (4, 8)


@pytest.mark.parametrize(("env", "pattern"), [
    (None, r"a2a='hierarchical' with ranks_per_node=None reads the launcher's LOCAL_WORLD_SIZE, which is 'unset'; "
           r"set MoEConfig.ranks_per_node"),
    ("two", r"LOCAL_WORLD_SIZE, which is 'two'; set MoEConfig.ranks_per_node"),
    ("0", r"LOCAL_WORLD_SIZE, which is '0'; set MoEConfig.ranks_per_node"),
    ("3", r"LOCAL_WORLD_SIZE=3 \(ranks per node\) does not divide ep_size=4; set MoEConfig.ranks_per_node to a "
          r"divisor of ep_size"),
])
def test_hierarchical_ranks_per_node_from_the_launcher_errors_name_the_fix(monkeypatch, env, pattern):
    if env is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", env)
    with pytest.raises(ValueError, match=pattern):
        resolve_ranks_per_node(None, 4)


def test_hierarchical_ranks_per_node_reads_the_launcher_only_when_unset(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert resolve_ranks_per_node(None, 4) == 2
    assert resolve_ranks_per_node(4, 4) == 4
