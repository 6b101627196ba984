"""Memory and speed features of the expert path: ``recompute="experts"`` against the dense
per-token reference, what it keeps for the backward, the filled-rows compaction (host path) against
the static permutation, the cached workspace, and ``torch.compile(fullgraph=True)``."""

from __future__ import annotations

import pytest
import torch

from expert_parallel import MoEConfig
from expert_parallel.layout import expert_rows
from tests.unit.layer_helpers import D_FF, make_input, make_layer
from tests.unit.test_layer import _run_both

NUM_TOKENS = 24


@pytest.mark.parametrize("overrides", [
    dict(expert="swiglu", expert_bias=True, capacity=6),
    dict(activation="relu", second_policy="all", capacity=5, expert_compute="padded"),
    dict(expert="swiglu", second_policy="all", capacity=5, expert_compute="padded"),
], ids=["filled-swiglu-bias", "padded-ffn-relu", "padded-swiglu"])
def test_recompute_experts_gives_the_dense_references_output_and_gradients(overrides, monkeypatch):
    layer = make_layer(recompute="experts", **overrides)
    assert layer.experts.recompute and layer.filled_compute == (overrides.get("expert_compute") != "padded")
    out, lib_grads, ref, ref_grads = _run_both(layer, make_input(NUM_TOKENS), overrides["capacity"], monkeypatch)
    torch.testing.assert_close(out.output, ref.y, atol=1e-5, rtol=1e-5)
    for name in lib_grads:
        torch.testing.assert_close(lib_grads[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def _saved_widths(layer, x) -> list[int]:
    """The last dimension of every activation (no parameter) autograd keeps for the backward of one forward."""
    widths = []

    def pack(tensor):
        if not isinstance(tensor, torch.nn.Parameter):
            widths.append(tensor.shape[-1] if tensor.dim() else 0)
        return tensor
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        layer(x)
    return widths


@pytest.mark.parametrize("compute", ["filled", "padded"])
def test_recompute_experts_keeps_no_hidden_activation_for_the_backward(compute):
    x = make_input(NUM_TOKENS).requires_grad_()
    kept = _saved_widths(make_layer(expert="swiglu", capacity=6, expert_compute=compute), x)
    assert D_FF in kept  # without recompute the [rows, d_ff] activations are kept
    assert D_FF not in _saved_widths(make_layer(expert="swiglu", capacity=6, expert_compute=compute,
                                                recompute="experts"), x)


def test_swiglu_and_combine_keep_only_what_their_backwards_read():
    # SwiGLU: x w1, x w3 and their product (silu(x w1) is recomputed); combine: its [E*C, D] input,
    # not the weighted product as well
    layer = make_layer(expert="swiglu", capacity=20, second_policy="all")  # 80 slots, 48 of them filled
    shapes = []

    def pack(tensor):
        if not isinstance(tensor, torch.nn.Parameter):
            shapes.append(tuple(tensor.shape))
        return tensor
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        layer(make_input(NUM_TOKENS).requires_grad_())
    assert sum(shape[-1] == D_FF for shape in shapes) == 3
    assert shapes.count((layer.cfg.num_experts * 20, layer.cfg.d_model)) == 1


def test_recompute_must_be_none_or_experts():
    with pytest.raises(ValueError, match=r"MoEConfig.recompute='all' is invalid: choose one of \['none', 'experts'\]"):
        MoEConfig(d_model=8, d_ff=12, num_experts=4, recompute="all")


def test_the_host_compaction_gathers_the_static_permutations_filled_rows(monkeypatch):
    fill_RL = torch.tensor([[3, 0, 2], [1, 4, 0]])  # 2 sources, 3 local experts, capacity 4
    received = torch.randn(2, 3, 4, 5, requires_grad=True)
    host = expert_rows(fill_RL, 4)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # the static path, as while tracing
    static = expert_rows(fill_RL, 4)
    monkeypatch.undo()
    assert host.inverse_M is None and static.inverse_M is not None
    torch.testing.assert_close(host.offsets_L, static.offsets_L)
    rows = host.gather(received)
    assert rows.shape == (10, 5)
    torch.testing.assert_close(rows, static.gather(received)[:10])
    # expert by expert, every source in turn: expert 0 takes source 0's 3 slots, then source 1's 1
    torch.testing.assert_close(rows[:4], torch.cat([received[0, 0, :3], received[1, 0, :1]]))
    back = host.scatter(rows * 2, received)
    filled = torch.arange(4) < fill_RL.unsqueeze(-1)
    torch.testing.assert_close(back[filled], 2 * received[filled])
    back[filled].sum().backward()
    torch.testing.assert_close(received.grad, 2 * filled.unsqueeze(-1).expand_as(received).float())


def test_the_workspace_hands_the_same_buffers_out_step_after_step():
    layer = make_layer(expert="swiglu", capacity=6)
    x = make_input(NUM_TOKENS).requires_grad_()
    pointers = []
    for _ in range(3):
        out = layer(x)
        pointers.append(out.output.grad_fn is not None and {
            name: buffer.data_ptr() for (name, *_), (buffer, _) in layer.workspace._buffers.items()})
        (out.output.sum() + out.aux_loss).backward()
    assert len(layer.workspace) > 0 and pointers[1] == pointers[2]


def test_two_forwards_before_their_backwards_do_not_share_a_buffer(monkeypatch):
    # gradient accumulation: the first forward's saved buffers must survive the second forward
    layer = make_layer(expert="swiglu", capacity=6, second_policy="all")
    first, second = make_input(NUM_TOKENS, seed=1), make_input(NUM_TOKENS, seed=2)
    (layer(first).output.sum() + layer(second).output.mul(2).sum()).backward()
    together = {name: p.grad.clone() for name, p in layer.named_parameters()}
    layer.zero_grad()
    layer(first).output.sum().backward()
    layer(second).output.mul(2).sum().backward()
    for name, param in layer.named_parameters():
        torch.testing.assert_close(together[name], param.grad, msg=name)


@pytest.mark.slow
def test_torch_compile_fullgraph_with_a_fixed_capacity_equals_eager():
    layer = make_layer(expert="swiglu", capacity=6, second_policy="all")  # filled in eager, fp32 on the CPU
    x = make_input(NUM_TOKENS).requires_grad_()
    compiled = torch.compile(layer, fullgraph=True)  # a graph break would raise
    results = []
    for module in (compiled, layer):
        out = module(x)
        (out.output.sum() + out.aux_loss).backward()
        results.append((out.output.detach(), x.grad.clone(), {n: p.grad.clone() for n, p in layer.named_parameters()}))
        layer.zero_grad()
        x.grad = None
    (y_c, dx_c, grads_c), (y_e, dx_e, grads_e) = results
    torch.testing.assert_close(y_c, y_e, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dx_c, dx_e, atol=1e-5, rtol=1e-5)
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], atol=1e-5, rtol=1e-4, msg=name)
