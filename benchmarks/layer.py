"""Forward+backward of MoELayer on N gloo ranks next to its floor, measured in the same run.

Floor = the batched expert matmuls at full capacity (forward+backward, the same
``StackedExperts`` on a ``[E_local, ep*C, D]`` buffer) + the raw ``all_to_all_single`` calls of
the same bytes (dispatch and return, forward and backward: 4 calls). Iterations of the layer and
of the floor alternate, so both see the same machine state.

    python -m benchmarks.layer --ranks 2 --tokens 4096 --d-model 256 --d-ff 1024 --experts 8
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

from expert_parallel import MoEConfig, MoELayer
from expert_parallel.experts import StackedExperts
from expert_parallel.layout import expert_capacity
from expert_parallel.spawn import run_ranks


def _timed(fn) -> float:
    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - start


def _bench(rank: int, world: int, args: argparse.Namespace) -> dict:
    torch.manual_seed(rank)
    cfg = MoEConfig(d_model=args.d_model, d_ff=args.d_ff, num_experts=args.experts, top_k=args.top_k,
                    router="gshard" if args.top_k == 2 else "switch", second_policy=args.second_policy,
                    capacity_factor=args.capacity_factor, ep_size=world,
                    capacity=None if args.agree_capacity else expert_capacity(
                        args.tokens, args.experts, args.top_k, args.capacity_factor, 4))
    layer = MoELayer(cfg)
    capacity = expert_capacity(args.tokens, args.experts, args.top_k, args.capacity_factor, 4)
    x = torch.randn(args.tokens, args.d_model, requires_grad=True)
    experts = StackedExperts(cfg.num_local_experts, args.d_model, args.d_ff)
    expert_in = torch.randn(cfg.num_local_experts, world * capacity, args.d_model, requires_grad=True)
    a2a_in = torch.randn(args.experts * capacity * args.d_model)
    a2a_out = torch.empty_like(a2a_in)

    def layer_step() -> None:
        out = layer(x)
        (out.output.sum() + out.aux_loss).backward()

    def matmul_step() -> None:
        experts(expert_in).sum().backward()

    def a2a_step() -> None:
        for _ in range(4):
            dist.all_to_all_single(a2a_out, a2a_in)

    times: dict[str, list[float]] = {"layer": [], "matmuls": [], "all_to_all": []}
    for step in range(args.warmup + args.repeat):
        sample = {"layer": _timed(layer_step), "matmuls": _timed(matmul_step),
                  "all_to_all": _timed(a2a_step)}
        if step >= args.warmup:
            for name, seconds in sample.items():
                times[name].append(seconds)
    return {name: statistics.median(values) * 1e3 for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2, help="gloo ranks = ep size (default 2)")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per rank (default 4096)")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-ff", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2, choices=(1, 2))
    parser.add_argument("--second-policy", default="all", help="gshard policy (default all: fixed load)")
    parser.add_argument("--capacity-factor", type=float, default=1.25)
    parser.add_argument("--agree-capacity", action="store_true",
                        help="derive the capacity per batch (one all-reduce) instead of fixing it")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    per_rank = run_ranks(_bench, args.ranks, args, timeout=600)
    worst = {name: max(r[name] for r in per_rank) for name in per_rank[0]}
    floor = worst["matmuls"] + worst["all_to_all"]
    print(f"MoELayer fwd+bwd, {args.ranks} gloo ranks, {args.tokens} tokens/rank, d_model={args.d_model}, "
          f"d_ff={args.d_ff}, experts={args.experts}, top_k={args.top_k}, cf={args.capacity_factor}")
    print(f"{'':24}{'ms (median, slowest rank)':>28}")
    print(f"{'expert matmuls (floor)':24}{worst['matmuls']:28.2f}")
    print(f"{'raw all-to-alls (floor)':24}{worst['all_to_all']:28.2f}")
    print(f"{'floor total':24}{floor:28.2f}")
    print(f"{'MoELayer':24}{worst['layer']:28.2f}")
    print(f"{'ratio layer / floor':24}{worst['layer'] / floor:28.3f}")


if __name__ == "__main__":
    main()
