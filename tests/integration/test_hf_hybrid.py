"""Hybrid and multimodal models (``families/hybrid.py``) beyond the generic tests of
test_huggingface.py, which check every family's step at EP 1 and EP 2 and its save: padded
batches, and greedy generation through each family's own cache (Mamba, gated DeltaNet,
short-convolution and lightning-attention states beside the KV cache), left-padded; and Qwen3.5-MoE's multimodal
``Qwen3_5MoeForConditionalGeneration`` (the text model's blocks under ``model.language_model``)
converted, against transformers, and saved back for plain transformers."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from expert_parallel.integrations.huggingface import ExpertParallelBlock, convert, to_hf_state_dict  # noqa: E402
from expert_parallel.integrations.huggingface.families import hybrid  # noqa: E402
from tests.integration.test_huggingface import (  # noqa: E402
    BATCH,
    SEQ,
    SIZES,
    assert_same_step,
    batch,
    run,
    tiny_model,
)

HYBRID = [spec.name for spec in hybrid.SPECS]


@pytest.mark.parametrize("name", HYBRID)
def test_padded_batches_and_greedy_generation_through_the_hybrid_cache_are_unchanged(name):
    """Padding (left and right) is not routed, and every hybrid mixer zeroes padded states, so the
    kept tokens' logits and the model's aux loss (which skips padding) are transformers'; in
    generation the converted blocks see one token per cached step, the mask's last column."""
    reference = tiny_model(name)
    model = convert(copy.deepcopy(reference))
    input_ids = batch(5)
    mask = torch.ones_like(input_ids)
    mask[0, :3] = mask[1, -2:] = 0
    got, want = (m(input_ids=input_ids, attention_mask=mask, output_router_logits=True) for m in (model, reference))
    torch.testing.assert_close(got.logits[mask.bool()], want.logits[mask.bool()], rtol=1e-4, atol=1e-5)
    if want.aux_loss is not None:
        torch.testing.assert_close(got.aux_loss, want.aux_loss, rtol=1e-5, atol=1e-6)

    for m in (model, reference):  # transformers' own aux loss fails on padded cached steps
        m.eval().config.output_router_logits = False
    prompt = batch(2)[:, :6]
    mask = torch.ones_like(prompt)
    mask[0, :2] = 0
    want = reference.generate(prompt, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(prompt, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0),
                       want)


def test_qwen3_5_moe_multimodal_model_converts_its_text_blocks_and_saves_back(tmp_path):
    """The text model's weights (decisive routing) in a tiny vision-language model; a text-only
    step: logits, router logits, aux loss and the text model's gradients as transformers'; the
    padding of the attention mask is not routed."""
    text = tiny_model("qwen3_5_moe")
    config = transformers.Qwen3_5MoeConfig(
        text_config=text.config.to_dict(),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=SIZES.d_model))
    config._attn_implementation = "eager"  # as the tiny models' and the loaded one's
    torch.manual_seed(0)
    reference = transformers.Qwen3_5MoeForConditionalGeneration(config)
    moved = {key.replace("model.", "model.language_model.", 1): value for key, value in text.state_dict().items()}
    missing, unexpected = reference.load_state_dict(moved, strict=False)
    assert not unexpected and all(key.startswith("model.visual.") for key in missing)
    keys = {key for key, _ in reference.named_parameters() if not key.startswith("model.visual.")}
    model = convert(copy.deepcopy(reference))
    blocks = [name for name, module in model.named_modules() if isinstance(module, ExpertParallelBlock)]
    assert blocks == [f"model.language_model.layers.{i}.mlp" for i in range(SIZES.layers)]
    want = run(reference, batch(1), keys)
    assert_same_step(run(model, batch(1), keys), want, want["grads"])
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[0, :3] = 0
    model(input_ids=batch(1), attention_mask=mask)  # the padding reaches the text model's blocks: not routed
    assert all(int(model.get_submodule(name).stats.tokens_per_expert.sum()) == SIZES.top_k * int(mask.sum())
               for name in blocks)

    state = to_hf_state_dict(model)
    assert list(state) == list(reference.state_dict())
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path, attn_implementation="eager")
    assert type(loaded) is type(reference)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=batch(3)).logits, reference(input_ids=batch(3)).logits)
