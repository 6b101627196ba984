"""``python -m expert_parallel.checkpoint``: inspect a checkpoint, and check its files.

    python -m expert_parallel.checkpoint inspect CKPT_DIR
    python -m expert_parallel.checkpoint inspect --verify CKPT_DIR

``--verify`` reads every file and checks every checksum of the manifest (``.metadata`` and every
storage file); it exits with status 2, naming each file that is missing or corrupted and the
tensors it holds. Converting a DeepSpeed engine checkpoint is the DeepSpeed integration's:
``python -m expert_parallel.integrations.deepspeed from-deepspeed ...``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from .manifest import CheckpointError, describe_experts, read_manifest
from .store import verify_files

MOVED = {"from-deepspeed": "python -m expert_parallel.integrations.deepspeed from-deepspeed"}


def inspect(directory: str) -> str:
    """A table of the checkpoint's tensors (logical shape, dtype, experts) and what it was saved at."""
    manifest = read_manifest(directory)
    rows = [(key, "x".join(map(str, entry["shape"])) or "scalar", entry["dtype"],
             describe_experts(list(range(len(entry["experts"])))) if "experts" in entry else "dense")
            for key, entry in sorted(manifest["tensors"].items())]
    widths = [max(len(row[i]) for row in rows + [("tensor", "shape", "dtype", "kind")]) for i in range(4)]
    lines = [f"{directory}: saved by {manifest['world_size']} rank(s), EP sizes {manifest['ep_sizes'] or [1]}; "
             f"{len(rows)} tensors in {len(manifest['files'])} files",
             "  ".join(h.ljust(w) for h, w in zip(("tensor", "shape", "dtype", "kind"), widths))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    """The command line; returns the exit status (2 for a checkpoint problem)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in MOVED:
        print(f"error: '{argv[0]}' moved to the DeepSpeed integration: {MOVED[argv[0]]} {' '.join(argv[1:])}",
              file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog="python -m expert_parallel.checkpoint", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    show = commands.add_parser("inspect", help="list a checkpoint's tensors (--verify: and check every checksum)")
    show.add_argument("directory")
    show.add_argument("--verify", action="store_true", help="read every file and compare its SHA-256 with the manifest")
    args = parser.parse_args(argv)
    try:
        print(inspect(args.directory))
        if args.verify:
            problems = verify_files(args.directory, read_manifest(args.directory))
            for problem in problems:
                print(f"error: {problem}", file=sys.stderr)
            if problems:
                return 2
            print(f"verified: every checksum of {args.directory}'s files matches its manifest")
        return 0
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
