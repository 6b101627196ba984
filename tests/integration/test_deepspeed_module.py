"""The drop-in ``MoE``: state-dict keys, parameter tags, options and errors (single process)."""

from __future__ import annotations

import copy

import pytest
import torch

deepspeed = pytest.importorskip("deepspeed")

from deepspeed.moe.layer import MoE as DeepSpeedMoE  # noqa: E402
from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer  # noqa: E402

from expert_parallel.experts import StackedExperts  # noqa: E402
from expert_parallel.integrations.deepspeed import GenericExperts, MoE  # noqa: E402
from tests.integration.deepspeed_helpers import D_MODEL, make_expert  # noqa: E402


def _pair(expert_kind: str = "mlp", **kwargs):
    torch.manual_seed(0)
    reference = DeepSpeedMoE(D_MODEL, make_expert(expert_kind), num_experts=4, **kwargs)
    torch.manual_seed(0)
    ours = MoE(D_MODEL, make_expert(expert_kind), num_experts=4, **kwargs)
    return reference, ours


def test_is_a_deepspeed_moe_so_the_engine_recognises_it():
    _, ours = _pair()
    assert isinstance(ours, DeepSpeedMoE)
    assert deepspeed.moe.utils.has_moe_layers(torch.nn.Sequential(ours)) == (True, 4)
    # built by MoELayer's own constructor (unbound until the engine makes its groups), nothing missing
    assert ours.deepspeed_moe.shared_experts is None and ours.deepspeed_moe.shared_gate is None


@pytest.mark.parametrize("expert_kind,impl", [("mlp", StackedExperts), ("mlp_nobias_relu", StackedExperts),
                                              ("swiglu", StackedExperts), ("residual", GenericExperts)])
def test_state_dict_keys_and_shapes_are_deepspeeds(expert_kind, impl):
    reference, ours = _pair(expert_kind, k=2, use_residual=True)
    assert isinstance(ours.deepspeed_moe.experts, impl)
    want = {key: value.shape for key, value in reference.state_dict().items()}
    assert {key: value.shape for key, value in ours.state_dict().items()} == want
    assert "deepspeed_moe.gate.wg.weight" in want


@pytest.mark.parametrize("expert_kind", ["mlp", "swiglu", "residual"])
def test_checkpoints_move_both_ways_between_deepspeed_and_ours(expert_kind):
    reference, ours = _pair(expert_kind, k=2)
    with torch.no_grad():
        for param in reference.parameters():
            param.add_(torch.randn_like(param))
    ours.load_state_dict(reference.state_dict())  # strict
    back = _pair(expert_kind, k=2)[0]
    back.load_state_dict(ours.state_dict())  # strict
    for key, value in reference.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_same_seed_builds_the_same_weights_and_leaves_the_same_rng_state_as_deepspeed():
    draws = {}
    for cls in (DeepSpeedMoE, MoE):
        torch.manual_seed(0)
        layer = cls(D_MODEL, make_expert("mlp"), num_experts=4, k=2, use_residual=True)
        draws[cls] = (layer.state_dict(), torch.rand(3))
    (want, want_draw), (got, got_draw) = draws[DeepSpeedMoE], draws[MoE]
    assert torch.equal(got_draw, want_draw)
    for key, value in want.items():
        assert torch.equal(got[key], value), key


def test_expert_parameters_carry_deepspeeds_tags_and_split_into_moe_groups():
    ours = MoE(D_MODEL, make_expert("mlp"), num_experts=4, ep_size=2, k=2)
    experts = list(ours.deepspeed_moe.experts.parameters())
    assert all(p.allreduce is False and p.group_name == "ep_size_2" for p in experts)
    assert not any(is_moe_param(p) for p in ours.deepspeed_moe.router.parameters())
    groups = split_params_into_different_moe_groups_for_optimizer(
        {"params": list(ours.parameters()), "name": "all", "lr": 0.1})
    moe_groups = [g for g in groups if g.get("moe")]
    assert [g["name"] for g in moe_groups] == ["ep_size_2"]
    assert {id(p) for p in moe_groups[0]["params"]} == {id(p) for p in experts}


@pytest.mark.parametrize("rebuild", ["meta-to_empty", "load_state_dict-assign"])
@pytest.mark.parametrize("expert_kind", ["mlp", "residual"])
def test_deepspeeds_expert_tags_survive_rebuilt_parameters(rebuild, expert_kind):
    def build():
        return MoE(D_MODEL, make_expert(expert_kind), num_experts=4, ep_size=2, k=2)
    ours = build()
    if rebuild == "meta-to_empty":
        ours = ours.to("meta").to_empty(device="cpu")  # new Parameter objects: attributes dropped
    else:
        state = {k: v.clone() for k, v in ours.state_dict().items()}
        ours = build()
        ours.load_state_dict(state, assign=True)
    experts = list(ours.deepspeed_moe.experts.parameters())
    assert experts and all(is_moe_param(p) and p.group_name == "ep_size_2" for p in experts)
    assert not any(is_moe_param(p) for p in ours.deepspeed_moe.router.parameters())


def test_opt_in_core_routers_via_keyword():
    layer = MoE(D_MODEL, make_expert("mlp"), num_experts=4, k=2, router="gshard", second_policy="all")
    assert layer.deepspeed_moe.cfg.router == "gshard" and layer.deepspeed_moe.cfg.second_policy == "all"
    y, l_aux, counts = layer(torch.randn(3, 5, D_MODEL))
    assert y.shape == (3, 5, D_MODEL) and l_aux.dim() == 0 and counts.shape == (4,)


def test_deepspeed_options_map_onto_the_config():
    cfg = MoE(D_MODEL, make_expert("mlp"), num_experts=4, k=1, noisy_gate_policy="RSample").deepspeed_moe.cfg
    assert cfg.router == "deepspeed" and cfg.router_gumbel and cfg.random_token_selection
    cfg = MoE(D_MODEL, make_expert("mlp"), num_experts=4, k=2, noisy_gate_policy="Jitter",
              top2_2nd_expert_sampling=False, drop_tokens=False).deepspeed_moe.cfg
    assert (cfg.second_policy, cfg.jitter_eps, cfg.drop_tokens, cfg.aux_loss_weight) == ("all", 0.01, False, 1.0)
    cfg = MoE(D_MODEL, make_expert("mlp"), num_experts=4, num_chunks=3, a2a="hierarchical",
              ranks_per_node=2).deepspeed_moe.cfg
    assert (cfg.num_chunks, cfg.a2a, cfg.ranks_per_node) == (3, "hierarchical", 2)


@pytest.mark.parametrize("kwargs,match", [
    (dict(use_tutel=True), r"use_tutel=True\) is not supported"),
    (dict(num_chunks=0), r"MoEConfig.num_chunks=0 is invalid"),
    (dict(enable_expert_tensor_parallelism=True, expert=make_expert("residual")),
     r"enable_expert_tensor_parallelism=True\) is not supported: .*ResidualExpert runs as a generic expert"),
    (dict(enable_expert_tensor_parallelism=True, expert_impl="generic"),
     r"enable_expert_tensor_parallelism=True\) is not supported: .*Sequential runs as a generic expert"),
    (dict(noisy_gate_policy="Gaussian"), r"noisy_gate_policy='Gaussian'.*choose one of"),
    (dict(router="gshard", k=2, use_rts=True), r"use_rts=True.*not router='gshard'"),
    (dict(router="gshard", k=2, top2_2nd_expert_sampling=False), r"top2_2nd_expert_sampling"),
    (dict(router="gshard", k=1), r"MoEConfig.top_k=1 is invalid: router='gshard' routes top-2"),
    (dict(k=2, second_policy="random"), r"second_policy='random'.*top2_2nd_expert_sampling"),
    (dict(ep_size=3), r"num_experts=4 is invalid: it is not divisible by ep_size=3"),
    (dict(expert_impl="stacked", expert=make_expert("residual")), r"expert_impl='stacked'.*ResidualExpert"),
])
def test_unsupported_options_raise_a_clear_error(kwargs, match):
    expert = kwargs.pop("expert", make_expert("mlp"))
    with pytest.raises(ValueError, match=match):
        MoE(D_MODEL, expert, num_experts=4, **kwargs)


def test_expert_tensor_parallelism_without_an_mpu_is_deepspeeds_no_op():
    # DeepSpeed splits experts over the mpu's TP group only; without an mpu nothing is split
    reference, ours = _pair(enable_expert_tensor_parallelism=True)
    assert ours.enable_expert_tensor_parallelism == reference.enable_expert_tensor_parallelism
    assert ours(torch.randn(2, 6, D_MODEL))[0].shape == (2, 6, D_MODEL)
    cfg = ours.deepspeed_moe.cfg
    assert (cfg.tp_size, cfg.expert_tensor_parallel, ours.deepspeed_moe.tp_ranks) == (1, False, (0,))


def test_used_token_masks_raise_instead_of_being_ignored():
    layer = MoE(D_MODEL, make_expert("mlp"), num_experts=4)
    with pytest.raises(ValueError, match="used_token"):
        layer(torch.randn(8, D_MODEL), used_token=torch.ones(8))


def test_ep_size_above_one_without_process_group_says_how_to_fix():
    layer = MoE(D_MODEL, make_expert("mlp"), num_experts=4, ep_size=2)
    with pytest.raises(RuntimeError, match="init_distributed"):
        layer(torch.randn(8, D_MODEL))


def test_core_router_options_pass_through_and_unknown_ones_are_named() -> None:
    from expert_parallel.integrations.deepspeed import MoE

    expert = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    moe = MoE(8, expert, num_experts=4, k=2, router="topk", gate_after_topk=True, z_loss_weight=1e-3)
    assert moe.deepspeed_moe.cfg.gate_after_topk and moe.deepspeed_moe.cfg.z_loss_weight == 1e-3
    with pytest.raises(ValueError, match="num_shared_experts=2"):
        MoE(8, expert, num_experts=4, k=2, router="topk", num_shared_experts=2)
    with pytest.raises(ValueError, match="jitter_eps=0.1"):
        MoE(8, expert, num_experts=4, k=1, noisy_gate_policy="Jitter", jitter_eps=0.1)


def test_engine_model_needs_moe_layers_of_its_ep_size():
    from expert_parallel import MoEConfig, MoELayer
    from expert_parallel.integrations.deepspeed import EngineModel
    with pytest.raises(ValueError, match=r"Linear has no MoELayer.*integrations.huggingface.convert"):
        EngineModel(torch.nn.Linear(4, 4), ep_size=1)
    layer = MoELayer(MoEConfig(d_model=8, d_ff=16, num_experts=4, second_policy="all"))  # deterministic
    with pytest.raises(ValueError, match=r"EngineModel\(ep_size=2\): the model's MoE layers have ep_size \[1\]"):
        EngineModel(torch.nn.Sequential(layer), ep_size=2)
    tensor_parallel = copy.deepcopy(layer)
    tensor_parallel.cfg = layer.cfg.replace(tp_size=2)  # as built on a TP group (needs no process group here)
    with pytest.raises(ValueError, match=r"tp_size \[2\].*use integrations.deepspeed.MoE with an mpu"):
        EngineModel(torch.nn.Sequential(tensor_parallel), ep_size=1)
    wrapped = EngineModel(torch.nn.Sequential(layer), ep_size=1)
    assert all(is_moe_param(p) and p.group_name == "ep_size_1" for p in layer.experts.parameters())
    assert not any(is_moe_param(p) for p in layer.router.parameters())
    assert torch.equal(wrapped(torch.ones(3, 8)).output, layer(torch.ones(3, 8)).output)
