"""A converted model passes its attention mask to the blocks: padding is not routed (no slot, output
0, in no statistic), the kept tokens get what the layer gives them alone; the blocks expose their
``RoutingStats``."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from expert_parallel.integrations.huggingface import ExpertParallelBlock, convert  # noqa: E402


def _converted() -> transformers.PreTrainedModel:
    config = transformers.MixtralConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=48, num_local_experts=4,
                                        num_experts_per_tok=2, max_position_embeddings=32)
    torch.manual_seed(0)
    return convert(transformers.AutoModelForCausalLM.from_config(config))


def test_the_attention_mask_is_the_blocks_token_mask_and_their_stats_count_kept_tokens_only():
    model = _converted()
    blocks = [module for module in model.modules() if isinstance(module, ExpertParallelBlock)]
    seen = []
    for block in blocks:
        block.register_forward_hook(lambda module, args, output: seen.append((args[0].detach(), output.detach())))
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    model(input_ids=ids, attention_mask=mask)
    kept = mask.bool()
    for block, (hidden, output) in zip(blocks, seen):
        assert int(block.stats.tokens_per_expert.sum()) == 2 * int(kept.sum())
        assert torch.equal(output[~kept], torch.zeros_like(output[~kept]))
        torch.testing.assert_close(output[kept], block.moe(hidden[kept]).output)
    model(input_ids=ids)  # no mask: every token is routed
    assert all(int(block.stats.tokens_per_expert.sum()) == 2 * ids.numel() for block in blocks)
