"""The expert GEMMs alone, in the layouts a runtime could choose: forward+backward ms of one rank's
SwiGLU experts over their full blocks (``E_local`` experts x ``R * C`` rows), single process.

- ``grouped``: the layer's own path, ``StackedExperts.grouped`` (``torch._grouped_mm``);
- ``bmm``: the layer's padded path, ``StackedExperts.forward`` (one batched matmul per weight);
- ``linear_loop``: one ``F.linear`` per expert with ``[F, D]`` weights, as DeepSpeed's experts run;
- ``fused_w13``: ``w1`` and ``w3`` as one ``[E, D, 2F]`` weight, one grouped GEMM for both.

Every variant is checked against the same weights (``check``) before it is timed; the steps
alternate round by round. docs/benchmarks.md cites the result (why the experts keep ``w1``, ``w3``
separate and use the grouped GEMM).

    python -m benchmarks.gemm_layouts                       # mixtral-small and fine-grained-small
    python -m benchmarks.gemm_layouts --preset fine-grained-small --ranks 2 --repeat 20
"""

from __future__ import annotations

import argparse
import statistics
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from expert_parallel.experts import StackedExperts

from .shapes import SHAPES, RunSpec
from .timing import alternate, timed

Variant = Callable[[Tensor], Tensor]


def variants(experts: StackedExperts) -> tuple[dict[str, Variant], list[Tensor]]:
    """``(name -> fn(x_EMD) -> y_EMD, copies)``: the SwiGLU ``experts`` (``gated``, no biases) in
    each layout. The other layouts' weights are ``copies`` made here, once, as a runtime would keep
    them (leaves with gradients, like the experts' own)."""
    num_experts, w2 = experts.w1.shape[0], experts.w2
    # DeepSpeed's experts: nn.Linear weights, [out, in] and contiguous
    l1, l3, l2 = (w.detach().transpose(1, 2).contiguous().requires_grad_() for w in (experts.w1, experts.w3, w2))
    w13 = torch.cat([experts.w1, experts.w3], dim=2).detach().requires_grad_()  # one [E, D, 2F] parameter

    def offsets(x_EMD: Tensor) -> Tensor:
        return torch.arange(1, num_experts + 1, dtype=torch.int32, device=x_EMD.device) * x_EMD.shape[1]

    def grouped(x_EMD: Tensor) -> Tensor:
        return experts.grouped(x_EMD.reshape(-1, x_EMD.shape[2]), offsets(x_EMD)).view_as(x_EMD)

    def linear_loop(x_EMD: Tensor) -> Tensor:
        return torch.stack([F.linear(F.silu(F.linear(x_EMD[e], l1[e])) * F.linear(x_EMD[e], l3[e]), l2[e])
                            for e in range(num_experts)])

    def fused_w13(x_EMD: Tensor) -> Tensor:
        offs = offsets(x_EMD)
        gate, up = torch._grouped_mm(x_EMD.reshape(-1, x_EMD.shape[2]), w13, offs=offs).chunk(2, dim=-1)
        return torch._grouped_mm(F.silu(gate) * up, w2, offs=offs).view_as(x_EMD)

    return {"grouped": grouped, "bmm": experts, "linear_loop": linear_loop, "fused_w13": fused_w13}, [l1, l3, l2, w13]


def check(experts: StackedExperts, x_EMD: Tensor) -> dict[str, float]:
    """Largest absolute difference of each variant's output and input gradient from ``grouped``'s."""
    results = {}
    for name, fn in variants(experts)[0].items():
        x = x_EMD.detach().requires_grad_()
        y = fn(x)
        y.backward(torch.ones_like(y))
        results[name] = (y.detach(), x.grad)
    ref_y, ref_grad = results["grouped"]
    return {name: max((y - ref_y).abs().max().item(), (g - ref_grad).abs().max().item())
            for name, (y, g) in results.items()}


def run(spec: RunSpec, ranks: int, warmup: int, repeat: int) -> dict[str, float]:
    """Median ms of each variant's forward+backward on one rank's blocks of ``spec`` at ``ranks``."""
    shape = spec.shape
    torch.manual_seed(0)
    experts = StackedExperts(shape.experts // ranks, shape.d_model, shape.d_ff, gated=True)
    x_EMD = torch.randn(shape.experts // ranks, ranks * spec.capacity(), shape.d_model)
    worst = max(check(experts, x_EMD).values())
    if worst > 1e-3:
        raise RuntimeError(f"the GEMM layouts disagree by {worst:.3g}; timing them would compare different maths")
    grad = torch.ones_like(x_EMD)
    x_EMD.requires_grad_()
    layouts, copies = variants(experts)
    weights = [*experts.parameters(), *copies]

    def step(fn: Variant) -> None:
        fn(x_EMD).backward(grad)
        for tensor in [x_EMD, *weights]:  # no gradient accumulation timed
            tensor.grad = None

    steps = {name: timed(lambda fn=fn: step(fn), x_EMD.device) for name, fn in layouts.items()}
    samples = alternate(steps, warmup, repeat)
    return {name: statistics.median(s["total"]) for name, s in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gemm_layouts", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", nargs="+", default=["mixtral-small", "fine-grained-small"],
                        choices=[name for name, shape in SHAPES.items() if shape.expert == "swiglu"])
    parser.add_argument("--ranks", type=int, default=2, help="EP ranks the blocks are sized for (default 2)")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"SwiGLU experts alone, forward+backward ms (median of {args.repeat}), one thread")
    for preset in args.preset:
        spec = RunSpec(preset, SHAPES[preset])
        medians = run(spec, args.ranks, args.warmup, args.repeat)
        blocks = f"{SHAPES[preset].experts // args.ranks} x {args.ranks * spec.capacity()} rows"
        print(f"{preset} ({blocks}): " + ", ".join(
            f"{name} {ms:.1f} ({ms / medians['grouped']:.2f}x)" for name, ms in medians.items()))


if __name__ == "__main__":
    main()
