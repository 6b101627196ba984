"""Filled-slot expert compute (grouped GEMM over the filled slots only) against the padded batched
matmuls over every slot, the fallback rule, and the sync-free dropless mode against a dropless
reference."""

from __future__ import annotations

import pytest
import torch

from expert_parallel import MoEConfig, MoELayer
from tests.unit.layer_helpers import make_input, make_layer

FAMILIES = {
    "gshard-random": dict(router="gshard", second_policy="random", capacity_factor=0.75),
    "switch-bias": dict(router="switch", expert_bias=True, capacity_factor=0.5),
    "topk3-swiglu-shared": dict(router="topk", top_k=3, expert="swiglu", num_shared_experts=1),
    "noisy": dict(router="noisy_topk", top_k=2, importance_loss_weight=0.1, load_loss_weight=0.1),
    "expert-choice": dict(router="expert_choice"),
    "soft": dict(router="soft"),
    "deepspeed-top2": dict(router="deepspeed", top_k=2, second_policy="all", capacity_factor=0.5),
    "dropless": dict(router="topk", top_k=2, dropless=True, expert_bias=True),
}


def _run(mode: str, options: dict, num_tokens: int = 40):
    layer = make_layer(expert_compute=mode, d_model=16, d_ff=32, **options)
    x = make_input(num_tokens, d_model=16).requires_grad_()
    torch.manual_seed(3)  # the same random draws (second expert, noise) in both modes
    out = layer(x)
    (out.output * torch.linspace(-1, 1, out.output.numel()).view_as(out.output)).sum().add(out.aux_loss).backward()
    grads = {name: p.grad for name, p in layer.named_parameters() if p.grad is not None}
    return layer, out, x.grad, grads


@pytest.mark.parametrize("options", FAMILIES.values(), ids=FAMILIES.keys())
def test_filled_compute_equals_padded_for_every_router_family(options):
    filled, out_f, dx_f, grads_f = _run("filled", options)
    padded, out_p, dx_p, grads_p = _run("padded", options)
    assert filled.filled_compute and not padded.filled_compute
    torch.testing.assert_close(out_f.output, out_p.output, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_f.aux_loss, out_p.aux_loss)
    torch.testing.assert_close(dx_f, dx_p, rtol=1e-5, atol=1e-6)
    assert grads_f.keys() == grads_p.keys()
    for name in grads_f:
        torch.testing.assert_close(grads_f[name], grads_p[name], rtol=1e-5, atol=1e-6, msg=name)


def test_empty_slots_never_reach_an_output_or_gradient(monkeypatch):
    # on a GPU the grouped GEMM leaves the rows past the last offset unwritten: poison them
    real = torch._grouped_mm

    def poisoned(a, b, offs=None, **kwargs):
        out = real(a, b, offs=offs, **kwargs)
        return out.index_fill(0, torch.arange(int(offs[-1]), out.shape[0]), float("nan"))
    options = dict(router="switch", expert_bias=True, capacity_factor=2.0)
    _, out_p, dx_p, grads_p = _run("padded", options)
    monkeypatch.setattr(torch, "_grouped_mm", poisoned)
    _, out_f, dx_f, grads_f = _run("filled", options)
    torch.testing.assert_close(out_f.output, out_p.output, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx_f, dx_p, rtol=1e-5, atol=1e-6)
    for name in grads_p:
        torch.testing.assert_close(grads_f[name], grads_p[name], rtol=1e-5, atol=1e-6, msg=name)


def test_auto_falls_back_to_padded_where_grouped_gemm_cannot_run():
    torch.manual_seed(0)
    auto = MoELayer(MoEConfig(d_model=16, d_ff=32, num_experts=4, second_policy="all")).double()
    assert not auto.filled_compute  # torch._grouped_mm has no float64 kernel
    padded = MoELayer(MoEConfig(d_model=16, d_ff=32, num_experts=4, second_policy="all", expert_compute="padded"))
    padded.load_state_dict(auto.state_dict())
    x = torch.randn(20, 16, dtype=torch.float64)
    torch.testing.assert_close(auto(x).output, padded.double()(x).output)
    assert auto.float().filled_compute  # chosen again after .to()


@pytest.mark.parametrize(("dtype", "d_ff", "pattern"), [
    (torch.float64, 32, r"torch.float64 on cpu"),
    (torch.bfloat16, 12, r"torch.bfloat16 on cpu, d_model and d_ff \(16, 12\): rows must be multiples of 16 bytes"),
])
def test_explicit_filled_where_it_cannot_run_names_device_dtype_and_fix(dtype, d_ff, pattern):
    layer = MoELayer(MoEConfig(d_model=16, d_ff=d_ff, num_experts=4, expert_compute="filled").replace())
    with pytest.raises(ValueError, match=r"expert_compute='filled' needs grouped GEMM .*" + pattern +
                       r".*use expert_compute='auto'"):
        layer.to(dtype)


def test_dropless_drops_nothing_and_equals_a_dropless_reference():
    # everything wants expert 0: a capacity-factor layer drops, dropless and drop_tokens=False do not
    options = dict(router="topk", top_k=2, d_model=16, d_ff=32)
    dropless = make_layer(dropless=True, **options)
    agreed = make_layer(drop_tokens=False, **options)
    with torch.no_grad():
        for layer in (dropless, agreed):
            layer.router.weight[0] += 10.0
    x = make_input(48, d_model=16).abs()
    out, ref = dropless(x), agreed(x)
    assert out.stats.dropped_fraction.item() == 0.0 and out.stats.capacity.item() == 48
    torch.testing.assert_close(out.output, ref.output, rtol=1e-5, atol=1e-6)


def test_dropless_with_a_token_bound_makes_no_agreement(monkeypatch):
    import expert_parallel.layer as layer_module
    monkeypatch.setattr(layer_module, "agree", lambda *args: pytest.fail("bounded dropless must not all-reduce"))
    out = make_layer(dropless=True, max_tokens_per_rank=12, router="topk", top_k=2)(make_input(10))
    assert out.stats.capacity.item() == 12 and out.stats.dropped_fraction.item() == 0.0


def test_more_tokens_than_the_declared_bound_is_a_value_error_naming_the_fix():
    layer = make_layer(dropless=True, max_tokens_per_rank=8, router="topk", top_k=2)
    with pytest.raises(ValueError, match=r"has 9 tokens .*max_tokens_per_rank=8; pass at most 8 tokens"):
        layer(make_input(9))


@pytest.mark.parametrize(("options", "pattern"), [
    (dict(dropless=True, capacity=4), r"dropless=True .*capacity=4 fixes them"),
    (dict(dropless=True, drop_tokens=False), r"dropless=True .*drop_tokens=False is the other dropless mode"),
    (dict(dropless=True, router="soft"), r"dropless=True .*router='soft' sizes its own buffers"),
    (dict(dropless=True, router="deepspeed", top_k=1), r"dropless=True .*router='deepspeed'"),
    (dict(max_tokens_per_rank=16), r"max_tokens_per_rank=16 .*set dropless=True or max_tokens_per_rank=None"),
    (dict(dropless=True, max_tokens_per_rank=0), r"max_tokens_per_rank=0 .*an integer >= 1"),
    (dict(expert_compute="fast"), r"expert_compute='fast' .*choose one of \['auto', 'filled', 'padded'\]"),
])
def test_bad_filled_or_dropless_options_name_the_field_and_fix(options, pattern):
    with pytest.raises(ValueError, match=pattern):
        MoEConfig(d_model=8, d_ff=16, num_experts=4, **options)


@pytest.mark.slow  # torch.compile
def test_a_compiled_filled_layer_runs_and_matches_eager():
    layer = make_layer(router="topk", top_k=2, expert_bias=True, d_model=16, d_ff=32)
    x = make_input(24, d_model=16)
    compiled = torch.compile(layer, backend="eager")
    out = compiled(x)
    (out.output.sum() + out.aux_loss).backward()
    assert layer.filled_compute
    torch.testing.assert_close(out.output, layer(x).output)
