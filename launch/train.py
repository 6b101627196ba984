"""Train an MoE transformer LM on a small character-level corpus: the demo model
(``launch/model.py``) or a Hugging Face transformers MoE model converted to expert parallelism
(``--hf-model``, ``--hf-path``).

Started plainly it spawns ``--nproc`` local ranks itself (gloo on CPU); started by ``torchrun``
(single or multi-node), a SLURM ``srun torchrun`` or the ``deepspeed`` launcher it is one worker
of that job.

    python -m launch.train --out runs/demo                 # 2 local ranks, ep 2, CPU
    python -m launch.train --out runs/mixtral --hf-model mixtral
    torchrun --nproc-per-node 2 -m launch.train --out runs/demo
    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 1 --rdzv-backend c10d \\
        --rdzv-endpoint HOST:29500 -m launch.train --out runs/demo

Writes ``OUT/metrics.jsonl`` (rank 0, one JSON object per logged step, with every MoE layer's
expert load under ``"moe"``; ``launch/observe.py``), ``OUT/summary.json``
and ``OUT/checkpoint/``; ``--resume`` continues from the checkpoint, ``--resume auto`` when there is
one (the same command starts and restarts the job: ``torchrun --max-restarts``, ``--max-restarts``).
A Hugging Face model is also saved back to ``OUT/hf`` (loads with plain transformers).
``--tensorboard`` adds event files under ``OUT/tensorboard/``; ``python -m launch.report OUT``
draws the PNGs under ``OUT/report/``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Optional, Union

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.multiprocessing.spawn import ProcessException
from tqdm import tqdm

from expert_parallel import MoELayer, RoutingStats
from expert_parallel.comm import expert_groups
from expert_parallel.flight import FlightRecorder, default_store
from expert_parallel.presets import PRESETS
from expert_parallel.spawn import free_port
from launch import elastic
from launch.backends import DeepSpeedBackend, TorchBackend, lm_loss
from launch.corpus import CORPORA, CharCorpus
from launch.faults import Failure, is_peer_failure, report_stall
from launch.flags import check_flags, moe_config
from launch.hf import HF_MODELS_HELP, CausalLMLoss, build_hf_model, save_hf
from launch.model import DeepSpeedMoEFFN, MoETransformerLM, seed_routed_experts
from launch.observe import Observer, add_observe_flags, check_observe_flags

__all__ = ["build_parser", "check_flags", "given_flags", "main", "train"]

METRIC_KEYS = ("loss", "aux_loss", "drop_fraction", "k_eff", "load_cv", "padding_fraction", "wire_mib")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every flag's default in ``--help``, and the module docstring's layout kept."""


def build_parser() -> argparse.ArgumentParser:
    """Every flag with its default (``--help`` shows them)."""
    parser = argparse.ArgumentParser(prog="python -m launch.train", description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="metrics and checkpoints go here")
    parser.add_argument("--steps", type=int, default=300, help="total training steps")
    parser.add_argument("--hf-model", default=None, metavar="NAME",
                        help="train a tiny random-init transformers model of this family, converted to expert "
                             f"parallelism, instead of the demo model (needs transformers): {HF_MODELS_HELP}")
    parser.add_argument("--hf-path", default=None, metavar="DIR",
                        help="start from this local save_pretrained directory (a supported transformers MoE model, "
                             "e.g. OUT/hf of an earlier run) instead of random init")
    parser.add_argument("--corpus", default="bierce", choices=CORPORA,
                        help="bierce: The Devil's Dictionary (public domain English, launch/data/); toy: a "
                             "generated grammar")
    parser.add_argument("--preset", default="gshard", choices=sorted(PRESETS), help="MoE router preset (demo model)")
    parser.add_argument("--ep-size", type=int, default=None,
                        help="expert-parallel size; None: the largest that divides both the world size and the "
                             "experts (so a job re-formed at another world size can run)")
    parser.add_argument("--nproc", type=int, default=2, help="local ranks to spawn when started plainly")
    parser.add_argument("--backend", default="auto", choices=("auto", "gloo", "nccl"),
                        help="auto: nccl with CUDA, else gloo")
    parser.add_argument("--experts", type=int, default=8, help="experts per MoE layer (global; not with --hf-path)")
    parser.add_argument("--d-model", type=int, default=64, help="model width (not with --hf-path)")
    parser.add_argument("--d-ff", type=int, default=256,
                        help="hidden width of every expert and dense FFN (not with --hf-path)")
    parser.add_argument("--layers", type=int, default=4,
                        help="blocks; demo model: every other one is MoE; --hf-model: the sparse blocks (a family's "
                             "dense first blocks come on top, e.g. DeepSeek's); not with --hf-path")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (not with --hf-path)")
    parser.add_argument("--seq-len", type=int, default=64, help="characters per sequence")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per rank per step")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    parser.add_argument("--clip-grad", type=float, default=1.0,
                        help="clip the gradient norm (the whole model's, each expert counted once) to this; 0: no "
                             "clipping (the norm is still logged as grad_norm); deepspeed: the config's "
                             "gradient_clipping if it has one")
    parser.add_argument("--seed", type=int, default=0, help="weights, data order and routing noise")
    parser.add_argument("--log-every", type=int, default=10, help="steps between metrics lines")
    parser.add_argument("--ckpt-every", type=int, default=100, help="steps between checkpoints (0: end only)")
    parser.add_argument("--resume", nargs="?", const=True, default=False, type=elastic.resume_mode, metavar="auto",
                        help="continue from OUT/checkpoint (plain/torchrun: at any world and ep size, the same data "
                             "when the global batch is kept; deepspeed: the engine's checkpoint, same topology); "
                             "--resume auto: when OUT/checkpoint/latest exists, else start fresh")
    parser.add_argument("--max-restarts", type=int, default=0,
                        help="plain spawn: when a rank dies, restart every rank with --resume auto, this many times "
                             "(under torchrun use its own --max-restarts)")
    parser.add_argument("--deepspeed-config", default=None, metavar="JSON",
                        help="train with the DeepSpeed engine and this config (e.g. launch/ds_zero2_bf16.json)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher; the job reads LOCAL_RANK from the environment")
    parser.add_argument("--simulate-failure", default=None, metavar="RANK:STEP[:hang]",
                        help="testing aid: rank RANK exits abruptly before step STEP (with :hang, stalls in that "
                             "step's forward instead), once per --out")
    parser.add_argument("--timeout-s", type=float, default=120.0,
                        help="collective timeout: a dead or stalled rank or a stuck rendezvous ends the job after "
                             "this (a stall prints where every rank stopped)")
    add_observe_flags(parser)
    return parser


@dataclass
class Job:
    """What ``build_job`` makes for one rank: the backend that steps, the run's name and sizes,
    and the converted transformers model (``None`` for the demo model)."""

    backend: Union[TorchBackend, DeepSpeedBackend]
    device: torch.device
    name: str
    ep_size: int
    hf_model: Optional[nn.Module]


def build_job(args: argparse.Namespace, corpus: CharCorpus, rank: int, world: int, device: torch.device) -> Job:
    """The model (demo or converted transformers) and its backend (plain torch or DeepSpeed)."""
    ep_size = args.ep_size or world
    groups = expert_groups(ep_size)
    hf_model = None
    if args.hf_model or args.hf_path:
        hf_model = build_hf_model(args, corpus.vocab_size, ep_size)  # identical init, this rank's expert shard
        model, loss_fn, name = hf_model, CausalLMLoss(hf_model), hf_model.config.model_type
    else:
        cfg = moe_config(args, world)
        # the same draws on every rank: replicated weights (dense, routers, shared experts) are
        # identical, and StackedExperts seeds each routed expert by its global id (any EP size)
        torch.manual_seed(args.seed)
        model = MoETransformerLM(corpus.vocab_size, cfg, args.layers, args.heads, args.seq_len,
                                 moe_ffn=DeepSpeedMoEFFN if args.deepspeed_config else MoELayer)
        if args.deepspeed_config:
            seed_routed_experts(model, rank % ep_size)
        loss_fn, name = lm_loss, args.preset
    if args.deepspeed_config:
        if hf_model is not None:
            from expert_parallel.integrations.deepspeed import EngineModel

            model = EngineModel(hf_model, ep_size)  # expert tags and DeepSpeed's expert groups
        backend = DeepSpeedBackend(model, args, world, loss_fn)
        return Job(backend, backend.device, name, ep_size, hf_model)
    return Job(TorchBackend(model.to(device), args, groups, rank, world, ep_size, loss_fn), device, name, ep_size,
               hf_model)


def train(args: argparse.Namespace) -> None:
    """One rank of the job; the process group is initialised from the environment."""
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local_rank}") if dist.get_backend() == "nccl" else torch.device("cpu")
    corpus = CharCorpus.named(args.corpus)
    job = build_job(args, corpus, rank, world, device)
    backend, device = job.backend, job.device
    resume = elastic.should_resume(args.resume, args.out)
    start_step = backend.load(keep_global_batch=args.resume == elastic.AUTO) if resume else 0
    if isinstance(backend, TorchBackend):  # --resume auto may have kept the saved global batch
        args.batch_size = backend.batch_size
    if not resume:
        torch.manual_seed(args.seed + 7919 * rank)  # routing noise differs per rank
    # where this rank is, for the table a rank prints when a collective times out
    with FlightRecorder(job.backend.model, default_store()) as recorder:
        try:
            _train_loop(args, job, corpus, start_step, recorder)
        except RuntimeError as error:
            if is_peer_failure(error):  # a collective timed out or lost a peer: who never arrived?
                report_stall(error)
            raise


def _train_loop(args: argparse.Namespace, job: Job, corpus: CharCorpus, start_step: int,
                recorder: FlightRecorder) -> None:
    """The steps, metrics, checkpoints and summary of ``train``."""
    rank, world = dist.get_rank(), dist.get_world_size()
    backend, device = job.backend, job.device
    failure = Failure.parse(args.simulate_failure)

    out = Path(args.out)
    metrics_file = None
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if start_step:  # resumed: drop what was logged after the checkpoint
            elastic.trim_metrics(out / "metrics.jsonl", start_step)
        metrics_file = open(out / "metrics.jsonl", "a" if start_step else "w")
    progress = tqdm(range(start_step, args.steps), initial=start_step, total=args.steps, disable=rank != 0,
                    desc=f"train {job.name} ep{job.ep_size}x{world // job.ep_size}", dynamic_ncols=True)
    tokens_per_step = args.batch_size * args.seq_len * world
    first_loss, last, logged_step = None, {}, start_step
    wall_start = window_start = time.perf_counter()
    observer = Observer(args, backend.engine if isinstance(backend, DeepSpeedBackend) else backend.model, rank)
    for step in progress:
        recorder.step(step)
        if (failure is not None and (rank, step) == (failure.rank, failure.step)
                and elastic.claim_failure(args.out, rank, step)):
            failure.strike(backend.model)
        inputs, targets = (t.to(device) for t in corpus.batch(step, rank, args.batch_size, args.seq_len, world))
        with observer.step():  # --record-routing
            loss, aux_loss, stats, grad_norm = backend.step(inputs, targets)
        observer.after_step()  # --bias-update-rate
        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            elapsed = time.perf_counter() - window_start
            steps_in_window, logged_step = done - logged_step, done
            record = {"step": done, **mean_metrics(loss, aux_loss, stats, device),
                      "grad_norm": None if grad_norm is None else float(grad_norm),  # the same on every rank
                      "tokens_per_s": tokens_per_step * steps_in_window / elapsed,
                      "step_ms": 1e3 * elapsed / steps_in_window}
            window_start = time.perf_counter()
            record = observer.log(done, record, stats)  # per-layer expert load; TensorBoard
            first_loss = record["loss"] if first_loss is None else first_loss
            last = record
            if metrics_file is not None:
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
            progress.set_postfix(loss=f"{record['loss']:.3f}", aux=f"{record['aux_loss']:.4f}",
                                 drop=f"{record['drop_fraction']:.1%}", gnorm=f"{record['grad_norm'] or 0:.3f}",
                                 tok_s=f"{record['tokens_per_s']:.0f}")
        if done == args.steps or (args.ckpt_every and done % args.ckpt_every == 0):
            backend.save(done, wait=done == args.steps)
    progress.close()
    observer.close()
    if job.hf_model is not None:  # collective: every rank gathers its experts
        save_hf(job.hf_model, corpus, out, rank, args.seq_len)
    if rank == 0 and last:
        summary = {"model": "demo" if job.hf_model is None else job.name, "preset": args.preset,
                   "corpus": args.corpus, "world_size": world, "ep_size": job.ep_size, "steps": args.steps,
                   "start_step": start_step, "deepspeed": bool(args.deepspeed_config),
                   "first_logged_loss": first_loss, "final_loss": last["loss"],
                   "final_drop_fraction": last["drop_fraction"], "wall_s": time.perf_counter() - wall_start,
                   "tokens_per_s": last["tokens_per_s"]}
        if job.hf_model is not None:
            summary["preset"] = None  # the model routes with its own router
            summary["hf_dir"] = str(out / "hf")
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print("summary: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                      for k, v in summary.items()), flush=True)
    if metrics_file is not None:
        metrics_file.close()


def mean_metrics(loss: Tensor, aux_loss: Tensor, stats: list[RoutingStats], device: torch.device) -> dict:
    """``METRIC_KEYS`` averaged over the ranks (one all-reduce): the losses, the MoE layers' mean
    drop fraction, k_eff, load CV and padding fraction, and ``wire_mib``, the MiB one rank's
    forward dispatches send, summed over the MoE layers (a step moves 4x)."""
    values = torch.stack([loss.float(), aux_loss.float(), *(
        torch.stack([getattr(s, name) for s in stats]).float().mean()
        for name in ("dropped_fraction", "k_eff", "load_cv", "padding_fraction")),
        torch.stack([s.wire_bytes for s in stats]).float().sum() / 2**20]).to(device)
    dist.all_reduce(values)
    return dict(zip(METRIC_KEYS, (values / dist.get_world_size()).tolist()))


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
        timeout = timedelta(seconds=args.timeout_s)
        store = elastic.agent_store(timeout)  # None: the environment's
        dist.init_process_group(backend, timeout=timeout, store=store, rank=int(os.environ["RANK"]) if store else -1,
                                world_size=int(os.environ["WORLD_SIZE"]) if store else -1)
    try:
        train(args)
    finally:
        dist.destroy_process_group()


def given_flags(argv: Optional[list[str]] = None) -> frozenset[str]:
    """The destinations of the flags given in ``argv`` (default ``sys.argv[1:]``), not filled in
    by a default; ``argv`` must parse."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return frozenset(vars(parser.parse_args(argv)))


def main(argv: Optional[list[str]] = None) -> None:
    """Parse flags, check them, then train (spawning local ranks when not under a launcher)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    under_launcher = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    world = int(os.environ["WORLD_SIZE"]) if under_launcher else args.nproc
    try:  # bad flags fail here, in one line, before any process group exists
        args.ep_size = elastic.resolve_ep_size(args, world)
        check_flags(args, world, given_flags(argv))
        check_observe_flags(args)
    except ValueError as error:
        parser.error(str(error))
    if under_launcher:
        _run_rank(args)
        return
    try:
        elastic.with_restarts(lambda: mp.start_processes(_worker, args=(args, free_port()), nprocs=args.nproc,
                                                         start_method="spawn"), args)
    except ProcessException as error:  # one rank died: the others were stopped with it
        sys.exit(f"launch.train: rank {error.error_index} failed ({error}); the job was stopped. "
                 "The failing rank's traceback, if it left one, is printed above.")


if __name__ == "__main__":
    sys.exit(main())
