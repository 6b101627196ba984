"""Router options in MoEConfig: top_k defaults, invalid combinations, presets."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from expert_parallel import MoEConfig, MoELayer, presets
from expert_parallel.config import LOSS_WEIGHTS
from expert_parallel.routing import ROUTERS

BASE = dict(d_model=8, d_ff=16, num_experts=8)


def _config(**overrides) -> MoEConfig:
    return MoEConfig(**{**BASE, **overrides})


@pytest.mark.parametrize(("router", "top_k", "choices"), [
    ("gshard", 2, 2), ("switch", 1, 1), ("topk", 2, 2), ("noisy_topk", 2, 2), ("deepspeed", 2, 2),
    ("soft", None, 8), ("expert_choice", None, 8),
])
def test_unset_top_k_is_the_routers_own(router, top_k, choices):
    cfg = _config(router=router, **({"second_policy": "all"} if router == "deepspeed" else {}))
    assert (cfg.top_k, cfg.num_choices) == (top_k, choices)
    assert cfg.replace() == cfg


def test_explicit_top_k_is_kept_in_either_argument_order():
    assert _config(top_k=2, router="gshard").top_k == 2
    assert _config(router="topk", top_k=5).replace(capacity_factor=2.0).top_k == 5
    assert MoEConfig(d_model=4, d_ff=4, num_experts=1, router="topk").top_k == 1


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


@pytest.mark.parametrize(("name", "fields"), [
    ("shazeer", dict(router="noisy_topk", top_k=4, importance_loss_weight=0.1, load_loss_weight=0.1)),
    ("glam", dict(router="gshard", top_k=2, second_policy="random")),
    ("st_moe", dict(router="topk", top_k=2, z_loss_weight=1e-3, aux_loss_weight=1e-2)),
    ("mixtral", dict(router="topk", top_k=2, gate_after_topk=True, expert="swiglu", drop_tokens=False)),
    ("deepseek", dict(router="topk", top_k=6, num_shared_experts=2, expert="swiglu")),
    ("expert_choice", dict(router="expert_choice", top_k=None, capacity_factor=2.0)),
    ("soft", dict(router="soft", top_k=None, capacity=None)),
])
def test_presets_set_what_their_papers_use(name, fields):
    cfg = presets.preset(name, 16, 32, 64)
    assert {k: getattr(cfg, k) for k in fields} == fields


def test_preset_overrides_reach_every_field():
    cfg = presets.mixtral(16, 32, 8, top_k=3, drop_tokens=True, capacity_factor=1.5, z_loss_weight=0.1)
    assert (cfg.top_k, cfg.drop_tokens, cfg.capacity_factor, cfg.z_loss_weight) == (3, True, 1.5, 0.1)
    with pytest.raises(ValueError, match="top_k=2 .*router='expert_choice' takes no top_k"):
        presets.expert_choice(16, 32, 8, top_k=2)


def test_mixtral_preset_never_drops_tokens():
    layer = MoELayer(presets.mixtral(8, 16, 4))
    with torch.no_grad():
        layer.router.weight[0] += 5.0  # everything wants expert 0
    stats = layer(torch.randn(64, 8).abs()).stats
    assert stats.dropped_fraction.item() == 0.0 and stats.tokens_per_expert[0].item() == 64


def test_unknown_preset_lists_the_names():
    with pytest.raises(ValueError, match=r"preset='hash' is unknown; choose one of .*'deepseek'"):
        presets.preset("hash", 8, 16, 4)


def test_presets_are_an_attribute_of_the_package():
    # a fresh interpreter: in this one another test may have imported the submodule already
    code = "import expert_parallel; print(expert_parallel.presets.mixtral(8, 16, 4).router)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "topk"
