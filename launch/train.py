"""Train the demo MoE transformer LM (``launch/model.py``) on the generated corpus.

Started plainly it spawns ``--nproc`` local ranks itself (gloo on CPU); started by ``torchrun``
(single or multi-node) or a SLURM ``srun torchrun`` it is one worker of that job.

    python -m launch.train --out runs/demo                 # 2 local ranks, ep 2, CPU
    torchrun --nproc-per-node 2 -m launch.train --out runs/demo
    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 1 --rdzv-backend c10d \\
        --rdzv-endpoint HOST:29500 -m launch.train --out runs/demo

Writes ``OUT/metrics.jsonl`` (rank 0, one JSON object per logged step), ``OUT/summary.json``
and ``OUT/checkpoint/rank<R>.pt``; ``--resume`` continues from the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException
from tqdm import tqdm

from expert_parallel import MoEConfig, MoELayer
from expert_parallel.comm import expert_groups
from expert_parallel.experts import StackedExperts
from expert_parallel.presets import PRESETS, preset
from expert_parallel.spawn import free_port
from launch.backends import DeepSpeedBackend, TorchBackend
from launch.corpus import CharCorpus
from launch.model import DeepSpeedMoEFFN, MoETransformerLM

METRIC_KEYS = ("loss", "aux_loss", "drop_fraction", "k_eff", "load_cv")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every flag's default in ``--help``, and the module docstring's layout kept."""


def build_parser() -> argparse.ArgumentParser:
    """Every flag with its default (``--help`` shows them)."""
    parser = argparse.ArgumentParser(prog="python -m launch.train", description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="metrics and checkpoints go here")
    parser.add_argument("--steps", type=int, default=300, help="total training steps")
    parser.add_argument("--preset", default="gshard", choices=sorted(PRESETS), help="MoE router preset")
    parser.add_argument("--ep-size", type=int, default=None, help="expert-parallel size; None means the world size")
    parser.add_argument("--nproc", type=int, default=2, help="local ranks to spawn when started plainly")
    parser.add_argument("--backend", default="auto", choices=("auto", "gloo", "nccl"),
                        help="auto: nccl with CUDA, else gloo")
    parser.add_argument("--experts", type=int, default=8, help="experts per MoE layer (global)")
    parser.add_argument("--d-model", type=int, default=64, help="model width")
    parser.add_argument("--d-ff", type=int, default=256, help="hidden width of every expert and dense FFN")
    parser.add_argument("--layers", type=int, default=4, help="blocks; every other one is MoE")
    parser.add_argument("--heads", type=int, default=4, help="attention heads")
    parser.add_argument("--seq-len", type=int, default=64, help="characters per sequence")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per rank per step")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    parser.add_argument("--seed", type=int, default=0, help="weights, data order and routing noise")
    parser.add_argument("--log-every", type=int, default=10, help="steps between metrics lines")
    parser.add_argument("--ckpt-every", type=int, default=100, help="steps between checkpoints (0: end only)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    parser.add_argument("--deepspeed-config", default=None, metavar="JSON",
                        help="train with the DeepSpeed engine and this config (e.g. launch/ds_zero2_bf16.json)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher; the job reads LOCAL_RANK from the environment")
    parser.add_argument("--simulate-failure", default=None, metavar="RANK:STEP",
                        help="testing aid: rank RANK exits abruptly before step STEP")
    parser.add_argument("--timeout-s", type=float, default=120.0,
                        help="collective timeout: a dead rank or stuck rendezvous ends the job after this")
    return parser


def moe_config(args: argparse.Namespace, world_size: int) -> MoEConfig:
    """The MoE config of the run; ValueError (one line) for a bad combination of flags."""
    ep_size = args.ep_size or world_size
    if world_size % ep_size:
        raise ValueError(f"--ep-size {ep_size} does not divide the world size {world_size}; "
                         "choose an ep size that divides it")
    cfg = preset(args.preset, args.d_model, args.d_ff, args.experts, ep_size=ep_size)
    if args.deepspeed_config and (cfg.num_shared_experts or cfg.router in ("soft", "expert_choice")):
        raise ValueError(f"--preset {args.preset} with --deepspeed-config: DeepSpeed's MoE layer has no shared "
                         "experts and routes token-choice only; pick another preset or train without DeepSpeed")
    return cfg


def train(args: argparse.Namespace) -> None:
    """One rank of the job; the process group is initialised from the environment."""
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local_rank}") if dist.get_backend() == "nccl" else torch.device("cpu")
    cfg = moe_config(args, world)
    groups = expert_groups(cfg.ep_size)
    corpus = CharCorpus()
    torch.manual_seed(args.seed)  # dense weights identical on every rank
    model = MoETransformerLM(corpus.vocab_size, cfg, args.layers, args.heads, args.seq_len,
                             moe_ffn=DeepSpeedMoEFFN if args.deepspeed_config else MoELayer)
    torch.manual_seed(args.seed + 1 + rank % cfg.ep_size)  # each EP rank its own experts
    for module in model.modules():
        if isinstance(module, StackedExperts):
            module.reset_parameters()
    if args.deepspeed_config:
        backend = DeepSpeedBackend(model, args, world)
        device = backend.device
    else:
        backend = TorchBackend(model.to(device), args, groups, rank, world, cfg.ep_size)
    start_step = backend.load() if args.resume else 0
    if not args.resume:
        torch.manual_seed(args.seed + 7919 * rank)  # routing noise differs per rank
    fail_rank, fail_step = map(int, args.simulate_failure.split(":")) if args.simulate_failure else (-1, -1)

    out = Path(args.out)
    metrics_file = None
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        metrics_file = open(out / "metrics.jsonl", "a" if args.resume else "w")
    progress = tqdm(range(start_step, args.steps), initial=start_step, total=args.steps, disable=rank != 0,
                    desc=f"train {args.preset} ep{cfg.ep_size}x{world // cfg.ep_size}", dynamic_ncols=True)
    tokens_per_step = args.batch_size * args.seq_len * world
    first_loss, last, logged_step = None, {}, start_step
    wall_start = window_start = time.perf_counter()
    for step in progress:
        if (rank, step) == (fail_rank, fail_step):
            os._exit(3)  # abrupt, like a crashed node: no cleanup, no goodbye to the peers
        inputs, targets = (t.to(device) for t in corpus.batch(step, rank, args.batch_size, args.seq_len))
        loss, aux_loss, stats = backend.step(inputs, targets)
        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            values = torch.stack([loss, aux_loss, *(torch.stack([getattr(s, name) for s in stats]).float().mean()
                                                    for name in ("dropped_fraction", "k_eff", "load_cv"))])
            values = values.float().to(device)
            dist.all_reduce(values)
            values = (values / world).tolist()
            elapsed = time.perf_counter() - window_start
            steps_in_window, logged_step = done - logged_step, done
            record = {"step": done, **dict(zip(METRIC_KEYS, values)),
                      "tokens_per_s": tokens_per_step * steps_in_window / elapsed,
                      "step_ms": 1e3 * elapsed / steps_in_window}
            window_start = time.perf_counter()
            first_loss = record["loss"] if first_loss is None else first_loss
            last = record
            if metrics_file is not None:
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
            progress.set_postfix(loss=f"{record['loss']:.3f}", aux=f"{record['aux_loss']:.4f}",
                                 drop=f"{record['drop_fraction']:.1%}", tok_s=f"{record['tokens_per_s']:.0f}")
        if done == args.steps or (args.ckpt_every and done % args.ckpt_every == 0):
            backend.save(done)
    progress.close()
    if rank == 0 and last:
        summary = {"preset": args.preset, "world_size": world, "ep_size": cfg.ep_size, "steps": args.steps,
                   "start_step": start_step, "deepspeed": bool(args.deepspeed_config),
                   "first_logged_loss": first_loss, "final_loss": last["loss"],
                   "final_drop_fraction": last["drop_fraction"], "wall_s": time.perf_counter() - wall_start,
                   "tokens_per_s": last["tokens_per_s"]}
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print("summary: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                      for k, v in summary.items()), flush=True)
    if metrics_file is not None:
        metrics_file.close()


def _backend(args: argparse.Namespace) -> str:
    if args.backend != "auto":
        return args.backend
    return "nccl" if torch.cuda.is_available() else "gloo"


def _worker(local_rank: int, args: argparse.Namespace, port: int) -> None:
    """A rank spawned by the plain launch: give it torchrun's environment, then train."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(local_rank),
                      LOCAL_RANK=str(local_rank), WORLD_SIZE=str(args.nproc),
                      LOCAL_WORLD_SIZE=str(args.nproc))
    _run_rank(args)


def _run_rank(args: argparse.Namespace) -> None:
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    backend = _backend(args)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if args.deepspeed_config:  # DeepSpeed's comm wraps the torch process group it creates
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=args.timeout_s))
    else:
        dist.init_process_group(backend, timeout=timedelta(seconds=args.timeout_s))
    try:
        train(args)
    finally:
        dist.destroy_process_group()


def check_flags(args: argparse.Namespace, world_size: int) -> None:
    """ValueError (one line naming the flag, its value and the fix) for flags the run cannot use."""
    for flag in ("steps", "nproc", "log_every", "heads", "seq_len", "batch_size"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= 1")
    if args.layers < 2:
        raise ValueError(f"--layers {args.layers}: every other block is MoE (the 2nd, 4th, ...), so the "
                         "model needs --layers >= 2")
    if args.d_model % args.heads:
        raise ValueError(f"--d-model {args.d_model} is not divisible by --heads {args.heads}; choose "
                         "heads that divide the model width")
    if args.ep_size is not None and args.ep_size < 1:
        raise ValueError(f"--ep-size {args.ep_size}: must be >= 1 (leave it out for the world size)")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise ValueError(f"--lr {args.lr}: must be a finite number > 0")
    if args.ckpt_every < 0 or not args.timeout_s > 0:
        raise ValueError(f"--ckpt-every {args.ckpt_every} must be >= 0 and --timeout-s {args.timeout_s} > 0")
    if args.simulate_failure and not re.fullmatch(r"\d+:\d+", args.simulate_failure):
        raise ValueError(f"--simulate-failure {args.simulate_failure!r}: expected RANK:STEP, e.g. 1:5")
    moe_config(args, world_size)
    if args.deepspeed_config and not Path(args.deepspeed_config).is_file():
        raise ValueError(f"--deepspeed-config {args.deepspeed_config}: no such file")


def main(argv: Optional[list[str]] = None) -> None:
    """Parse flags, check them, then train (spawning local ranks when not under a launcher)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    under_launcher = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    world = int(os.environ["WORLD_SIZE"]) if under_launcher else args.nproc
    try:  # bad flags fail here, in one line, before any process group exists
        check_flags(args, world)
    except ValueError as error:
        parser.error(str(error))
    if under_launcher:
        _run_rank(args)
        return
    try:
        mp.start_processes(_worker, args=(args, free_port()), nprocs=args.nproc, start_method="spawn")
    except ProcessException as error:  # one rank died: the others were stopped with it
        sys.exit(f"launch.train: rank {error.error_index} failed ({error}); the job was stopped. "
                 "The failing rank's traceback, if it left one, is printed above.")


if __name__ == "__main__":
    sys.exit(main())
