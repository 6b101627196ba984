"""Run an expert-parallel MoE layer on 2 local gloo ranks (CPU) and print what it did.

    python examples/two_ranks.py
"""

from __future__ import annotations

import torch

from expert_parallel import MoEConfig, MoELayer
from expert_parallel.comm import expert_groups, reduce_gradients
from expert_parallel.spawn import run_ranks


def train_a_few_steps(rank: int, world_size: int) -> list[str]:
    """Each rank holds 4 of the 8 experts; tokens travel to their experts by all-to-all."""
    torch.manual_seed(0)  # same dense weights on every rank
    cfg = MoEConfig(d_model=64, d_ff=256, num_experts=8, top_k=2, router="gshard",
                    second_policy="random", capacity_factor=1.25, ep_size=world_size)
    layer = MoELayer(cfg)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    torch.manual_seed(1 + rank)  # every rank sees its own tokens
    x = torch.randn(4, 32, cfg.d_model)
    target = torch.randn_like(x)
    lines = []
    for step in range(5):
        y, aux_loss, stats = layer(x)
        loss = torch.nn.functional.mse_loss(x + y, target) + aux_loss
        optimizer.zero_grad()
        loss.backward()
        # router: averaged over all ranks; experts: over their replicas (none at ep = world)
        reduce_gradients(layer, expert_groups(cfg.ep_size))
        optimizer.step()
        lines.append(f"rank {rank} step {step}: loss {loss.item():.4f}  capacity {int(stats.capacity)}  "
                     f"dropped {float(stats.dropped_fraction):.1%}  k_eff {float(stats.k_eff):.2f}")
    return lines


if __name__ == "__main__":
    for rank_lines in run_ranks(train_a_few_steps, 2, timeout=300):
        print("\n".join(rank_lines))
