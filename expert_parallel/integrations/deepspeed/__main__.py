"""``python -m expert_parallel.integrations.deepspeed``: convert a DeepSpeed engine checkpoint into
a topology-free ``expert_parallel.checkpoint`` (weights only; see ``checkpoint.py``).

    python -m expert_parallel.integrations.deepspeed from-deepspeed ENGINE_DIR OUT_DIR \\
        --model pkg.module:factory [--tag TAG]

``--model`` names a function that takes no arguments and returns the model the engine trained,
built with ``ep_size=1`` in this process (no process group).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional

from ...checkpoint import CheckpointError
from .checkpoint import NOT_CONVERTED, from_deepspeed


def main(argv: Optional[list[str]] = None) -> int:
    """The command line; returns the exit status (2 for a checkpoint problem)."""
    parser = argparse.ArgumentParser(prog="python -m expert_parallel.integrations.deepspeed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("from-deepspeed", help="convert a DeepSpeed engine checkpoint (weights only)")
    convert.add_argument("engine_dir", help="the directory given to engine.save_checkpoint")
    convert.add_argument("out", help="the new checkpoint directory")
    convert.add_argument("--model", required=True, metavar="MODULE:FACTORY",
                         help="a function returning the trained model built with ep_size=1")
    convert.add_argument("--tag", default=None, help="the engine checkpoint's tag (default: its 'latest' file)")
    args = parser.parse_args(argv)
    module_name, _, factory = args.model.partition(":")
    if not factory:
        parser.error(f"--model {args.model!r}: expected MODULE:FACTORY, e.g. mypkg.models:build_ep1")
    try:
        model = getattr(importlib.import_module(module_name), factory)()
        out = from_deepspeed(args.engine_dir, args.out, model, args.tag)
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out} (weights); not converted: {NOT_CONVERTED}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
