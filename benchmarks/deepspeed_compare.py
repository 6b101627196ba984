"""Our DeepSpeed-compatible ``MoE`` next to ``deepspeed.moe.layer.MoE``: forward+backward ms.

Both layers get the same weights (ours loads DeepSpeed's state dict) and the same input, in one
process group; their iterations alternate so both see the same machine state. Median of
``--iters`` timed iterations after ``--warmup``. With ``--ranks N`` the layers are expert-parallel
over N gloo ranks (``ep_size = N``) and the slowest rank's time counts.

    python -m benchmarks.deepspeed_compare                 # the default CPU sweep
    python -m benchmarks.deepspeed_compare --tokens 4096 --d-model 512 --d-ff 2048 --experts 8 --k 2
    python -m benchmarks.deepspeed_compare --generic --malloc-tuning
"""

from __future__ import annotations

import argparse
import functools
import statistics

import torch
import torch.distributed as dist
from torch import nn

from expert_parallel.spawn import run_ranks

from .runtime import malloc_tuned, tune_malloc
from .timing import alternate, timed

# (tokens, d_model, d_ff, experts, k)
DEFAULT_SHAPES = [(2048, 256, 1024, 8, 1), (2048, 256, 1024, 8, 2), (4096, 512, 2048, 8, 2),
                  (4096, 256, 1024, 32, 2)]


def _layers(shape: tuple[int, ...], ep_size: int, generic: bool) -> dict[str, nn.Module]:
    import deepspeed
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    from expert_parallel.integrations.deepspeed import MoE

    if not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo")
    _, d_model, d_ff, experts, k = shape
    expert = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))
    kwargs = dict(num_experts=experts, ep_size=ep_size, k=k, capacity_factor=1.25, min_capacity=4,
                  use_rts=False, top2_2nd_expert_sampling=False)
    reference = DeepSpeedMoE(d_model, expert, **kwargs)
    reference.set_deepspeed_parallelism()
    layers = {"deepspeed": reference}
    for name, impl in [("ours", "auto")] + ([("ours_generic", "generic")] if generic else []):
        layers[name] = MoE(d_model, expert, **kwargs, expert_impl=impl)
        layers[name].load_state_dict(reference.state_dict())
        layers[name].set_deepspeed_parallelism()
    return layers


def _fwd_bwd(layer: nn.Module, x: torch.Tensor) -> None:
    y, l_aux, _ = layer(x)
    (y.float().pow(2).mean() + l_aux).backward()


def _bench(rank: int, world: int, shapes: list[tuple[int, ...]], args: argparse.Namespace) -> list[dict]:
    rows = []
    for shape in shapes:
        torch.manual_seed(0)
        layers = _layers(shape, world, args.generic)
        x = torch.randn(shape[0], shape[1], requires_grad=True)
        steps = {name: timed(functools.partial(_fwd_bwd, layer, x), x.device) for name, layer in layers.items()}
        # the barrier lines the ranks up before every step, so each times the same exchange
        samples = alternate(steps, args.warmup, args.iters, before_each=dist.barrier)
        rows.append({"shape": shape, **{name: statistics.median(s["total"]) for name, s in samples.items()}})
    return rows


def _table(rows: list[dict], ranks: int, threads: int) -> str:
    names = [name for name in rows[0] if name != "shape"]
    header = f"{'tokens':>6} {'d_model':>7} {'d_ff':>5} {'E':>3} {'k':>2} | " + " ".join(
        f"{name + ' ms':>16}" for name in names) + " | " + " ".join(
        f"{name + '/ds':>16}" for name in names[1:])
    tuned = ", glibc malloc tuned" if malloc_tuned() else ""
    lines = [f"fwd+bwd, median; ranks={ranks} (ep_size={ranks}), {threads} thread(s) per rank, "
             f"torch {torch.__version__}{tuned}", header, "-" * len(header)]
    for row in rows:
        tokens, d_model, d_ff, experts, k = row["shape"]
        lines.append(f"{tokens:>6} {d_model:>7} {d_ff:>5} {experts:>3} {k:>2} | " + " ".join(
            f"{row[name]:>16.2f}" for name in names) + " | " + " ".join(
            f"{row[name] / row['deepspeed']:>16.2f}" for name in names[1:]))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=1)
    parser.add_argument("--threads-per-rank", type=int, default=2)
    parser.add_argument("--tokens", type=int)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-ff", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--generic", action="store_true", help="also time our generic-expert path")
    parser.add_argument("--malloc-tuning", action="store_true",
                        help="keep freed memory in glibc's heap in the spawned ranks (no page faults "
                             "on large fresh buffers; see docs/deepspeed.md)")
    args = parser.parse_args()
    if args.malloc_tuning:
        tune_malloc()
    shapes = DEFAULT_SHAPES if args.tokens is None else [
        (args.tokens, args.d_model, args.d_ff, args.experts, args.k)]
    rows_per_rank = run_ranks(_bench, args.ranks, shapes, args, timeout=1800,
                              threads_per_rank=args.threads_per_rank)
    slowest = [{key: (max(r[i][key] for r in rows_per_rank) if key != "shape" else rows_per_rank[0][i][key])
                for key in rows_per_rank[0][i]} for i in range(len(shapes))]
    print(_table(slowest, args.ranks, args.threads_per_rank))


if __name__ == "__main__":
    main()
