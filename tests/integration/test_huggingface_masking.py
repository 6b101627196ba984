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


def test_routing_replay_works_on_a_converted_model():
    from expert_parallel import routing

    model = _converted()
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(2))
    with routing.record(model) as rec:
        logits = model(input_ids=ids).logits
    assert len(rec.calls) == 2
    with routing.replay(model, rec):
        assert torch.equal(model(input_ids=ids).logits, logits)


def test_bias_update_rate_reaches_a_converted_deepseek_v3_router():
    from launch.hf import bias_update_override

    config = transformers.DeepseekV3Config(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           num_key_value_heads=4, intermediate_size=48, n_routed_experts=4,
                                           n_shared_experts=1, moe_intermediate_size=16, num_experts_per_tok=2,
                                           first_k_dense_replace=1, n_group=1, topk_group=1, q_lora_rank=16,
                                           kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)
    model = convert(transformers.AutoModelForCausalLM.from_config(config), **bias_update_override(0.01, config))
    routers = [module.moe.router for module in model.modules() if isinstance(module, ExpertParallelBlock)]
    assert routers and all(router.bias_update_rate == 0.01 and router.selection_load is not None for router in routers)
