"""Token masks, the sequence-wise balance loss and routing replay (R3), each against an
independent reference: the layer on the kept tokens alone, a plain loop over the sequences, and a
per-token loop over the recorded experts."""

from __future__ import annotations

import pytest
import torch

from expert_parallel import MoEConfig, routing
from tests.unit.layer_helpers import make_layer
from tests.unit.reference import expert_forward

BIG = dict(capacity=64)  # nothing drops


@pytest.mark.parametrize("fields", [dict(router="topk", **BIG), dict(router="gshard", **BIG),
                                    dict(router="deepspeed", drop_tokens=False)])
def test_masked_tokens_are_not_routed_and_the_kept_ones_equal_the_layer_on_them_alone(fields):
    layer = make_layer(second_policy="all", aux_loss_weight=1.0, z_loss_weight=0.1, **fields)
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(3), requires_grad=True)
    mask = torch.rand(3, 5, generator=torch.Generator().manual_seed(4)) > 0.4
    y, aux, stats = layer(x, token_mask=mask)
    (y.square().sum() + aux).backward()
    grad_x, grad_w = x.grad.clone(), layer.router.weight.grad.clone()
    x.grad = None
    layer.zero_grad()
    y_kept, aux_kept, stats_kept = layer(x[mask])
    (y_kept.square().sum() + aux_kept).backward()
    assert torch.equal(y[mask], y_kept)
    assert torch.equal(y[~mask], torch.zeros_like(y[~mask]))
    assert torch.equal(aux, aux_kept)
    for got, want in zip(stats, stats_kept):
        assert torch.equal(got, want)
    assert torch.equal(grad_x, x.grad) and torch.equal(grad_w, layer.router.weight.grad)


def test_a_mask_of_the_wrong_shape_or_dtype_is_refused_naming_the_fix():
    layer = make_layer()
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="token_mask has shape"):
        layer(x, token_mask=torch.ones(6, dtype=torch.bool))
    with pytest.raises(ValueError, match="token_mask must be a bool tensor"):
        layer(x, token_mask=torch.ones(2, 3))


def _reference_batch_loss(probs_SE: torch.Tensor, expert_SX: torch.Tensor) -> torch.Tensor:
    """``E * sum_e f_e * P_e`` written out: a loop over the experts."""
    num_tokens, num_experts = probs_SE.shape
    total = probs_SE.new_zeros(())
    for e in range(num_experts):
        share = float((expert_SX == e).sum()) / expert_SX.numel()
        total = total + share * probs_SE[:, e].sum() / num_tokens
    return num_experts * total


@pytest.mark.parametrize("router,top_k,columns", [("topk", 2, 2), ("gshard", 2, 1), ("switch", 1, 1)])
def test_sequence_scope_is_the_mean_of_the_per_sequence_batch_losses_value_and_router_gradient(router, top_k, columns):
    layer = make_layer(router=router, top_k=top_k, second_policy="all", aux_loss_weight=1.0,
                       aux_loss_scope="sequence", **BIG)
    x = torch.randn(3, 6, 8, generator=torch.Generator().manual_seed(5))
    aux = layer(x).aux_loss
    aux.backward()
    weight = layer.router.weight.detach().clone().requires_grad_(True)
    losses = []
    for sequence in x:
        probs_SE = torch.softmax(sequence @ weight.t(), dim=-1)
        expert_SX = probs_SE.detach().topk(top_k, dim=-1).indices[:, :columns]
        losses.append(_reference_batch_loss(probs_SE, expert_SX))
    want = torch.stack(losses).mean()
    want.backward()
    torch.testing.assert_close(aux, want)
    torch.testing.assert_close(layer.router.weight.grad, weight.grad)
    # and it is not the batch loss of the whole input
    assert not torch.allclose(make_layer(router=router, top_k=top_k, second_policy="all", aux_loss_weight=1.0,
                                         **BIG)(x).aux_loss, want)


def test_sequence_scope_leaves_masked_tokens_and_empty_sequences_out():
    layer = make_layer(router="topk", top_k=2, aux_loss_weight=1.0, aux_loss_scope="sequence", **BIG)
    x = torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(6))
    mask = torch.tensor([[1, 1, 0, 1], [0, 0, 0, 0], [1, 0, 1, 1]], dtype=torch.bool)
    weight = layer.router.weight.detach()
    want = []
    for sequence, keep in zip(x, mask):
        if keep.any():
            probs_SE = torch.softmax(sequence[keep] @ weight.t(), dim=-1)
            want.append(_reference_batch_loss(probs_SE, probs_SE.topk(2, dim=-1).indices))
    torch.testing.assert_close(layer(x, token_mask=mask).aux_loss, torch.stack(want).mean())


def test_aux_loss_scope_is_validated():
    with pytest.raises(ValueError, match="aux_loss_scope='token'"):
        MoEConfig(d_model=8, d_ff=8, num_experts=4, aux_loss_scope="token")
    with pytest.raises(ValueError, match="has no load-balancing loss"):
        MoEConfig(d_model=8, d_ff=8, num_experts=4, router="soft", aux_loss_scope="sequence")


@pytest.mark.parametrize("fields", [dict(router="topk", top_k=2, normalize_topk=True),
                                    dict(router="topk", top_k=2, scoring_func="sigmoid", normalize_topk=True,
                                         routed_scaling_factor=2.5, selection_bias=True),
                                    dict(router="gshard"), dict(router="switch")])
def test_replay_is_bit_identical_with_the_same_weights(fields):
    layer = make_layer(**fields, **BIG)
    x = torch.randn(2, 7, 8, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(11)
    with routing.record(layer) as rec:
        y = layer(x).output
    assert [tuple(e.shape) for e in rec.experts()] == [(14, layer.cfg.num_choices)]
    assert rec.experts()[0].dtype == torch.int16
    torch.manual_seed(12)  # another draw: GShard's random second choice comes from the record
    with routing.replay(layer, rec):
        assert torch.equal(layer(x).output, y)
    assert layer.routing_tape is None


@pytest.mark.parametrize("fields", [dict(router="topk", top_k=2, normalize_topk=True),
                                    dict(router="topk", top_k=2, scoring_func="sigmoid", normalize_topk=True),
                                    dict(router="gshard", second_policy="all")])
def test_replay_after_the_router_changed_uses_the_recorded_experts_with_weights_from_the_new_router(fields):
    layer = make_layer(**fields, **BIG)
    x = torch.randn(10, 8, generator=torch.Generator().manual_seed(8))
    with routing.record(layer) as rec:
        layer(x)
    recorded_SK = rec.experts()[0].long()
    with torch.no_grad():
        layer.router.weight.copy_(torch.randn(layer.router.weight.shape, generator=torch.Generator().manual_seed(9)))
    with routing.replay(layer, rec):
        y, _, stats = layer(x)
    assert torch.equal(stats.tokens_per_expert, torch.bincount(recorded_SK.reshape(-1), minlength=4))
    logits_SE = x @ layer.router.weight.detach().t()
    sigmoid = fields.get("scoring_func") == "sigmoid"
    scores_SE = torch.sigmoid(logits_SE) if sigmoid else torch.softmax(logits_SE, dim=-1)
    with torch.no_grad():
        for s in range(x.shape[0]):
            picked = [scores_SE[s, int(e)] for e in recorded_SK[s]]
            total = sum(picked)
            want = sum(p / total * expert_forward(layer, int(e), x[s]) for p, e in zip(picked, recorded_SK[s]))
            torch.testing.assert_close(y[s], want)
    assert not torch.equal(layer(x).stats.tokens_per_expert, stats.tokens_per_expert)  # the router did change


def test_replay_lets_the_router_learn_and_refuses_what_it_cannot_replay():
    layer = make_layer(router="topk", top_k=2, normalize_topk=True, **BIG)
    x = torch.randn(6, 8)
    with routing.record(layer) as rec:
        layer(x)
    with routing.replay(layer, rec):
        layer(x).output.sum().backward()
        with pytest.raises(RuntimeError, match="called 2 times"):
            layer(x)
    assert layer.router.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="router='soft'"):
        with routing.record(make_layer(router="soft")):
            pass
