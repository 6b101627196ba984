"""What lets ``launch.train`` survive a dead worker or a lost node: ``--resume auto``, the EP size
a re-formed job defaults to, a simulated failure that fires once per output directory, and the
plain spawner's restarts (``--max-restarts``). torchrun restarts its workers itself
(``torchrun --max-restarts N``, ``--nnodes MIN:MAX``); see docs/launch.md, "Failures and restarts"."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Callable, Optional, Union

import torch.distributed as dist
from torch.multiprocessing.spawn import ProcessException

AUTO = "auto"


def resume_mode(value: str) -> str:
    """``--resume``'s optional value: only ``auto`` (``argparse`` type)."""
    if value != AUTO:
        raise argparse.ArgumentTypeError(f"{value!r}: --resume takes no value or 'auto'")
    return value


def should_resume(resume: Union[bool, str], out: str) -> bool:
    """Whether to load ``OUT/checkpoint``: ``--resume`` always (the load fails without one),
    ``--resume auto`` when ``OUT/checkpoint/latest`` exists, else start fresh."""
    if resume == AUTO:
        return (Path(out) / "checkpoint" / "latest").is_file()
    return bool(resume)


def trim_metrics(path: Path, start_step: int) -> None:
    """Drop the records of ``OUT/metrics.jsonl`` after ``start_step``: a job that died after its
    last checkpoint logged steps that the resumed job logs again."""
    if path.is_file():
        lines = path.read_text().splitlines(keepends=True)
        path.write_text("".join(line for line in lines if json.loads(line)["step"] <= start_step))


def default_ep_size(world_size: int, num_experts: int) -> int:
    """The largest EP size that divides both the world size and the experts per layer (their
    greatest common divisor): what a job re-formed at another world size can run."""
    return math.gcd(world_size, num_experts)


def resolve_ep_size(args: argparse.Namespace, world_size: int) -> int:
    """``--ep-size`` if given, else ``default_ep_size`` of the world and the model's experts
    (``--experts``, or the saved config's with ``--hf-path``; ValueError if it cannot be read)."""
    if args.ep_size is not None:
        return args.ep_size
    if args.hf_path:
        from launch.hf import saved_model_info

        return default_ep_size(world_size, saved_model_info(args.hf_path)["num_experts"])
    return default_ep_size(world_size, args.experts)


def claim_failure(out: str, rank: int, step: int) -> bool:
    """True the first time rank ``rank`` reaches ``step`` of ``--simulate-failure`` for this
    ``--out``: a marker file is written (and fsynced) before the failure fires, so a restarted
    job does not fail again at the same step."""
    marker = Path(out) / f".simulated-failure-rank{rank}-step{step}"
    marker.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.fsync(fd)
    os.close(fd)
    return True


def with_restarts(run: Callable[[], None], args: argparse.Namespace) -> None:
    """Run the plain spawner's job (``run``: spawn the ranks, wait for them); when a rank dies,
    start all ranks again, up to ``--max-restarts`` times, with ``--resume auto`` (from the latest
    checkpoint, or fresh when none was written yet). Raises the last ``ProcessException``."""
    for attempt in range(args.max_restarts + 1):
        try:
            run()
            return
        except ProcessException as error:
            if attempt == args.max_restarts:
                raise
            print(f"launch.train: rank {error.error_index} failed ({error}); restarting the job "
                  f"({attempt + 1} of --max-restarts {args.max_restarts}) from the latest checkpoint",
                  file=sys.stderr, flush=True)
            args.resume = AUTO


def agent_store(timeout: timedelta) -> Optional[dist.Store]:
    """The rendezvous store for ``init_process_group`` under a torchrun agent that shares its own
    store with the workers (``TORCHELASTIC_USE_AGENT_STORE=True``, the c10d and standalone
    default), its keys prefixed by the restart count and world size; ``None`` otherwise (the
    environment's store serves).

    That store lives as long as the agent, so after a restart the keys of the previous attempt's
    process groups are still there: without a prefix per attempt a worker may read the address of
    a dead peer and fail (``Gloo connectFullMesh failed ... Connection refused``). Restarts after
    a failure raise the count; a re-formed job between failures only grows, so the pair names
    each attempt once."""
    env = os.environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != str(True):
        return None
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), int(env["WORLD_SIZE"]), is_master=False,
                          timeout=timeout)
    return dist.PrefixStore(f"launch.train/restart{env['TORCHELASTIC_RESTART_COUNT']}/world{env['WORLD_SIZE']}",
                            store)
