"""DeepSeek-V3's auxiliary-loss-free balancing on one process: the layer counts its routed tokens in
training forwards, ``comm.update_selection_biases`` applies ``bias_e += u * sign(mean - load_e)``
(checked against hand-computed steps), and the bias evens out a skewed router over steps."""

from __future__ import annotations

import torch
from torch import nn
from torch.testing import assert_close

from expert_parallel import MoEConfig, MoELayer
from expert_parallel.comm import update_selection_biases

D, E = 8, 8


def _layer(seed: int = 0, **options) -> MoELayer:
    torch.manual_seed(seed)
    fields = dict(d_model=D, d_ff=12, num_experts=E, router="topk", top_k=2, dropless=True, scoring_func="sigmoid",
                  bias_update_rate=0.1)
    return MoELayer(MoEConfig(**{**fields, **options}))


def test_update_applies_u_times_the_sign_of_mean_minus_load_hand_computed():
    layer = _layer(bias_update_rate=0.25)
    router = layer.router
    router.count_selection(torch.tensor([5, 1, 3, 3, 0, 6, 3, 3]))
    router.count_selection(torch.tensor([1, 1, 3, 3, 4, 0, 3, 1]))  # loads [6, 2, 6, 6, 4, 6, 6, 4]: mean 5
    update_selection_biases(layer)
    assert router.selection_bias.tolist() == [-0.25, 0.25, -0.25, -0.25, 0.25, -0.25, -0.25, 0.25]
    assert router.selection_load.tolist() == [0] * E
    router.count_selection(torch.tensor([2, 2, 2, 2, 2, 2, 2, 2]))  # at the mean: no change
    update_selection_biases(layer)
    assert router.selection_bias.tolist() == [-0.25, 0.25, -0.25, -0.25, 0.25, -0.25, -0.25, 0.25]
    router.count_selection(torch.tensor([0, 9, 1, 1, 1, 1, 1, 2]))  # mean 2
    update_selection_biases(layer)
    assert router.selection_bias.tolist() == [0.0, 0.0, 0.0, 0.0, 0.5, 0.0, 0.0, 0.25]


def test_training_forwards_count_routed_tokens_and_eval_forwards_do_not():
    layer = _layer()
    counts = torch.zeros(E, dtype=torch.long)
    for seed in (1, 2):
        stats = layer(torch.randn(3, 7, D, generator=torch.Generator().manual_seed(seed))).stats
        counts += stats.tokens_per_expert
    assert counts.sum() == 2 * 21 * 2
    assert torch.equal(layer.router.selection_load, counts)
    layer.eval()
    layer(torch.randn(5, D))
    assert torch.equal(layer.router.selection_load, counts)
    update_selection_biases(layer)
    mean = counts.float().mean()
    assert_close(layer.router.selection_bias, 0.1 * torch.sign(mean - counts.float()))


def test_bias_changes_selection_but_not_the_combine_weights():
    layer = _layer().eval()
    x = torch.randn(16, D, generator=torch.Generator().manual_seed(3))
    logits = layer.router(x)[0]
    before = layer(x).stats.tokens_per_expert
    with torch.no_grad():
        layer.router.selection_bias[int(before.argmax())] = -10.0  # the busiest expert is never chosen
    from expert_parallel.routing import route
    routing = route(logits, layer.cfg, selection_bias_E=layer.router.selection_bias)
    assert not (routing.expert_SK == before.argmax()).any()
    assert_close(routing.weight_SK, torch.sigmoid(logits).gather(-1, routing.expert_SK))


def test_one_update_covers_every_counting_router_and_skips_the_others():
    model = nn.Sequential(_layer(0, bias_update_rate=0.5), _layer(1, bias_update_rate=0.0, selection_bias=True),
                          _layer(2, bias_update_rate=0.125))
    assert model[1].router.selection_load is None  # held for a converted model, never updated
    model[0].router.count_selection(torch.tensor([1, 0, 0, 0, 0, 0, 0, 7]))
    model[2].router.count_selection(torch.tensor([0, 4, 0, 0, 0, 0, 0, 4]))
    update_selection_biases(model)
    assert model[0].router.selection_bias.tolist() == [0.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, -0.5]
    assert model[1].router.selection_bias.tolist() == [0.0] * E
    assert model[2].router.selection_bias.tolist() == [0.125, -0.125, 0.125, 0.125, 0.125, 0.125, 0.125, -0.125]
    update_selection_biases(nn.Linear(2, 2))  # nothing to update


def test_selection_bias_evens_out_a_skewed_router_over_steps():
    """50 forward + update steps on fixed input with a router bias skewed towards two experts:
    the busiest expert's load over the mean falls clearly."""
    layer = _layer(router_bias=True, bias_update_rate=0.01)
    with torch.no_grad():
        layer.router.bias.copy_(torch.tensor([2.0, 1.5, 0.0, 0.0, -0.5, -0.5, -1.0, -1.0]))
    x = torch.randn(256, D, generator=torch.Generator().manual_seed(4))
    skew = []
    for _ in range(50):
        load = layer(x).stats.tokens_per_expert.float()
        skew.append(float(load.max() / load.mean()))
        update_selection_biases(layer)
    assert skew[0] > 3.0, skew[0]
    assert max(skew[-5:]) < 1.5, skew[-5:]
