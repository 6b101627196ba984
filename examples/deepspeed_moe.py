"""Train a model with the drop-in DeepSpeed ``MoE`` under ``deepspeed.initialize`` (ZeRO-2) on 2
local gloo ranks (CPU), and save and reload an engine checkpoint.

    python examples/deepspeed_moe.py

docs/deepspeed.md ("A runnable example") shows the lines between the ``snippet`` markers;
tests/integration/test_examples.py runs this file and checks that the doc's lines are these.
"""

from __future__ import annotations

import tempfile

import torch
from torch import nn

from expert_parallel.spawn import run_ranks


def train(rank: int, world_size: int, directory: str) -> list[str]:
    """A few steps on this rank's batch; then save, reload, and the same loss."""
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend=dist.get_backend())  # wraps the spawned gloo group
    torch.manual_seed(0)  # the same dense weights on every rank
    generator = torch.Generator().manual_seed(rank)
    x, target = torch.randn(4, 8, 16, generator=generator), torch.randn(4, 8, 16, generator=generator)
    # snippet: start
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    from expert_parallel.integrations.deepspeed import MoE  # was: from deepspeed.moe.layer import MoE

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            expert = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
            self.moe = MoE(hidden_size=16, expert=expert, num_experts=4, ep_size=2, k=2, capacity_factor=1.25)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            y, l_aux, _ = self.moe(x)
            return x + y, l_aux

    model = Model()
    groups = split_params_into_different_moe_groups_for_optimizer(
        {"params": list(model.parameters()), "name": "parameters"})  # DeepSpeed needs the "name"
    config = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2}, "gradient_clipping": 1.0}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(groups, lr=1e-2), config=config)
    for _ in range(4):
        y, l_aux = engine(x)
        loss = nn.functional.mse_loss(y, target) + 0.01 * l_aux
        engine.backward(loss)
        engine.step()
    engine.save_checkpoint(directory)  # every rank; one file per global expert
    # snippet: end
    def evaluate() -> float:
        torch.manual_seed(1)  # the same draws each time: DeepSpeed samples the 2nd expert in eval too
        with torch.no_grad():
            y, _ = engine(x)
        return nn.functional.mse_loss(y, target).item()

    engine.eval()
    saved = evaluate()
    with torch.no_grad():
        for param in engine.module.parameters():
            param.zero_()
    engine.load_checkpoint(directory)
    return [f"rank {rank}: loss {loss.item():.4f} at step 4, {saved:.6f} saved, {evaluate():.6f} reloaded"]


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as directory:
        for rank_lines in run_ranks(train, 2, directory, timeout=300):
            print("\n".join(rank_lines))
