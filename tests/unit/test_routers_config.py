"""Router options in MoEConfig: top_k defaults, invalid combinations, presets."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from expert_parallel import MoEConfig, MoELayer, presets
from expert_parallel.config import LOSS_WEIGHTS
from expert_parallel.router_rules import ROUTER_RULES
from expert_parallel.routing import ROUTERS
from tests.unit.reference import softmax_row

BASE = dict(d_model=8, d_ff=16, num_experts=8)


def _config(**overrides) -> MoEConfig:
    return MoEConfig(**{**BASE, **overrides})


@pytest.mark.parametrize(("router", "top_k", "choices"), [
    ("gshard", 2, 2), ("switch", 1, 1), ("topk", 2, 2), ("noisy_topk", 2, 2), ("deepspeed", 2, 2),
    ("soft", None, 8), ("expert_choice", None, 8),
])
def test_unset_top_k_is_the_routers_own(router, top_k, choices):
    cfg = _config(router=router, **({"second_policy": "all"} if router == "deepspeed" else {}))
    assert (cfg.top_k, cfg.num_choices) == (None, choices)  # the field keeps what was given
    assert cfg.replace() == cfg


def test_explicit_top_k_is_kept_in_either_argument_order():
    assert _config(top_k=2, router="gshard").top_k == 2
    assert _config(router="topk", top_k=5).replace(capacity_factor=2.0).top_k == 5
    assert MoEConfig(d_model=4, d_ff=4, num_experts=1, router="topk").num_choices == 1


def test_replace_router_takes_the_new_routers_own_top_k():
    switch = _config(router="switch")
    assert switch.replace(router="gshard").num_choices == 2
    assert switch.replace(router="soft").num_choices == 8
    assert _config(router="soft").replace(router="switch").num_choices == 1
    assert switch.replace(router="gshard").replace(router="switch") == switch
    with pytest.raises(ValueError, match=r"MoEConfig.top_k=1 is invalid: router='gshard' routes top-2"):
        _config(router="switch", top_k=1).replace(router="gshard")  # an explicit top_k is kept


@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_every_registered_router_builds_and_runs_a_layer(router):
    cfg = _config(router=router, **({"second_policy": "all"} if router == "deepspeed" else {}))
    layer = MoELayer(cfg)
    assert (layer.router.noise_weight is not None) == (router == "noisy_topk")
    y, aux_loss, stats = layer(torch.randn(6, 8))
    assert y.shape == (6, 8) and torch.isfinite(y).all() and torch.isfinite(aux_loss)


@pytest.mark.parametrize(("overrides", "pattern"), [
    (dict(router="switch", top_k=2), r"top_k=2 .*router='switch' routes top-1; set top_k=1"),
    (dict(router="soft", top_k=2), r"MoEConfig.top_k=2 .*router='soft' takes no top_k.*leave top_k unset"),
    (dict(router="expert_choice", top_k=1), r"MoEConfig.top_k=1 .*router='expert_choice' takes no top_k"),
    (dict(router="topk", top_k=9), r"top_k=9 .*between 1 and num_experts=8"),
    (dict(router="soft", capacity=4), r"MoEConfig.capacity=4 .*router='soft'.*set capacity=None"),
    (dict(z_loss_weight=-0.1), r"MoEConfig.z_loss_weight=-0.1 .*>= 0"),
    (dict(aux_loss_weight=float("nan")), r"MoEConfig.aux_loss_weight=nan .*finite number"),
    (dict(router="noisy_topk", importance_loss_weight=-1.0), r"importance_loss_weight=-1.0 .*>= 0"),
    (dict(router="noisy_topk", load_loss_weight=-0.5), r"load_loss_weight=-0.5 .*>= 0"),
    (dict(importance_loss_weight=0.1), r"importance_loss_weight=0.1 .*router='noisy_topk' only"),
    (dict(router="topk", load_loss_weight=0.1), r"load_loss_weight=0.1 .*router='noisy_topk' only"),
    (dict(gate_after_topk=True), r"gate_after_topk=True .*router='topk' only \(got router='gshard'\)"),
    (dict(router="switch", normalize_topk=True), r"normalize_topk=True .*router='topk' only"),
    (dict(jitter_eps=-0.1), r"MoEConfig.jitter_eps=-0.1 .*\[0, 1\)"),
    (dict(jitter_eps=1.0), r"MoEConfig.jitter_eps=1.0 .*\[0, 1\)"),
    (dict(num_shared_experts=-1), r"MoEConfig.num_shared_experts=-1 .*integer >= 0"),
    (dict(num_shared_experts=1.5), r"MoEConfig.num_shared_experts=1.5 .*integer >= 0"),
    (dict(num_shared_experts=1, d_ff_shared=0), r"MoEConfig.d_ff_shared=0 .*integer >= 1"),
    (dict(d_ff_shared=32), r"MoEConfig.d_ff_shared=32 .*num_shared_experts=0"),
])
def test_bad_router_options_raise_value_error_naming_the_field(overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        _config(**overrides)


def test_every_weighted_loss_has_a_config_field():
    cfg = _config()
    assert all(hasattr(cfg, field) for field in LOSS_WEIGHTS.values())


def test_shared_expert_width_defaults_to_d_ff_and_follows_it():
    cfg = _config(num_shared_experts=2)
    assert cfg.shared_d_ff == 16 and cfg.replace(d_ff=32).shared_d_ff == 32
    assert _config(num_shared_experts=2, d_ff_shared=4).shared_d_ff == 4


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_every_preset_is_a_valid_config_that_runs(name):
    cfg = presets.preset(name, 8, 16, 8)
    assert getattr(presets, name)(8, 16, 8) == cfg and cfg.replace() == cfg
    layer = MoELayer(cfg)
    out = layer(torch.randn(3, 5, 8))
    (out.output.sum() + out.aux_loss).backward()
    assert out.output.shape == (3, 5, 8) and torch.isfinite(out.output).all()


# Every field each preset sets, each value with the source it comes from. The whole config is
# compared, so a preset that drifts from a value here, or sets anything else, fails.
PAPER_CONFIGS = {
    "switch": dict(  # Fedus, Zoph, Shazeer 2021, "Switch Transformers"
        router="switch", top_k=1,  # one expert per token (section 2.1)
        capacity_factor=1.25, eval_capacity_factor=2.0,  # train 1.25, eval 2.0
        expert="ffn", activation="relu",  # T5's ReLU feed-forward as the expert
        aux_loss_weight=0.01,  # alpha = 1e-2 (section 2.2)
        drop_tokens=True,  # overflowing tokens skip the layer (the residual carries them)
    ),
    "gshard": dict(  # Lepikhin et al. 2020, "GShard"
        router="gshard", top_k=2, second_policy="random",  # Algorithm 1: 2nd dispatched iff 2*g2 > u
        capacity_factor=1.0, eval_capacity_factor=1.0,  # capacity 2N/(G E) = 2S/E, one for all modes
        expert="ffn", activation="relu",  # eq. 2: FFN_e(x) = wo_e ReLU(wi_e x)
        aux_loss_weight=0.01,  # Lingvo gshard_builder aux_loss_coef, on the E^2-scaled loss (= ours)
        drop_tokens=True,  # tokens over capacity are dropped (Algorithm 1)
    ),
    "shazeer": dict(  # Shazeer et al. 2017, "Outrageously Large Neural Networks"
        router="noisy_topk", top_k=4,  # noisy top-k gating, k = 4 in its language-model experiments
        expert="ffn", activation="relu",  # experts: one ReLU hidden layer
        importance_loss_weight=0.1, load_loss_weight=0.1,  # w_importance = w_load = 0.1
        aux_loss_weight=0.0,  # no Switch-style loss in this paper
        drop_tokens=False,  # no expert capacity: every token reaches its k experts
    ),
    "glam": dict(  # Du et al. 2022, "GLaM": GShard's gating
        router="gshard", top_k=2, second_policy="random",  # GShard top-2
        capacity_factor=1.0, eval_capacity_factor=1.0, aux_loss_weight=0.01, drop_tokens=True,  # as GShard
        expert="ffn", activation="gelu",  # GLaM's experts are gated GELU; ffn + GELU is the nearest kind here
    ),
    "st_moe": dict(  # Zoph et al. 2022, "ST-MoE"
        router="topk", top_k=2,  # top-2 routing
        capacity_factor=1.25, eval_capacity_factor=2.0,  # train 1.25, eval 2.0
        aux_loss_weight=1e-2, z_loss_weight=1e-3,  # load-balance 1e-2, router z-loss c_z = 1e-3
        expert="ffn", activation="gelu",  # GELU FFN experts (the docstring's choice)
        drop_tokens=True,  # overflowing tokens are dropped
    ),
    "mixtral": dict(  # Jiang et al. 2024, "Mixtral of Experts"
        router="topk", top_k=2,  # top-2 of 8 (section 2.1)
        gate_after_topk=True,  # G(x) = Softmax(TopK(x W_g)) (section 2.1)
        expert="swiglu",  # SwiGLU experts (section 2.1)
        drop_tokens=False,  # dropless (MegaBlocks; Hugging Face's Mixtral has no capacity)
        aux_loss_weight=2e-3,  # HF router_aux_loss_coef 1e-3 on a loss top_k = 2 times ours
    ),
    "deepseek": dict(  # Dai et al. 2024, "DeepSeekMoE" (the 16B model)
        router="topk", top_k=6,  # 6 of 64 routed experts
        num_shared_experts=2,  # 2 shared experts, as wide as a routed one
        expert="swiglu",  # SwiGLU experts
        aux_loss_weight=1e-3,  # expert-level balance factor alpha_1 = 0.001 (= ours times alpha_1)
        drop_tokens=False,  # dropless, as its released code
    ),
    "expert_choice": dict(  # Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing"
        router="expert_choice",  # each expert picks its top tokens
        capacity_factor=2.0, eval_capacity_factor=2.0,  # EC-CF2
        expert="ffn", activation="gelu",  # GELU FFN experts
        aux_loss_weight=0.0,  # balanced by construction: no balancing loss
    ),
    "soft": dict(  # Jacobs, Jordan, Nowlan, Hinton 1991, "Adaptive Mixtures of Local Experts"
        router="soft",  # every token to every expert, weighted by the softmax gate
        expert="ffn", activation="gelu",  # GELU FFN experts
        aux_loss_weight=0.0,  # no balancing loss
    ),
}


def test_every_preset_is_pinned_against_its_paper():
    assert sorted(PAPER_CONFIGS) == sorted(presets.PRESETS)


@pytest.mark.parametrize("name", sorted(PAPER_CONFIGS))
def test_presets_set_what_their_papers_use(name):
    fields = PAPER_CONFIGS[name]
    cfg = presets.preset(name, 16, 32, 64)
    assert {k: getattr(cfg, k) for k in fields} == fields  # a readable diff first
    assert cfg == MoEConfig(d_model=16, d_ff=32, num_experts=64, **fields)  # and nothing else set


def test_preset_overrides_reach_every_field():
    cfg = presets.mixtral(16, 32, 8, top_k=3, drop_tokens=True, capacity_factor=1.5, z_loss_weight=0.1)
    assert (cfg.num_choices, cfg.drop_tokens, cfg.capacity_factor, cfg.z_loss_weight) == (3, True, 1.5, 0.1)
    with pytest.raises(ValueError, match="top_k=2 .*router='expert_choice' takes no top_k"):
        presets.expert_choice(16, 32, 8, top_k=2)


def _identity_router_layer(cfg: MoEConfig) -> MoELayer:
    """A layer whose router logits are its input (``d_model == num_experts``, router weight I)."""
    layer = MoELayer(cfg)
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(cfg.num_experts))
    return layer


@pytest.mark.parametrize("overrides", [{}, {"top_k": 3}], ids=["preset_top2", "override_top3"])
def test_mixtral_preset_weighs_balance_like_hugging_face_mixtral(overrides):
    mixtral_hf = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    hf_config = mixtral_hf.MixtralConfig()  # built locally: the defaults of Hugging Face's Mixtral
    num_experts, num_tokens = hf_config.num_local_experts, 40
    cfg = presets.mixtral(num_experts, 16, num_experts, **overrides)
    assert cfg.num_choices == overrides.get("top_k", hf_config.num_experts_per_tok)
    logits = torch.randn(num_tokens, num_experts, generator=torch.Generator().manual_seed(6)) * 2.0
    # HF's loss over one layer's router logits, weighed by Mixtral's router_aux_loss_coef (0.001)
    want = mixtral_hf.load_balancing_loss_func((logits,), num_experts, cfg.num_choices) * hf_config.router_aux_loss_coef
    torch.testing.assert_close(_identity_router_layer(cfg)(logits).aux_loss, want, rtol=1e-5, atol=1e-8)


def test_explicit_aux_loss_weight_wins_over_mixtrals_top_k_scaling():
    assert presets.mixtral(8, 16, 8, top_k=3, aux_loss_weight=0.5).aux_loss_weight == 0.5
    assert presets.mixtral(8, 16, 8, aux_loss_weight=0.0).aux_loss_weight == 0.0


def test_deepseek_preset_weighs_deepseekmoes_expert_level_balance_loss():
    # Dai et al. 2024: L_ExpBal = alpha_1 * sum_i f_i P_i, f_i = E / (K T) * #{t: t picks i},
    # P_i = (1 / T) * sum_t s_{i,t}, s the softmax affinities; alpha_1 = 0.001 for DeepSeekMoE 16B
    num_experts, num_tokens, alpha_1 = 64, 48, 0.001
    cfg = presets.deepseek(num_experts, 8, num_experts)
    top_k = cfg.num_choices
    logits = torch.randn(num_tokens, num_experts, generator=torch.Generator().manual_seed(8)) * 2.0
    f, p = [0.0] * num_experts, [0.0] * num_experts
    for t in range(num_tokens):
        s = softmax_row(logits[t]).tolist()
        for i in sorted(range(num_experts), key=lambda e: -s[e])[:top_k]:
            f[i] += num_experts / (top_k * num_tokens)
        for i in range(num_experts):
            p[i] += s[i] / num_tokens
    want = alpha_1 * sum(f[i] * p[i] for i in range(num_experts))
    got = _identity_router_layer(cfg)(logits).aux_loss
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_mixtral_preset_never_drops_tokens():
    layer = MoELayer(presets.mixtral(8, 16, 4))
    with torch.no_grad():
        layer.router.weight[0] += 5.0  # everything wants expert 0
    stats = layer(torch.randn(64, 8).abs()).stats
    assert stats.dropped_fraction.item() == 0.0 and stats.tokens_per_expert[0].item() == 64


def test_unknown_preset_lists_the_names():
    with pytest.raises(ValueError, match=r"preset='hash' is unknown; choose one of .*'deepseek'"):
        presets.preset("hash", 8, 16, 4)


@pytest.mark.slow  # a fresh interpreter
def test_presets_are_an_attribute_of_the_package():
    # a fresh interpreter: in this one another test may have imported the submodule already
    code = "import expert_parallel; print(expert_parallel.presets.mixtral(8, 16, 4).router)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "topk"


def test_every_router_has_one_rule_and_one_spec():
    assert sorted(ROUTERS) == sorted(ROUTER_RULES)
