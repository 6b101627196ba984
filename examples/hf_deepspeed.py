"""Train a converted transformers MoE model under DeepSpeed on 2 local gloo ranks (CPU), save it
with plain ``save_pretrained`` and load it back with plain transformers.

    python examples/hf_deepspeed.py

docs/huggingface.md ("Under DeepSpeed") shows the lines between the ``snippet`` markers;
tests/integration/test_examples.py runs this file and checks that the doc's lines are these.
"""

from __future__ import annotations

import tempfile

import torch

from expert_parallel.spawn import run_ranks

DS_CONFIG = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
             "zero_optimization": {"stage": 2}, "steps_per_print": 10 ** 6}


def tiny_mixtral():
    """A tiny random Mixtral (4 experts, top-2), the same on every rank."""
    import transformers

    config = transformers.MixtralConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2, output_router_logits=True)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config)


def train(rank: int, world_size: int, directory: str) -> list[str]:
    """A few ZeRO-2 steps on this rank's batches, then save; rank 0 reloads the checkpoint."""
    import deepspeed
    import torch.distributed as dist
    import transformers

    deepspeed.init_distributed(dist_backend=dist.get_backend())  # wraps the spawned gloo group
    model, config = tiny_mixtral(), DS_CONFIG
    generator = torch.Generator().manual_seed(rank)
    batches = [torch.randint(0, 96, (2, 16), generator=generator)] * 4  # one batch, seen 4 times
    # snippet: start
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    from expert_parallel.integrations.deepspeed import EngineModel
    from expert_parallel.integrations.huggingface import convert

    engine_model = EngineModel(convert(model, ep_size=2), ep_size=2)  # every rank; 2 of 4 experts each
    groups = split_params_into_different_moe_groups_for_optimizer(
        {"params": list(engine_model.parameters()), "name": "parameters"})  # DeepSpeed needs the "name"
    optimizer = torch.optim.AdamW(groups, lr=1e-2)
    engine, *_ = deepspeed.initialize(model=engine_model, optimizer=optimizer, config=config)
    for input_ids in batches:
        loss = engine(input_ids=input_ids, labels=input_ids).loss  # includes the router aux loss
        engine.backward(loss)
        engine.step()
    model.save_pretrained(directory)  # every rank (the experts are gathered); rank 0 writes
    # snippet: end
    lines = [f"rank {rank}: loss {engine(input_ids=batches[0], labels=batches[0]).loss.item():.4f} after "
             f"{len(batches)} steps"]
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=batches[0]).logits
    if rank == 0:
        loaded = transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager")
        with torch.no_grad():
            diff = (loaded(input_ids=batches[0]).logits - trained).abs().max().item()
        lines.append(f"rank 0: reloaded by plain transformers, max |logits - trained logits| = {diff:.2e}")
    return lines


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as directory:
        for rank_lines in run_ranks(train, 2, directory, timeout=300):
            print("\n".join(rank_lines))
