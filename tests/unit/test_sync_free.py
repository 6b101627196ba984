"""With a fixed capacity the forward never reads a tensor back to the host.

On a GPU every such read (``.item()``, ``int(t)``, ``bool(t)``, ``.tolist()``, ``.cpu()``) is a
device sync that breaks CUDA-graph capture, and so is every tensor built from host data
(``torch.tensor(...)``, then copied to the device). The CPU cannot observe syncs, so this test
makes every host read and every ``torch.tensor``/``torch.as_tensor`` raise during the forward and
backward instead.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Iterator

import pytest
import torch

from expert_parallel import MoEConfig, MoELayer

HOST_READS = ("item", "tolist", "cpu", "numpy", "__int__", "__float__", "__bool__", "__index__")
HOST_BUILDS = ("tensor", "as_tensor")


@contextmanager
def host_reads_forbidden() -> Iterator[None]:
    """Within it, every host read and every ``torch.tensor``/``torch.as_tensor`` raises
    ``AssertionError`` (also used by the spawned ranks of tests/distributed)."""
    def forbidden(what):
        def call(*args, **kwargs):
            raise AssertionError(f"{what} in a fixed-capacity forward")
        return call

    saved = [(torch.Tensor, name, getattr(torch.Tensor, name)) for name in HOST_READS]
    saved += [(torch, name, getattr(torch, name)) for name in HOST_BUILDS]
    try:
        for owner, name, _ in saved:
            what = (f"host read Tensor.{name}" if owner is torch.Tensor
                    else f"torch.{name} (a host-to-device copy on GPU)")
            setattr(owner, name, forbidden(what))
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


@pytest.fixture
def no_host_reads():
    with ExitStack() as stack:
        yield lambda: stack.enter_context(host_reads_forbidden())


@pytest.mark.parametrize("options", [
    dict(router="gshard", second_policy="random"),
    dict(router="switch"),
    dict(router="topk", top_k=3, gate_after_topk=True, z_loss_weight=1e-3),
    dict(router="noisy_topk", top_k=2, importance_loss_weight=0.1, load_loss_weight=0.1),
    dict(router="expert_choice"),
    dict(router="topk", top_k=2, num_shared_experts=1, expert="swiglu", jitter_eps=0.01),
    dict(router="topk", top_k=2, expert_bias=True, expert_compute="padded"),
    dict(router="topk", top_k=2, expert_bias=True, num_chunks=4),  # chunks of 2, 2, 1, 1 slots
    dict(router="gshard", expert="swiglu", expert_compute="padded", num_chunks=2),
    dict(router="topk", top_k=2, scoring_func="sigmoid", n_group=4, topk_group=2, group_score="top2_sum",
         normalize_topk=True, routed_scaling_factor=2.5, bias_update_rate=1e-3, router_bias=True),
    dict(router="topk", top_k=3, n_group=2, topk_group=1, group_score="max", selection_bias=True,
         num_shared_experts=1, shared_expert_gate=True, expert="swiglu"),
], ids=lambda o: "-".join(str(v) for v in o.values()))
def test_fixed_capacity_forward_and_backward_read_nothing_back(no_host_reads, options):
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(d_model=16, d_ff=32, num_experts=8, capacity=6, **options))
    assert layer.filled_compute == (options.get("expert_compute") != "padded")
    x = torch.randn(4, 10, 16, requires_grad=True)
    no_host_reads()
    y, aux_loss, stats = layer(x)
    (y.sum() + aux_loss).backward()
    assert y.shape == x.shape  # attribute reads only: shape is host metadata, not a sync


@pytest.mark.parametrize("options", [dict(router="topk", top_k=2, expert_bias=True),
                                     dict(router="gshard", expert="swiglu", num_shared_experts=1),
                                     dict(router="topk", top_k=4, scoring_func="sigmoid", n_group=4, topk_group=2,
                                          group_score="top2_sum", bias_update_rate=1e-3, num_shared_experts=1,
                                          shared_expert_gate=True),
                                     dict(router="topk", top_k=2, max_tokens_per_rank=64, num_chunks=2)],
                         ids=["topk-bias", "gshard-swiglu-shared", "deepseek-v3-gated-shared", "bounded-chunked"])
def test_dropless_forward_and_backward_read_nothing_back(no_host_reads, options):
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(d_model=16, d_ff=32, num_experts=8, dropless=True, **options))
    x = torch.randn(4, 10, 16, requires_grad=True)
    no_host_reads()
    y, aux_loss, stats = layer(x)
    (y.sum() + aux_loss).backward()
    assert y.shape == x.shape
