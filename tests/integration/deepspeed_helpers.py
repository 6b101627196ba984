"""Shared pieces of the DeepSpeed integration tests: models, workers run on spawned gloo ranks."""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
from torch import nn

D_MODEL, D_FF, NUM_EXPERTS = 8, 16, 4


def init_deepspeed_comm() -> None:
    """Wrap the harness' torch.distributed group in deepspeed.comm (the engine does this too)."""
    import deepspeed
    import torch.distributed as dist

    if not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(dist_backend=dist.get_backend())


class SwiGLU(nn.Module):
    """A LLaMA-style SwiGLU expert block."""

    def __init__(self, d_model: int = D_MODEL, d_ff: int = D_FF) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class ResidualExpert(nn.Module):
    """Not a plain MLP (a residual inside, a tuple output): must take the generic path."""

    def __init__(self, d_model: int = D_MODEL, d_ff: int = D_FF) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d_model, d_ff), nn.Tanh(), nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return x + self.fc2(self.act(self.fc1(x))), None


def make_expert(kind: str) -> nn.Module:
    if kind == "mlp":
        return nn.Sequential(nn.Linear(D_MODEL, D_FF), nn.GELU(), nn.Linear(D_FF, D_MODEL))
    if kind == "mlp_nobias_relu":
        return nn.Sequential(nn.Linear(D_MODEL, D_FF, bias=False), nn.ReLU(), nn.Linear(D_FF, D_MODEL, bias=False))
    if kind == "swiglu":
        return SwiGLU()
    return ResidualExpert()


def moe_class(which: str) -> type:
    if which == "deepspeed":
        from deepspeed.moe.layer import MoE
    else:
        from expert_parallel.integrations.deepspeed import MoE
    return MoE


def grads_as_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's gradient, under the module's state-dict keys (so both layouts compare)."""
    saved = [p.data for p in module.parameters()]
    for param in module.parameters():
        param.data = param.grad if param.grad is not None else torch.zeros_like(param)
    grads = {key: value.clone() for key, value in module.state_dict().items()}
    for param, data in zip(module.parameters(), saved):
        param.data = data
    return grads


def _run_layer(layer: nn.Module, x: torch.Tensor, seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    x = x.clone().requires_grad_()
    y, l_aux, exp_counts = layer(x)
    (y.pow(2).sum() + l_aux).backward()
    return {"y": y.detach(), "l_aux": l_aux.detach(), "exp_counts": exp_counts, "x_grad": x.grad,
            "grads": grads_as_state_dict(layer)}


def parity_worker(rank: int, world: int, cases: list[dict]) -> list[dict]:
    """For each case: DeepSpeed's MoE and ours on the same weights and input (ep = world), in
    training mode or, with ``case["eval"]``, both in eval mode."""
    init_deepspeed_comm()
    results = []
    for case in cases:
        kwargs = dict(case["kwargs"], num_experts=NUM_EXPERTS, ep_size=world)
        torch.manual_seed(0)
        expert = make_expert(case.get("expert", "mlp"))
        reference = moe_class("deepspeed")(D_MODEL, expert, **kwargs)
        reference.set_deepspeed_parallelism()
        with torch.no_grad():  # distinct experts per rank, so misrouting shows
            torch.manual_seed(1 + rank)
            for param in reference.parameters():
                param.add_(0.1 * torch.randn_like(param))
        # a copy: with use_residual both layers keep the template itself as their dense ``mlp``
        ours = moe_class("ours")(D_MODEL, copy.deepcopy(expert), **kwargs, **case.get("extra", {}))
        ours.load_state_dict(reference.state_dict())
        reference.train(not case.get("eval", False))
        ours.train(not case.get("eval", False))
        torch.manual_seed(100 + rank)
        x = torch.randn(4, case.get("tokens", 16), D_MODEL)
        seed = 7 + rank
        results.append({"deepspeed": _run_layer(reference, x, seed), "ours": _run_layer(ours, x, seed),
                        "name": case["name"], "hierarchical": ours.deepspeed_moe.node_ranks is not None})
    return results


def sampled_stats_worker(rank: int, world: int, options: list[dict], draws: int) -> list[dict[str, dict]]:
    """Per layer options (one spawn for all of them): the exp_counts and kept-token fractions of
    ``draws`` independent seeds, for both layers."""
    init_deepspeed_comm()
    return [_sampled_stats(kwargs, draws) for kwargs in options]


def _sampled_stats(kwargs: dict, draws: int) -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    for which in ("deepspeed", "ours"):
        torch.manual_seed(0)
        layer = moe_class(which)(D_MODEL, make_expert("mlp"), num_experts=NUM_EXPERTS, **kwargs)
        layer.set_deepspeed_parallelism()
        torch.manual_seed(3)
        x = torch.randn(64, D_MODEL) * 0.2
        counts, kept = [], []
        for draw in range(draws):
            torch.manual_seed(1000 * (which == "ours") + draw)  # independent streams
            with torch.no_grad():
                y, _, exp_counts = layer(x)
            counts.append(exp_counts.float())
            kept.append((y.abs().sum(-1) > 0).float().mean())
        out[which] = {"counts": torch.stack(counts), "kept": torch.stack(kept)}
    return out


class TinyModel(nn.Module):
    """Linear -> MoE -> Linear regression model for engine tests."""

    def __init__(self, moe_cls: type, ep_size: int, **moe_kwargs: Any) -> None:
        super().__init__()
        self.inp = nn.Linear(D_MODEL, D_MODEL)
        self.moe = moe_cls(D_MODEL, make_expert("mlp"), num_experts=NUM_EXPERTS, ep_size=ep_size,
                           min_capacity=0, **moe_kwargs)
        self.out = nn.Linear(D_MODEL, 1)

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        hidden, l_aux, _ = self.moe(torch.relu(self.inp(x)))
        return nn.functional.mse_loss(self.out(hidden).float().squeeze(-1), target) + 0.01 * l_aux


def tiny_model_ep1(seed: int = 0) -> TinyModel:
    """``TinyModel`` with our drop-in at EP 1, as ``make_engine("ours", 1, ...)`` builds it (no engine)."""
    torch.manual_seed(seed)
    return TinyModel(moe_class("ours"), 1, **PARITY_MOE)


def make_engine(which: str, ep_size: int, stage: int, bf16: bool, seed: int = 0, distinct_experts: bool = False,
                **moe_kwargs: Any):
    """A DeepSpeed engine around ``TinyModel`` (client AdamW on DeepSpeed's MoE param groups).

    Every expert starts as a copy of the template; ``distinct_experts`` perturbs each one
    differently (the same draws on every rank), so an expert loaded in the wrong place shows.
    """
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    torch.manual_seed(seed)
    model = TinyModel(moe_class(which), ep_size, **moe_kwargs)
    if distinct_experts:
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for param in model.moe.deepspeed_moe.experts.parameters():
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    param_groups = split_params_into_different_moe_groups_for_optimizer(
        {"params": list(model.parameters()), "name": "parameters"})
    optimizer = torch.optim.AdamW(param_groups, lr=1e-2)
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
              "gradient_clipping": 1.0, "zero_optimization": {"stage": stage},
              "bf16": {"enabled": bf16}, "steps_per_print": 10 ** 6, "wall_clock_breakdown": False}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def batch(rank: int, step: int, bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(4, 8, D_MODEL, generator=generator)
    target = torch.randn(4, 8, generator=generator)
    return (x.bfloat16() if bf16 else x), target


def train_steps(engine, rank: int, steps: range, bf16: bool) -> list[float]:
    losses = []
    for step in steps:
        torch.manual_seed(step)  # the same draws in both libraries (none at parity settings)
        loss = engine(*batch(rank, 0, bf16))  # one batch per rank, fitted step after step
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


PARITY_MOE = {"k": 2, "top2_2nd_expert_sampling": False, "capacity_factor": 1.0}


def engine_training_worker(rank: int, world: int, runs: list[tuple[int, int, bool]],
                           steps: int) -> dict[tuple, dict[str, list[float]]]:
    """Loss per step of ours and DeepSpeed's MoE for each (ep_size, zero stage, bf16) run."""
    out = {}
    for ep_size, stage, bf16 in runs:
        out[(ep_size, stage, bf16)] = {
            which: train_steps(make_engine(which, ep_size, stage, bf16, **PARITY_MOE), rank, range(steps), bf16)
            for which in ("deepspeed", "ours")
        }
    return out


def _snapshot(engine) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in engine.module.named_parameters()}


def checkpoint_worker(rank: int, world: int, directory: str, stage: int) -> dict[str, Any]:
    """Save at ep 2 after 2 steps; reload at ep 2 (full state) and at ep 1 (weights only). Then
    the other way (``"ep1_to_ep2"``): see ``ep1_to_ep2_checkpoint``."""
    import torch.distributed as dist

    engine = make_engine("ours", 2, stage, False, **PARITY_MOE)
    train_steps(engine, rank, range(2), False)
    engine.save_checkpoint(directory, tag="step2")
    saved = _snapshot(engine)
    next_loss = train_steps(engine, rank, range(2, 3), False)[0]
    x, target = batch(rank, 5, False)
    with torch.no_grad():
        ep2_output = engine.module.moe(torch.relu(engine.module.inp(x)))[0]

    same = make_engine("ours", 2, stage, False, seed=123, **PARITY_MOE)
    same.load_checkpoint(directory, tag="step2")
    reloaded = _snapshot(same)
    reloaded_loss = train_steps(same, rank, range(2, 3), False)[0]

    wider = make_engine("ours", 1, stage, False, seed=321, **PARITY_MOE)
    wider.load_checkpoint(directory, tag="step2", load_optimizer_states=False,
                          load_lr_scheduler_states=False, load_module_only=True)
    # the ep-2 model after its third step is not what was saved: compare weights with `saved`
    w1_full = wider.module.moe.deepspeed_moe.experts.w1.detach()
    w1_parts = [torch.empty_like(saved["moe.deepspeed_moe.experts.w1"]) for _ in range(world)]
    dist.all_gather(w1_parts, saved["moe.deepspeed_moe.experts.w1"])
    same_weights = torch.equal(w1_full, torch.cat(w1_parts)) and all(
        torch.equal(param, saved[name]) for name, param in _snapshot(wider).items() if "experts" not in name)
    ep2_again = make_engine("ours", 2, stage, False, seed=5, **PARITY_MOE)
    ep2_again.load_checkpoint(directory, tag="step2", load_optimizer_states=False, load_module_only=True)
    with torch.no_grad():
        want = ep2_again.module.moe(torch.relu(ep2_again.module.inp(x)))[0]
        got = wider.module.moe(torch.relu(wider.module.inp(x)))[0]
    files = sorted(os.listdir(os.path.join(directory, "step2")))
    return {"saved": saved, "reloaded": reloaded, "next_loss": next_loss, "reloaded_loss": reloaded_loss,
            "ep1_same_weights": same_weights, "ep1_output": got, "ep2_output": want,
            "ep2_output_trained": ep2_output, "files": files,
            "ep1_to_ep2": ep1_to_ep2_checkpoint(rank, directory, stage)}


def ep1_to_ep2_checkpoint(rank: int, directory: str, stage: int) -> dict[str, Any]:
    """Save at ep 1 (every rank holds all experts, dp 2) after 2 steps; reload the weights at ep 2.

    Returns the saved ep-1 parameters, the ep-2 model's parameters after loading (its experts are
    this rank's slice), and both models' MoE outputs on this rank's same input.
    """
    engine = make_engine("ours", 1, stage, False, distinct_experts=True, **PARITY_MOE)
    train_steps(engine, rank, range(2), False)
    engine.save_checkpoint(directory, tag="ep1_step2")
    x, _ = batch(rank, 5, False)
    narrower = make_engine("ours", 2, stage, False, seed=321, **PARITY_MOE)
    narrower.load_checkpoint(directory, tag="ep1_step2", load_optimizer_states=False,
                             load_lr_scheduler_states=False, load_module_only=True)
    with torch.no_grad():
        ep1_output = engine.module.moe(torch.relu(engine.module.inp(x)))[0]
        ep2_output = narrower.module.moe(torch.relu(narrower.module.inp(x)))[0]
    return {"saved": _snapshot(engine), "loaded": _snapshot(narrower), "ep1_output": ep1_output,
            "ep2_output": ep2_output, "num_local_experts": narrower.module.moe.num_local_experts}


def zero3_worker(rank: int, world: int) -> None:
    """deepspeed.initialize with ZeRO-3 on a model holding our MoE (DeepSpeed rejects it)."""
    make_engine("ours", 1, 3, False, **PARITY_MOE)
