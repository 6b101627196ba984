"""Save and load topology-free checkpoints with ``torch.distributed.checkpoint`` (DCP).

A checkpoint is a directory: DCP's storage files (``__<rank>_0.distcp``, one per saving rank) and
``.metadata``, then ``manifest.json``, written last. Expert tensors are DTensors sharded on their
expert dimension (and, with expert tensor parallelism, on ``d_ff``) over a ``[replica, ep, tp]``
device mesh, so DCP stores each expert row once and a load at another EP size, data-parallel
size or world size reads exactly the rows each rank now holds. Dense tensors are replicated and
stored once.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
from pathlib import Path
from typing import Any, NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from ..comm import gather_objects, rank, world_size
from .logical import (
    ExpertShard,
    expert_key_shards,
    expert_shards,
    init_optimizer_state,
    model_tensors,
    optimizer_tensors,
    parameter_of,
)
from .manifest import (
    MANIFEST,
    CheckpointError,
    bytes_digest,
    describe_experts,
    file_digest,
    read_manifest,
    tensor_digest,
    tensor_entry,
    write_manifest,
)

LATEST = "latest"
METADATA = ".metadata"  # DCP's index: which storage file holds which tensor rows
OBJECTS = "objects"  # one pickled blob: user extra, optimizer groups and non-tensor state, every rank's RNG


def save_checkpoint(directory: str | os.PathLike, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    extra: Optional[dict[str, Any]] = None) -> Path:
    """Save ``model`` (and ``optimizer``'s state, every rank's RNG, ``extra``) to ``directory``.

    Collective: every rank calls it with its own model shard. Expert tensors are saved as their
    rows of the logical ``[E, ...]`` tensors, dense ones once; then ``manifest.json`` (shapes,
    dtypes, per-tensor and per-expert SHA-256, per-file SHA-256, ``.metadata`` included) is written, last: a directory
    without it is an unfinished save. Syncs the host (checksums on host copies).
    ``async_save_checkpoint`` does the same with the writing in a background thread.

    Args:
        directory: a new directory (or one to overwrite), on storage every rank can reach.
        model: the model (any module; experts in ``MoELayer`` s are found by structure).
        optimizer: its optimizer (state keyed by parameter name), or ``None``.
        extra: picklable trainer state (step, data position, ...), the same on every rank;
            ``load_checkpoint`` returns it.

    Raises:
        RuntimeError: replicas that should be equal differ (a dense tensor between ranks, or an
            expert between its data-parallel replicas): the run has diverged; nothing is written.
    """
    return write_prepared(prepare_save(directory, model, optimizer, extra, stage=False))


class PreparedSave(NamedTuple):
    """A checkpoint captured by ``prepare_save``, ready for ``write_prepared``: the flat DCP state
    and the manifest without its storage-file checksums (the files do not exist yet)."""

    directory: Path
    state: dict[str, Any]
    manifest: dict[str, Any]


def prepare_save(directory: str | os.PathLike, model: nn.Module, optimizer: Optional[torch.optim.Optimizer],
                 extra: Optional[dict[str, Any]], stage: bool) -> PreparedSave:
    """The first half of ``save_checkpoint`` (same arguments and errors): the state, every rank's
    RNG and every tensor's checksum. ``stage``: copy the tensors, so that the model and optimizer
    may change while ``write_prepared`` writes the copies. Collective; syncs the host."""
    state, keys = _logical_state(model, optimizer)
    if stage:
        state = {key: _copy(value) for key, value in state.items()}
    rng = gather_objects(_rng_state(model))
    objects = {"extra": extra or {}, "optim_groups": keys.optim_groups, "optim_other": keys.optim_other, "rng": rng}
    blob = pickle.dumps(objects)
    state[OBJECTS] = blob
    digests = gather_objects(_digests(state, keys))
    entries = _manifest_entries(state, keys, digests)  # raises on every rank alike
    return PreparedSave(Path(directory), state, {
        "world_size": world_size(),
        "ep_sizes": sorted({len(shard.ep_ranks) for shard in keys.experts.values()}),
        "tensors": entries,
        "objects": {OBJECTS: bytes_digest(blob)},
    })


def write_prepared(prepared: PreparedSave, group: Optional[dist.ProcessGroup] = None) -> Path:
    """The second half of ``save_checkpoint``: DCP writes (and fsyncs) the storage files, then rank 0
    writes ``manifest.json`` with their checksums; every rank returns after the manifest exists.
    Collective over ``group`` (default: the world; a group of every rank that training does not use
    at the same time when called from a background thread)."""
    directory = prepared.directory
    if rank() == 0:  # overwriting: the directory is unfinished until the new manifest is written
        (directory / MANIFEST).unlink(missing_ok=True)
    metadata = dcp.save(prepared.state, checkpoint_id=directory, process_group=group,
                        no_dist=world_size() == 1)  # every rank gets it
    files = sorted({info.relative_path for info in metadata.storage_data.values()})
    file_digests = gather_objects({name: file_digest(directory / name) for name in files[rank()::world_size()]},
                                  group)
    if rank() == 0:  # the coordinator wrote .metadata before dcp.save returned
        digests = {METADATA: file_digest(directory / METADATA)}
        digests.update((name, digest) for part in file_digests for name, digest in part.items())
        write_manifest(directory, {**prepared.manifest, "files": digests})
    gather_objects(None, group)  # nobody returns before the manifest exists
    return directory


def _copy(value: Any) -> Any:
    """A copy of a state value that later steps do not change (a DTensor keeps its mesh)."""
    if isinstance(value, DTensor):
        return DTensor.from_local(value.to_local().detach().clone(), value.device_mesh, value.placements,
                                  run_check=False, shape=value.shape, stride=value.stride())
    return value.detach().clone() if isinstance(value, Tensor) else value


def load_checkpoint(directory: str | os.PathLike, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    restore_rng: bool = True) -> dict[str, Any]:
    """Load a ``save_checkpoint`` directory into ``model`` (and ``optimizer``) at this job's
    topology, whatever the topology that saved it; returns the saved ``extra``.

    Collective. Each rank reads the rows of the expert tensors it now holds, the dense tensors and
    the optimizer state; every loaded tensor (every expert row) is checked against the manifest's
    checksum before the call returns. RNG: every rank's generator is restored exactly when the
    world size is the one that saved; at another world size each rank gets a new stream seeded
    from the saved streams and its rank (streams cannot be split or merged). Syncs the host.

    Raises:
        CheckpointError (a ValueError), on every rank: no manifest (an unfinished save), a tensor
            missing from the checkpoint or not in the model, a shape or dtype that differs, a
            missing or truncated storage file, data whose checksum differs from the manifest (a
            corrupted file, or an expert's rows found in another expert's place). The message names
            the tensor, the experts and the file.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    if optimizer is not None:
        init_optimizer_state(optimizer)
    state, keys = _logical_state(model, optimizer)
    state[OBJECTS] = b""
    stateless = _drop_unsaved_optimizer_state(state, manifest) if optimizer is not None else set()
    _check_keys(state, keys, manifest, optimizer is not None)
    _check_files(directory, state)
    try:
        dcp.load(state, checkpoint_id=directory, no_dist=world_size() == 1)
    except Exception as error:  # noqa: BLE001 - reported with the file that caused it, if one did
        problems = verify_files(directory, manifest)
        raise CheckpointError(problems[0] if problems else f"reading {directory} failed: {error}") from error
    problems = gather_objects(_verify(state, keys, manifest))
    first = next(((r, p) for r, p in enumerate(problems) if p), None)
    if first is not None:
        raise CheckpointError(f"{directory}: rank {first[0]}: {first[1]}")
    objects = pickle.loads(state[OBJECTS])
    if optimizer is not None:
        _restore_optimizer(optimizer, model, keys.optim_groups, objects, stateless)
    if restore_rng:
        _restore_rng(objects["rng"], model)
    return objects["extra"]


def latest_checkpoint(root: str | os.PathLike) -> Optional[Path]:
    """The checkpoint that ``root/latest`` names (the last complete save), or ``None``."""
    pointer = Path(root) / LATEST
    return Path(root) / pointer.read_text().strip() if pointer.is_file() else None


def mark_latest(root: str | os.PathLike, name: str, keep: int = 2) -> None:
    """Point ``root/latest`` at ``root/name`` (atomically) and delete older checkpoints beyond the
    newest ``keep``. Call it on one rank after ``save_checkpoint`` returned (the save is complete).
    A job killed during a save never reaches this, so ``latest`` still names the previous checkpoint."""
    root = Path(root)
    tmp = root / (LATEST + ".tmp")
    tmp.write_text(name + "\n")
    os.replace(tmp, root / LATEST)
    complete = sorted((path for path in root.iterdir() if (path / MANIFEST).is_file() and path.name != name),
                      key=lambda path: path.stat().st_mtime)
    for old in complete[:max(len(complete) - (keep - 1), 0)] if keep >= 1 else []:
        shutil.rmtree(old, ignore_errors=True)


class _Keys(NamedTuple):
    """What ``_logical_state`` learned about the keys: which are expert rows (and where), the
    optimizer's groups (parameters by name) and non-tensor state."""

    experts: dict[str, ExpertShard]
    optim_groups: list
    optim_other: dict


def _logical_state(model: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> tuple[dict[str, Any], _Keys]:
    """The flat DCP state: dense tensors as they are, expert tensors as DTensors on their mesh."""
    tensors = model_tensors(model)
    groups, other = [], {}
    if optimizer is not None:
        optim, groups, other = optimizer_tensors(model, optimizer)
        tensors.update(optim)
    experts = expert_key_shards(list(tensors), expert_shards(model), tensors)
    meshes = _meshes({(shard.ep_ranks, shard.tp_ranks) for shard in experts.values()}, model)
    state: dict[str, Any] = dict(tensors)
    for key, shard in experts.items():
        local, mesh = tensors[key], meshes.get((shard.ep_ranks, shard.tp_ranks))
        if mesh is not None:
            full = shard.full_shape(local.shape)
            placements = [Replicate(), Shard(0), Replicate() if shard.tp_dim is None else Shard(shard.tp_dim)]
            state[key] = DTensor.from_local(local, mesh, placements, run_check=False, shape=torch.Size(full),
                                            stride=_contiguous_strides(full))
    return state, _Keys(experts, groups, other)


def _meshes(layouts: set[tuple[tuple[int, ...], tuple[int, ...]]],
            model: nn.Module) -> dict[tuple[tuple[int, ...], tuple[int, ...]], DeviceMesh]:
    """A ``[replica, ep, tp]`` device mesh for each of this rank's (EP group, expert-TP group)
    layouts: ``mesh[r, e, t]`` is the ``r``-th rank (in rank order) at EP position ``e`` and TP
    position ``t`` (``tp`` has size 1 without expert TP). ``{}`` without a process group."""
    if world_size() == 1:
        return {}
    ordered = sorted(layouts)
    everyone = gather_objects(ordered)
    if any(len(layout) != len(ordered) for layout in everyone):
        raise RuntimeError("ranks disagree on how many distinct EP groups the model's layers use; every rank must "
                           "checkpoint the same model")
    device_type = next(model.parameters()).device.type
    meshes = {}
    for index, layout in enumerate(ordered):
        cells: dict[tuple[int, int], list[int]] = {}
        for r, mine in enumerate(everyone):
            ep_ranks, tp_ranks = mine[index]
            cells.setdefault((ep_ranks.index(r), tp_ranks.index(r)), []).append(r)
        ep, tp = len(layout[0]), len(layout[1])
        if sorted(cells) != [(e, t) for e in range(ep) for t in range(tp)] or len({len(c) for c in cells.values()}) > 1:
            raise RuntimeError(f"the EP groups of size {ep} (and expert-TP groups of size {tp}) do not split the world "
                               "evenly; topology-free checkpoints need every rank in one EP group of the same size")
        mesh = [[cells[e, t] for t in range(tp)] for e in range(ep)]  # [ep, tp, replica]
        # DCP reads only the mesh coordinates: no process groups are created for it
        meshes[layout] = DeviceMesh(device_type, torch.tensor(mesh).permute(2, 0, 1).contiguous(),
                                    mesh_dim_names=("replica", "ep", "tp"), _init_backend=False)
    return meshes


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def _local(value: Any) -> Any:
    return value.to_local() if isinstance(value, DTensor) else value


def _digest(value: Tensor, shard: Optional[ExpertShard]) -> str | dict[int, str]:
    """A tensor's checksum: whole for a dense one, row by row ``{global id: sha}`` for an expert
    tensor (with expert TP the TP group's slices are joined first: a collective of the TP group)."""
    if shard is None:
        return tensor_digest(value)
    rows = shard.whole_rows(_local(value))
    return {g: tensor_digest(rows[i]) for i, g in enumerate(shard.expert_ids)}


def _digests(state: dict[str, Any], keys: _Keys) -> dict[str, Any]:
    """This rank's checksums of every tensor in ``state`` (see ``_digest``)."""
    return {key: _digest(value, keys.experts.get(key)) for key, value in state.items() if isinstance(value, Tensor)}


def _manifest_entries(state: dict[str, Any], keys: _Keys, digests: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge every rank's checksums into manifest entries; ``RuntimeError`` if replicas differ."""
    entries = {}
    for key, value in state.items():
        if not isinstance(value, Tensor):
            continue
        if key in keys.experts:
            rows: dict[int, tuple[int, str]] = {}
            for r, part in enumerate(digests):
                for g, digest in part[key].items():
                    if rows.setdefault(g, (r, digest))[1] != digest:
                        raise RuntimeError(f"checkpoint not saved: expert {g} of {key!r} differs between its replicas "
                                           f"on ranks {rows[g][0]} and {r}; their gradients were not reduced alike")
            entries[key] = {**tensor_entry(value), "experts": [rows[g][1] for g in sorted(rows)]}
        else:
            differing = [r for r, part in enumerate(digests) if part[key] != digests[0][key]]
            if differing:
                raise RuntimeError(f"checkpoint not saved: {key!r} differs between rank 0 and ranks {differing}, which "
                                   "should hold the same copy; the data-parallel replicas have diverged")
            entries[key] = {**tensor_entry(value), "sha256": digests[0][key]}
    return entries


def _drop_unsaved_optimizer_state(state: dict[str, Any], manifest: dict[str, Any]) -> set[str]:
    """Parameters that had no optimizer state when the checkpoint was saved (an optimizer creates
    it at a parameter's first step with a gradient): their keys leave ``state``; returns their names.
    A checkpoint without any optimizer state is left to ``_check_keys`` (an error)."""
    saved = {parameter_of(key) for key in manifest["tensors"] if key.startswith("optim.")}
    if not saved:
        return set()
    stateless = {parameter_of(key) for key in state if key.startswith("optim.")} - saved
    for key in [key for key in state if key.startswith("optim.") and parameter_of(key) in stateless]:
        del state[key]
    return stateless


def _check_keys(state: dict[str, Any], keys: _Keys, manifest: dict[str, Any], with_optimizer: bool) -> None:
    """Every model (and optimizer) tensor is in the checkpoint with the same shape and dtype, and
    the checkpoint holds no model tensor the model lacks."""
    saved = manifest["tensors"]
    wanted = {key for key in state if key.startswith("model.") or (with_optimizer and key.startswith("optim."))}
    missing = sorted(wanted - set(saved))
    if missing:
        fix = ("it was saved without optimizer state; load without the optimizer" if all(
            key.startswith("optim.") for key in missing) else "the model differs from the one that saved it")
        raise CheckpointError(f"tensor {missing[0]!r} is missing from the checkpoint ({len(missing)} missing in all); "
                              f"{fix}")
    unexpected = sorted(key for key in saved if key.startswith("model.") and key not in state)
    if unexpected:
        raise CheckpointError(f"the checkpoint holds {unexpected[0]!r} ({len(unexpected)} in all), which the model "
                              "does not have; build the model with the configuration that saved it")
    for key in sorted(wanted):
        entry, ours = saved[key], tensor_entry(state[key])
        shape, dtype = ours["shape"], ours["dtype"]
        if shape != entry["shape"]:
            raise CheckpointError(f"tensor {key!r} has shape {entry['shape']} in the checkpoint but {shape} in the "
                                  "model; build the model with the configuration that saved it (expert tensors are "
                                  "compared whole, [num_experts, ...], whatever the EP size)")
        if dtype != entry["dtype"]:
            raise CheckpointError(f"tensor {key!r} is {entry['dtype']} in the checkpoint but {dtype} in the model; "
                                  f"cast the model to {entry['dtype']} before loading (and back after)")


def _read_metadata(directory: Path) -> Any:
    """DCP's ``.metadata`` of ``directory``; ``CheckpointError`` naming the file if it is missing or
    cannot be read (a corrupted file fails inside ``pickle``, with nothing that names it)."""
    try:
        return FileSystemReader(directory).read_metadata()
    except FileNotFoundError:
        raise CheckpointError(f"{directory} has no {METADATA}: the storage files are incomplete; load an earlier "
                              "checkpoint") from None
    except Exception as error:  # noqa: BLE001 - UnicodeDecodeError, UnpicklingError, EOFError, ...
        raise CheckpointError(f"{METADATA} of {directory} is corrupted (it cannot be read: {type(error).__name__}); "
                              "it indexes every storage file's tensors; restore the file or load an earlier "
                              "checkpoint") from error


def _check_files(directory: Path, state: dict[str, Any]) -> None:
    """Every storage file that holds a wanted tensor exists and is long enough."""
    metadata = _read_metadata(directory)
    short: dict[str, list[str]] = {}
    for index, info in metadata.storage_data.items():
        if index.fqn not in state:
            continue
        path = directory / info.relative_path
        if not path.is_file() or path.stat().st_size < info.offset + info.length:
            row = index.offset[0] if index.offset else 0
            what = f"{index.fqn} (from row {row})" if row else index.fqn
            short.setdefault(info.relative_path, []).append(what)
    if short:
        name, tensors = next(iter(sorted(short.items())))
        state_word = "missing" if not (directory / name).is_file() else "truncated"
        raise CheckpointError(_file_problem(directory, name, state_word, tensors))


def verify_files(directory: str | os.PathLike, manifest: dict[str, Any]) -> list[str]:
    """Every file of the checkpoint whose SHA-256 differs from ``manifest`` (or that is missing), as
    messages naming the file and the tensors it holds; ``[]`` if every file is intact. Reads every
    byte (``python -m expert_parallel.checkpoint inspect --verify``; ``load_checkpoint`` on a failed read).

    Raises:
        CheckpointError: ``.metadata`` is missing or corrupted (the tensors of the others cannot be named).
    """
    directory = Path(directory)
    files = manifest["files"]
    if METADATA in files and (directory / METADATA).is_file() and file_digest(directory / METADATA) != files[METADATA]:
        raise CheckpointError(f"{METADATA} of {directory} is corrupted (its SHA-256 differs from the manifest); it "
                              "indexes every storage file's tensors; restore the file or load an earlier checkpoint")
    metadata = _read_metadata(directory)
    problems = []
    for name, digest in sorted(files.items()):
        if name == METADATA:
            continue
        path = directory / name
        what = "missing" if not path.is_file() else (
            "corrupted (its SHA-256 differs from the manifest)" if file_digest(path) != digest else None)
        if what is not None:
            held = sorted({index.fqn for index, info in metadata.storage_data.items() if info.relative_path == name})
            problems.append(_file_problem(directory, name, what, held))
    return problems


def _file_problem(directory: Path, name: str, what: str, tensors: list[str]) -> str:
    """The message for a storage file that cannot be read as saved, naming (up to 4 of) its tensors."""
    more = f" and {len(tensors) - 4} more" if len(tensors) > 4 else ""
    return (f"storage file {name} of {directory} is {what}; it holds {', '.join(tensors[:4])}{more}; restore the "
            "file or load an earlier checkpoint")


def _verify(state: dict[str, Any], keys: _Keys, manifest: dict[str, Any]) -> Optional[str]:
    """This rank's first loaded tensor (or expert row) whose checksum is not the manifest's. Every
    key is visited (with expert TP, joining a row's slices is a collective of the TP group)."""
    saved, problems = manifest["tensors"], []
    if bytes_digest(state[OBJECTS]) != manifest["objects"][OBJECTS]:
        problems.append("the trainer state (extra, optimizer groups, RNG) differs from the saved one: the file is "
                        "corrupted")
    for key, value in state.items():
        if key not in saved:
            continue
        digest = _digest(value, keys.experts.get(key))
        if isinstance(digest, dict):
            rows = saved[key]["experts"]
            for g, row_digest in digest.items():
                if row_digest != rows[g]:
                    found = [e for e, row in enumerate(rows) if row == row_digest]
                    where = (f"it holds the saved data of {describe_experts(found)}: an expert loaded into the wrong "
                             "slot (swapped files?)" if found else "the data is corrupted")
                    problems.append(f"tensor {key!r} {describe_experts([g])}: checksum differs from the manifest; "
                                    f"{where}")
        elif digest != saved[key]["sha256"]:
            problems.append(f"tensor {key!r}: checksum differs from the manifest; the data is corrupted")
    return problems[0] if problems else None


def _restore_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module, groups: list[dict], objects: dict[str, Any],
                       stateless: set[str]) -> None:
    """The saved hyperparameters of each group (``groups``: the optimizer's, parameters by name;
    they must be the saved ones), non-tensor state, and no state for the ``stateless`` parameters
    (as at save: no gradient had reached them yet)."""
    saved = objects["optim_groups"]
    if [g["params"] for g in groups] != [g["params"] for g in saved]:
        raise CheckpointError("the optimizer's parameter groups differ from the saved ones (by parameter name); build "
                              "the optimizer with the same groups as the run that saved it")
    for group, saved_group in zip(optimizer.param_groups, saved):
        group.update({key: value for key, value in saved_group.items() if key != "params"})
    params = dict(model.named_parameters())
    for name, values in objects["optim_other"].items():
        optimizer.state[params[name]].update(values)
    for name in stateless:
        optimizer.state.pop(params[name], None)


def _rng_state(model: nn.Module) -> dict[str, bytes]:
    """This rank's CPU generator state, and its accelerator's when the model lives on one, as bytes
    (bytes pickle the same on every rank; the manifest checksums the pickled trainer state)."""
    state = {"cpu": torch.get_rng_state()}
    device = next(model.parameters()).device
    if device.type != "cpu":  # the accelerator's generator (CUDA, XPU, ...) of the model's device
        state[device.type] = torch.get_device_module(device.type).get_rng_state(device)
    return {name: bytes(value.tolist()) for name, value in state.items()}


def _restore_rng(saved: list[dict[str, bytes]], model: nn.Module) -> None:
    """Restore this rank's saved generators when the world size is unchanged; otherwise seed new
    ones from the saved streams and this rank (so resumed runs stay deterministic)."""
    if len(saved) != world_size():
        streams = b"".join(part["cpu"] for part in saved)
        torch.manual_seed(int(hashlib.sha256(streams + rank().to_bytes(8, "little")).hexdigest()[:15], 16))
        return
    me = {name: torch.tensor(list(value), dtype=torch.uint8) for name, value in saved[rank()].items()}
    torch.set_rng_state(me["cpu"])
    device = next(model.parameters()).device
    if device.type != "cpu" and device.type in me:
        torch.get_device_module(device.type).set_rng_state(me[device.type], device)
