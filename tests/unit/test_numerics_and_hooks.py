"""Precision (fp32 router and combine under bf16 and autocast), module hooks on the router, and
the device of the per-batch all-reduce."""

from __future__ import annotations

import pytest
import torch

from expert_parallel import MoEConfig, MoELayer
from expert_parallel.comm import device_for_backend
from expert_parallel.layout import assign_slots, combine
from tests.unit.layer_helpers import make_input, make_layer


def _logits_seen_by_hook(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    seen = []
    handle = layer.router.register_forward_hook(lambda module, args, out: seen.append(out[0].detach()))
    layer(x)
    handle.remove()
    assert len(seen) == 1, "the router's forward hooks must fire once per layer call"
    return seen[0]


def test_router_forward_hooks_fire_and_see_the_logits_the_layer_routes_on():
    layer = make_layer(router="switch", top_k=1)
    x = make_input(12)
    logits = _logits_seen_by_hook(layer, x)
    torch.testing.assert_close(logits, x @ layer.router.weight.t())
    pre = []
    layer.router.register_forward_pre_hook(lambda module, args: pre.append(args[0].shape))
    layer(x)
    assert pre == [(12, x.shape[-1])]


def test_router_computes_in_fp32_for_bf16_input():
    torch.manual_seed(0)
    layer = make_layer().to(torch.bfloat16)
    x = torch.randn(64, layer.cfg.d_model, dtype=torch.bfloat16) * 3
    logits = _logits_seen_by_hook(layer, x)
    assert logits.dtype == torch.float32
    # the fp32 product of the bf16 values, not a bf16 matmul (which rounds every logit to 8 bits)
    assert torch.equal(logits, x.float() @ layer.router.weight.float().t())
    assert not torch.equal(logits, (x @ layer.router.weight.t()).float())


def test_router_computes_in_fp32_under_autocast():
    torch.manual_seed(0)
    layer = make_layer()
    x = torch.randn(64, layer.cfg.d_model) * 3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = _logits_seen_by_hook(layer, x)
    assert logits.dtype == torch.float32
    assert torch.equal(logits, x @ layer.router.weight.t())


@pytest.mark.parametrize("options", [dict(), dict(expert="swiglu", num_shared_experts=1, router="topk", top_k=3)])
def test_layer_trains_under_bf16_autocast_close_to_fp32(options):
    torch.manual_seed(0)
    layer = make_layer(second_policy="all", **options) if "router" not in options else make_layer(**options)
    x = make_input(48).requires_grad_()
    want = layer(x).output
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        (out.output.sum() + out.aux_loss).backward()
    assert out.output.dtype == torch.float32 and out.output.shape == x.shape
    torch.testing.assert_close(out.output, want, rtol=5e-2, atol=5e-2)
    assert x.grad is not None and layer.router.weight.grad.abs().sum() > 0
    assert layer.experts.w1.grad.dtype == torch.float32


def test_combine_multiplies_and_accumulates_in_fp32_for_a_bf16_buffer():
    gen = torch.Generator().manual_seed(0)
    num_tokens, num_experts, top_k, capacity, dim = 64, 4, 3, 64, 32
    expert_SK = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(num_tokens)])
    plan = assign_slots(expert_SK, torch.ones_like(expert_SK, dtype=torch.bool), num_experts).plan(capacity)
    buffer_ECD = torch.randn(num_experts, capacity, dim, generator=gen).to(torch.bfloat16)
    weight_SK = torch.rand(num_tokens, top_k, generator=gen)
    y_SD = combine(buffer_ECD, plan, weight_SK)
    # float64 reference from the same bf16 expert outputs and fp32 weights
    flat = buffer_ECD.double().reshape(-1, dim)
    slot_SK = plan.flat_index_KS.t()
    want = (flat[slot_SK] * weight_SK.double().unsqueeze(-1)).sum(dim=1)
    assert y_SD.dtype == torch.float32
    torch.testing.assert_close(y_SD.double(), want, rtol=1e-6, atol=1e-6)


def test_bf16_layer_output_is_the_fp32_result_cast_once():
    torch.manual_seed(0)
    layer = make_layer(router="topk", top_k=3, capacity_factor=4.0).to(torch.bfloat16)
    x = make_input(64).to(torch.bfloat16)
    buffers = []
    layer.experts.register_forward_hook(lambda module, args, out: buffers.append(out.detach()))
    out = layer(x).output
    # rebuild the fp64 weighted sum from the layer's own bf16 expert outputs (EP = 1)
    logits = x.float() @ layer.router.weight.float().t()
    probs = logits.softmax(-1)
    weight_SK, expert_SK = probs.topk(3, dim=-1)
    plan = assign_slots(expert_SK, torch.ones_like(expert_SK, dtype=torch.bool), layer.cfg.num_experts).plan(
        int(layer(x).stats.capacity))
    flat = buffers[0].double().reshape(-1, x.shape[-1])
    want = (flat[plan.flat_index_KS.t()] * weight_SK.double().unsqueeze(-1)).sum(dim=1)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, want.to(torch.bfloat16)), "combine must round once, at the end"


@pytest.mark.parametrize(("backend", "device", "want"), [
    ("nccl", "cuda:1", "cuda:1"),  # the input's GPU, not the current device
    ("nccl", "cuda:3", "cuda:3"),
    ("gloo", "cpu", "cpu"),
    ("gloo", "cuda:1", "cpu"),
    ("cpu:gloo,cuda:nccl", "cuda:2", "cuda:2"),
    ("cpu:gloo,cuda:nccl", "cpu", "cpu"),
    ("xccl", "xpu:1", "xpu:1"),
])
def test_the_agreement_all_reduce_lives_on_the_inputs_device_where_the_backend_serves_it(backend, device, want):
    assert device_for_backend(backend, torch.device(device)) == torch.device(want)


def test_a_cpu_input_on_an_nccl_group_is_a_clear_error():
    with pytest.raises(ValueError, match=r"backend 'nccl' cannot all-reduce tensors on cpu.*move the layer"):
        device_for_backend("nccl", torch.device("cpu"))


def test_the_layer_asks_for_the_agreement_on_its_inputs_device(monkeypatch):
    import expert_parallel.layer as layer_module
    seen = []
    real_agree = layer_module.agree

    def recording_agree(local, group, device):
        seen.append(device)
        return real_agree(local, group, device)
    monkeypatch.setattr(layer_module, "agree", recording_agree)
    layer = MoELayer(MoEConfig(d_model=8, d_ff=16, num_experts=4))
    layer(torch.randn(5, 8))
    assert seen == [torch.device("cpu")]


@pytest.mark.parametrize("compute", ["filled", "padded"])
def test_chunked_layer_fires_each_exchange_phase_once_per_chunk_and_equals_one_chunk(compute):
    """``num_chunks=3`` at capacity 7 (chunks of 3, 2, 2 slots): ``dispatch``, ``experts`` and
    ``return`` fire once per chunk in the forward, in chunk order, and once per chunk in the
    backward; output and gradients equal the one-chunk layer's."""
    results = []
    for chunks in (1, 3):
        torch.manual_seed(0)
        layer = MoELayer(MoEConfig(d_model=16, d_ff=32, num_experts=4, capacity=7, num_chunks=chunks,
                                   router="topk", top_k=2, expert_compute=compute))
        marks = []
        layer.register_phase_hook(marks.append)
        x = torch.randn(20, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
        out = layer(x)
        out.output.pow(2).sum().backward()
        results.append((out.output, x.grad, [p.grad for p in layer.parameters()], marks))
    (y1, gx1, grads1, _), (y3, gx3, grads3, marks) = results
    torch.testing.assert_close(y3, y1)
    torch.testing.assert_close(gx3, gx1)
    for got, want in zip(grads3, grads1):
        torch.testing.assert_close(got, want)
    forward = [m for m in marks if m.startswith("fwd/")]
    assert forward == ["fwd/route", "fwd/plan", "fwd/pack"] + ["fwd/dispatch", "fwd/experts", "fwd/return"] * 3 + [
        "fwd/combine"]
    backward = [m for m in marks if m.startswith("bwd/")]
    assert {name: backward.count(f"bwd/{name}") for name in ("dispatch", "experts", "return")} == dict.fromkeys(
        ("dispatch", "experts", "return"), 3)
    assert backward[:2] == ["bwd/combine", "bwd/return"] and backward[-2:] == ["bwd/pack", "bwd/route"]
