"""The manifest of a checkpoint: every logical tensor's shape, dtype and checksum (per expert for
expert tensors), and a checksum of every storage file. Written last by a save, checked by a load."""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

MANIFEST = "manifest.json"
FORMAT = "expert_parallel.checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into this model: a missing or unexpected tensor, a shape
    or dtype that differs, data whose checksum is not the saved one, a missing or incomplete file.
    The message names the tensor (and the expert) and the fix."""


def tensor_digest(tensor: Tensor) -> str:
    """SHA-256 of a tensor's bytes in row-major order (host copy of device tensors; syncs the host)."""
    data = tensor.detach().to("cpu").reshape(-1).contiguous().view(torch.uint8)
    return hashlib.sha256(ctypes.string_at(data.data_ptr(), data.numel()) if data.numel() else b"").hexdigest()


def bytes_digest(data: bytes) -> str:
    """SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def file_digest(path: Path) -> str:
    """SHA-256 of a file, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def tensor_entry(tensor: Tensor) -> dict[str, Any]:
    """A manifest entry's shape and dtype (the logical shape: a DTensor's is its global one)."""
    return {"shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")}


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest.json`` atomically (a killed write leaves no torn manifest)."""
    manifest = {"format": FORMAT, "version": VERSION, **manifest}
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, directory / MANIFEST)


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The manifest of the checkpoint in ``directory``.

    Raises:
        CheckpointError: no manifest (the save did not finish, or this is not such a checkpoint),
            or one of another format or version.
    """
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{directory} has no {MANIFEST}: the save that wrote it did not finish (a killed job) "
                              "or it is not an expert_parallel checkpoint; load an earlier checkpoint (the 'latest' "
                              "file names the last complete one)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CheckpointError(f"{path} is format {manifest.get('format')!r} version {manifest.get('version')!r}; this "
                              f"expert_parallel reads {FORMAT!r} version {VERSION}")
    return manifest


def describe_experts(ids: list[int]) -> str:
    """``"experts 0-3"``, ``"expert 5"`` or ``"experts 1, 4"``: a short list of global ids."""
    if len(ids) == 1:
        return f"expert {ids[0]}"
    if ids == list(range(ids[0], ids[-1] + 1)):
        return f"experts {ids[0]}-{ids[-1]}"
    return "experts " + ", ".join(map(str, ids))
