"""Variants of the softmax-router families (families/softmax.py) that their tiny models, which
test_huggingface.py runs for every spec, do not take: blocks without shared experts (the spec's
shared-expert maps then drop out), Cohere 2's sigmoid selection and summed shared experts,
Hunyuan's single ``moe_topk``. Each against transformers' own model at EP 1, and saved back."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

from expert_parallel.integrations.huggingface import convert, to_hf_state_dict  # noqa: E402
from tests.integration.test_huggingface import assert_same_step, batch, run, tiny_model, trained_keys  # noqa: E402

VARIANTS = [
    ("cohere2_moe", dict(num_shared_experts=0)),
    ("cohere2_moe", dict(expert_selection_fn="sigmoid", norm_topk_prob=True, shared_expert_combination_strategy="sum")),
    ("cohere2_moe", dict(expert_selection_fn="sigmoid", norm_topk_prob=False, num_shared_experts=2)),
    ("ernie4_5_moe", dict(moe_num_shared_experts=0)),
    ("hunyuan_v1_moe", dict(moe_topk=3)),
]


@pytest.mark.parametrize(("name", "config"), VARIANTS, ids=[f"{name}-{sorted(c)}" for name, c in VARIANTS])
def test_family_variant_equals_transformers_at_ep1_and_saves_back(name, config):
    reference = tiny_model(name, **config)
    keys = trained_keys(reference)
    model = convert(copy.deepcopy(reference))
    want = run(reference, batch(1), keys)
    assert_same_step(run(model, batch(1), keys), want, want["grads"])
    state, original = to_hf_state_dict(model), reference.state_dict()
    assert list(state) == list(original)
    assert all(torch.equal(state[key], value) for key, value in original.items())


def test_hunyuan_per_layer_top_k_that_differ_are_refused_naming_the_field():
    with pytest.raises(ValueError, match=r"HunYuanMoEV1Moe: config.moe_topk=\[2, 3\] differs between layers"):
        convert(tiny_model("hunyuan_v1_moe", moe_topk=[2, 3]))
