"""Asynchronous checkpoints: ``save_checkpoint`` with the writing overlapped with training.

The caller's step captures the checkpoint (a copy of every tensor, the RNG, the checksums:
``store.prepare_save``); a background thread then writes the copies with DCP (the files are
fsynced), and only then writes ``manifest.json`` and runs ``on_complete`` (e.g. ``mark_latest``).
A process killed before that leaves a directory without a manifest, which ``load_checkpoint``
refuses and ``latest`` never names.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from .store import prepare_save, write_prepared


class AsyncSave:
    """A checkpoint being written in a background thread (``async_save_checkpoint``)."""

    def __init__(self, directory: Path, write: Callable[[], None]) -> None:
        self.directory = directory
        self._error: Optional[BaseException] = None

        def run() -> None:
            try:
                write()
            except BaseException as error:  # noqa: BLE001 - handed to the thread that waits
                self._error = error

        self._thread = threading.Thread(target=run, name=f"checkpoint {self.directory.name}", daemon=True)
        self._thread.start()

    def done(self) -> bool:
        """Whether the save has finished (complete or failed); does not block."""
        return not self._thread.is_alive()

    def wait(self) -> Path:
        """Block until the save is complete (its manifest written, ``on_complete`` run); returns the
        directory. Re-raises, on the calling thread, whatever the writing raised."""
        self._thread.join()
        if self._error is not None:
            raise RuntimeError(f"the checkpoint {self.directory} was not saved: {self._error}") from self._error
        return self.directory


def async_save_checkpoint(directory: str | os.PathLike, model: nn.Module,
                          optimizer: Optional[torch.optim.Optimizer] = None, extra: Optional[dict[str, Any]] = None,
                          group: Optional[dist.ProcessGroup] = None,
                          on_complete: Optional[Callable[[], None]] = None) -> AsyncSave:
    """Start saving what ``save_checkpoint`` saves; returns when the state is captured, so the
    caller may step ``model`` and ``optimizer`` at once. ``AsyncSave.wait`` waits for the rest.

    Collective: every rank calls it at the same point. The capture (a copy of every tensor on
    its device, the RNG, the SHA-256 checksums) runs here and syncs the host; the storage files,
    their checksums and ``manifest.json`` are written by a background thread, whose collectives
    run over ``group``. Wait for one save before starting the next.

    Args:
        directory, model, optimizer, extra: as for ``save_checkpoint``.
        group: a process group of every rank that nothing else uses while the save runs (e.g.
            ``dist.new_group(backend="gloo")``, created once); required with more than one rank,
            since training's own collectives run at the same time on the default group.
        on_complete: run on every rank by the background thread after the manifest exists.

    Raises:
        ValueError: several ranks and no ``group``.
        RuntimeError: as ``save_checkpoint`` (replicas that differ), before anything is written.
    """
    if dist.is_initialized() and dist.get_world_size() > 1 and group is None:
        raise ValueError("async_save_checkpoint: group=None with several ranks; pass a process group that training "
                         "does not use, e.g. dist.new_group(backend='gloo') created once on every rank")
    prepared = prepare_save(directory, model, optimizer, extra, stage=True)

    def write() -> None:
        write_prepared(prepared, group)
        if on_complete is not None:
            on_complete()

    return AsyncSave(prepared.directory, write)
