"""``python -m benchmarks.checkpoint_overhead``: what checkpointing every 10 steps costs the demo
job's step time, with the asynchronous save ``launch.train`` uses and with a blocking one.

Two gloo ranks train the demo model (``launch.train``'s defaults) in rounds of three modes,
interleaved so that a change in the machine's load hits all three alike: no checkpoint, an async
save every 10 steps (``TorchBackend.save``: capture in the step, writing in a background thread),
and the same save waited for at once (a blocking save). Prints the mean step time of each mode and
the overhead over no checkpoint, and writes them to ``RESULTS/checkpoint-overhead-r2-cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from expert_parallel.spawn import run_ranks
from launch.corpus import CharCorpus
from launch.train import build_job, build_parser

MODES = ("none", "async", "blocking")
EVERY = 10


def measure(rank: int, world: int, out: str, rounds: int, steps: int, flags: list[str]) -> dict[str, list[float]]:
    """One rank: ``rounds`` x every mode x ``steps`` steps; the step times (s, including the save
    of a saving step) of each mode, measured after a barrier so both ranks time the same steps."""
    args = build_parser().parse_args(["--out", out, *flags])
    corpus = CharCorpus.named(args.corpus)
    backend = build_job(args, corpus, rank, world, torch.device("cpu")).backend
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    step = 0
    for _ in range(2 * EVERY):  # warm-up, and a first save (file creation)
        backend.step(*corpus.batch(step, rank, args.batch_size, args.seq_len, world))
        step += 1
    backend.save(step, wait=True)
    for _ in range(rounds):
        for mode in MODES:
            for _ in range(steps):
                torch.distributed.barrier()
                start = time.perf_counter()
                backend.step(*corpus.batch(step, rank, args.batch_size, args.seq_len, world))
                step += 1
                if mode != "none" and step % EVERY == 0:
                    backend.save(step, wait=mode == "blocking")
                times[mode].append(time.perf_counter() - start)
            backend.wait()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.checkpoint_overhead", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40, help="steps per mode and round (a multiple of 10)")
    parser.add_argument("--out", default="benchmarks/results", help="results folder")
    parser.add_argument("flags", nargs="*", help="launch.train flags for the model (after --), e.g. -- --d-model 128")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        per_rank = run_ranks(measure, 2, scratch, args.rounds, args.steps, args.flags, timeout=3600)
    times = {mode: [max(ts) for ts in zip(*(r[mode] for r in per_rank))] for mode in MODES}  # the slower rank
    mean_ms = {mode: 1e3 * statistics.fmean(ts) for mode, ts in times.items()}
    record = {"ranks": 2, "every": EVERY, "steps_per_mode": len(times["none"]), "flags": args.flags,
              "mean_step_ms": mean_ms,
              "overhead": {mode: mean_ms[mode] / mean_ms["none"] - 1 for mode in ("async", "blocking")}}
    path = Path(args.out) / "checkpoint-overhead-r2-cpu.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
