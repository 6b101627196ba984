"""``python -m expert_parallel.checkpoint``: inspect a checkpoint, or convert a DeepSpeed engine
checkpoint into one.

    python -m expert_parallel.checkpoint inspect CKPT_DIR
    python -m expert_parallel.checkpoint from-deepspeed ENGINE_DIR OUT_DIR --model pkg.module:factory [--tag TAG]

``--model`` names a function that takes no arguments and returns the model the engine trained,
built with ``ep_size=1`` in this process (no process group).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional

from .manifest import CheckpointError, describe_experts, read_manifest


def inspect(directory: str) -> str:
    """A table of the checkpoint's tensors (logical shape, dtype, experts) and what it was saved at."""
    manifest = read_manifest(directory)
    rows = [(key, "x".join(map(str, entry["shape"])) or "scalar", entry["dtype"],
             describe_experts(list(range(len(entry["experts"])))) if "experts" in entry else "dense")
            for key, entry in sorted(manifest["tensors"].items())]
    widths = [max(len(row[i]) for row in rows + [("tensor", "shape", "dtype", "kind")]) for i in range(4)]
    lines = [f"{directory}: saved by {manifest['world_size']} rank(s), EP sizes {manifest['ep_sizes'] or [1]}; "
             f"{len(rows)} tensors in {len(manifest['files'])} storage files",
             "  ".join(h.ljust(w) for h, w in zip(("tensor", "shape", "dtype", "kind"), widths))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    """The command line; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m expert_parallel.checkpoint", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    show = commands.add_parser("inspect", help="list a checkpoint's tensors")
    show.add_argument("directory")
    convert = commands.add_parser("from-deepspeed", help="convert a DeepSpeed engine checkpoint (weights only)")
    convert.add_argument("engine_dir", help="the directory given to engine.save_checkpoint")
    convert.add_argument("out", help="the new checkpoint directory")
    convert.add_argument("--model", required=True, metavar="MODULE:FACTORY",
                         help="a function returning the trained model built with ep_size=1")
    convert.add_argument("--tag", default=None, help="the engine checkpoint's tag (default: its 'latest' file)")
    args = parser.parse_args(argv)
    try:
        if args.command == "inspect":
            print(inspect(args.directory))
            return 0
        from ..integrations.deepspeed.checkpoint import NOT_CONVERTED, from_deepspeed

        module_name, _, factory = args.model.partition(":")
        if not factory:
            parser.error(f"--model {args.model!r}: expected MODULE:FACTORY, e.g. mypkg.models:build_ep1")
        model = getattr(importlib.import_module(module_name), factory)()
        out = from_deepspeed(args.engine_dir, args.out, model, args.tag)
        print(f"wrote {out} (weights); not converted: {NOT_CONVERTED}")
        return 0
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
