"""The one results writer: a JSON file per run under ``benchmarks/results/`` with the machine,
the versions, the config and the numbers."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Iterable

import torch

from .runtime import malloc_tuned

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SCHEMA = 1


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=RESULTS_DIR.parent, timeout=5, check=True).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict[str, Any]:
    """Machine and versions: what a reader needs to judge the numbers."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "machine": {"platform": platform.platform(), "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
                    "gpu": gpu, "gpu_count": torch.cuda.device_count()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "cuda": torch.version.cuda, "deepspeed": _version("deepspeed"),
                     "transformers": _version("transformers"),
                     "expert_parallel": _version("expert_parallel"), "git_commit": _commit()},
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "malloc_tuned": malloc_tuned(),
    }


def write(kind: str, name: str, payload: dict[str, Any], out_dir: Path | str | None = None) -> Path:
    """Write ``{schema, kind, name, environment, **payload}`` to ``<out_dir>/<kind>-<name>.json``."""
    folder = Path(out_dir) if out_dir is not None else RESULTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{kind}-{name}.json"
    record = {"schema": SCHEMA, "kind": kind, "name": name, "environment": environment(), **payload}
    path.write_text(json.dumps(record, indent=1, sort_keys=False) + "\n")
    return path


def load(paths: Iterable[Path | str]) -> list[dict[str, Any]]:
    """Read result files (skipping ones that are not ours)."""
    records = []
    for path in paths:
        record = json.loads(Path(path).read_text())
        if isinstance(record, dict) and record.get("schema") == SCHEMA:
            record["path"] = str(path)
            records.append(record)
    return records


def load_dir(kind: str, folder: Path | str | None = None) -> list[dict[str, Any]]:
    """Every result of ``kind`` in ``folder`` (default ``benchmarks/results/``), sorted by name."""
    folder = Path(folder) if folder is not None else RESULTS_DIR
    return load(sorted(folder.glob(f"{kind}-*.json")))
