"""MoELayer (ep_size=1): outputs and gradients against a dense per-token reference."""

from __future__ import annotations

import pytest
import torch

from tests.unit.layer_helpers import D_MODEL, NUM_EXPERTS, inject_uniforms, make_input, make_layer, uniforms
from tests.unit.reference import capacity_formula, layer_reference

NUM_TOKENS = 24

# (name, config overrides, capacity the reference must use, train mode)
CASES = [
    ("ffn_gelu_all_fixed_capacity", dict(second_policy="all", capacity=5), 5, True),
    ("ffn_relu_threshold_formula_train",
     dict(activation="relu", second_policy="threshold", second_threshold=0.2, capacity_factor=0.75,
          min_capacity=0), capacity_formula(NUM_TOKENS, NUM_EXPERTS, 2, 0.75, 0), True),
    ("swiglu_bias_random", dict(expert="swiglu", expert_bias=True, capacity=6), 6, True),
    ("ffn_gelu_tanh_bias_eval",
     dict(activation="gelu_tanh", expert_bias=True, second_policy="all", capacity_factor=0.5,
          eval_capacity_factor=0.75, min_capacity=0), capacity_formula(NUM_TOKENS, NUM_EXPERTS, 2, 0.75, 0),
     False),
    ("switch_relu", dict(router="switch", top_k=1, activation="relu", capacity_factor=1.0, min_capacity=0),
     capacity_formula(NUM_TOKENS, NUM_EXPERTS, 1, 1.0, 0), True),
    # None: drop_tokens=False, no drops; the capacity is the fullest expert's count
    ("ffn_silu_no_drops", dict(activation="silu", drop_tokens=False, second_policy="all"), None, True),
]


def _grads(layer, x):
    named = {"x": x.grad, "router.weight": layer.router.weight.grad}
    for name, param in layer.experts.named_parameters():
        named[f"experts.{name}"] = param.grad
    return {name: grad.clone() for name, grad in named.items()}


def _run_both(layer, x, capacity, monkeypatch, train=True):
    """Forward + backward of the layer and of the reference on the same parameters."""
    layer.train(train)
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(11))
    uniform = uniforms(x.reshape(-1, D_MODEL).shape[0])
    x_lib = x.clone().requires_grad_(True)
    with monkeypatch.context() as patch:
        inject_uniforms(patch, uniform)
        out = layer(x_lib)
    ((out.output * upstream).sum() + out.aux_loss).backward()
    lib_grads = _grads(layer, x_lib)
    layer.zero_grad()
    x_ref = x.clone().requires_grad_(True)
    ref = layer_reference(layer, x_ref, capacity, uniform.tolist())
    ((ref.y * upstream).sum() + ref.aux_loss).backward()
    ref_grads = _grads(layer, x_ref)
    layer.zero_grad()
    return out, lib_grads, ref, ref_grads


@pytest.mark.parametrize(("overrides", "capacity", "train"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_layer_output_and_gradients_match_dense_reference(overrides, capacity, train, monkeypatch):
    layer = make_layer(**overrides)
    x = make_input(NUM_TOKENS)
    out, lib_grads, ref, ref_grads = _run_both(layer, x, capacity or 2 * NUM_TOKENS, monkeypatch, train)
    assert out.stats.capacity.item() == (capacity or max(ref.counts))
    assert out.output.shape == x.shape and out.output.dtype == x.dtype
    torch.testing.assert_close(out.output, ref.y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.aux_loss, ref.aux_loss, atol=1e-6, rtol=1e-5)
    assert lib_grads.keys() == ref_grads.keys()
    for name in lib_grads:
        torch.testing.assert_close(lib_grads[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_reference_cases_exercise_drops_and_both_policy_outcomes(monkeypatch):
    """Guards the table above: the fixed-capacity cases really drop, the random case really skips."""
    x = make_input(NUM_TOKENS)
    _, _, fixed, _ = _run_both(make_layer(second_policy="all", capacity=5), x, 5, monkeypatch)
    assert not all(all(row) for row in fixed.kept)
    _, _, rand, _ = _run_both(make_layer(expert="swiglu", expert_bias=True, capacity=6), x, 6, monkeypatch)
    second = [d.active[1] for d in rand.decisions]
    assert 0 < sum(second) < NUM_TOKENS


def test_random_second_policy_samples_in_eval_mode_too(monkeypatch):
    # GShard's reference (Lingvo's Top2GatingOnLogits) draws its uniforms whatever the mode: in
    # .eval() the 2nd choice is still dispatched iff 2*g2 > u, with the eval capacity factor
    layer = make_layer(second_policy="random")
    x = make_input(NUM_TOKENS)
    capacity = capacity_formula(NUM_TOKENS, NUM_EXPERTS, 2, layer.cfg.eval_capacity_factor, layer.cfg.min_capacity)
    out, lib_grads, ref, ref_grads = _run_both(layer, x, capacity, monkeypatch, train=False)
    second = [d.active[1] for d in ref.decisions]
    assert 0 < sum(second) < NUM_TOKENS  # both outcomes of the draw occur in this batch
    assert out.stats.second_dispatched_fraction.item() == pytest.approx(sum(second) / NUM_TOKENS)
    torch.testing.assert_close(out.output, ref.y, atol=1e-5, rtol=1e-5)
    for name in lib_grads:
        torch.testing.assert_close(lib_grads[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_all_second_policy_is_deterministic_in_eval_mode():
    layer = make_layer(second_policy="all").eval()
    x = make_input(NUM_TOKENS)
    first, again = layer(x), layer(x)
    assert torch.equal(first.output, again.output)
    assert first.stats.second_dispatched_fraction.item() == 1.0


def test_token_with_every_choice_dropped_outputs_exact_zero():
    layer = make_layer(second_policy="all", capacity=1)
    x = make_input(NUM_TOKENS)
    ref = layer_reference(layer, x, capacity=1)
    fully_dropped = [s for s in range(NUM_TOKENS) if not ref.kept[0][s] and not ref.kept[1][s]]
    assert len(fully_dropped) >= NUM_TOKENS - 2 * NUM_EXPERTS
    y = layer(x).output
    assert torch.equal(y[fully_dropped], torch.zeros(len(fully_dropped), D_MODEL))


def test_dropped_tokens_stay_zero_when_an_expert_outputs_nan():
    # E=2, capacity 1, policy all: the last expert's single slot is filled (by token 0's
    # second choice) and it outputs NaN; tokens whose every choice was dropped must still give 0
    layer = make_layer(num_experts=2, second_policy="all", capacity=1)
    with torch.no_grad():
        layer.experts.w2[1] = float("nan")
    x = make_input(NUM_TOKENS)
    ref = layer_reference(layer, x, capacity=1)
    fully_dropped = [s for s in range(NUM_TOKENS) if not ref.kept[0][s] and not ref.kept[1][s]]
    assert fully_dropped
    y = layer(x).output
    assert torch.equal(y[fully_dropped], torch.zeros(len(fully_dropped), D_MODEL))


def test_batched_input_matches_reference_and_keeps_its_shape():
    layer = make_layer(second_policy="all", capacity=4)
    x = make_input(12).view(3, 4, D_MODEL)
    out = layer(x)
    ref = layer_reference(layer, x, capacity=4)
    assert out.output.shape == (3, 4, D_MODEL)
    torch.testing.assert_close(out.output, ref.y, atol=1e-5, rtol=1e-5)


def test_float64_layer_returns_float64_matching_reference():
    layer = make_layer(second_policy="all", capacity=8).double()
    x = make_input(NUM_TOKENS).double()
    out = layer(x)
    assert out.output.dtype == torch.float64
    torch.testing.assert_close(out.output, layer_reference(layer, x, capacity=8).y, atol=1e-6, rtol=1e-6)


def test_bfloat16_layer_returns_bfloat16():
    layer = make_layer(second_policy="all").to(torch.bfloat16)
    out = layer(make_input(NUM_TOKENS).bfloat16())
    assert out.output.dtype == torch.bfloat16 and out.output.shape == (NUM_TOKENS, D_MODEL)
    assert torch.isfinite(out.output).all()


@pytest.mark.parametrize("options", [
    dict(), dict(router="switch"), dict(router="topk", top_k=3, z_loss_weight=0.1),
    dict(router="noisy_topk", importance_loss_weight=0.1, load_loss_weight=0.1),
    dict(router="expert_choice"), dict(router="deepspeed", top_k=1),
    dict(router="deepspeed", top_k=2, second_policy="all"),
    dict(router="deepspeed", top_k=3, aux_loss_weight=1.0),
], ids=lambda o: "-".join(str(v) for v in o.values()) or "gshard")
def test_zero_tokens_give_empty_output_and_zero_aux_loss(options):
    layer = make_layer(**options)
    x = torch.zeros(0, D_MODEL, requires_grad=True)
    y, aux, stats = layer(x)
    assert y.shape == (0, D_MODEL) and y.dtype == x.dtype
    assert aux.item() == 0.0  # no tokens, no loss: not NaN from a mean over nothing
    (y.sum() + aux).backward()
    assert x.grad.shape == (0, D_MODEL)
    assert stats.tokens_per_expert.tolist() == [0] * NUM_EXPERTS
    assert stats.dropped_fraction.item() == 0.0 and stats.k_eff.item() == 0.0


def test_zero_tokens_take_the_minimum_capacity():
    assert make_layer()(torch.zeros(0, D_MODEL)).stats.capacity.item() == 4  # min_capacity


def test_aux_loss_is_weight_times_load_balance_loss():
    x = make_input(NUM_TOKENS)
    layer = make_layer(second_policy="all", aux_loss_weight=0.3)
    aux = layer(x).aux_loss
    probs = (x @ layer.router.weight.detach().t()).softmax(-1)
    first = probs.argmax(-1).tolist()
    loss = NUM_EXPERTS * sum(first.count(e) / NUM_TOKENS * probs[:, e].mean().item() for e in range(NUM_EXPERTS))
    assert aux.item() == pytest.approx(0.3 * loss, rel=1e-5)
    assert make_layer(aux_loss_weight=0.0)(x).aux_loss.item() == 0.0
