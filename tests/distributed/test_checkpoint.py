"""Topology-free checkpoints: saved at (EP 2, world 2), resumed at (EP 4, world 4), (EP 1, DP 2),
(EP 2, DP 2) and (EP 2, expert TP 2, world 4), each saving again after its steps. The reference is
independent of our loader: torch's own ``dcp_to_torch_save`` reads a checkpoint into whole tensors,
and a plain single-process model and AdamW continue from them on the same global batch."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from expert_parallel import MoEConfig, MoELayer
from expert_parallel.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    mark_latest,
    save_checkpoint,
)
from expert_parallel.comm import expert_groups, reduce_gradients
from tests.harness import RankError, run_ranks

pytestmark = [pytest.mark.slow, pytest.mark.distributed]  # 4-rank topologies

D, E, TOKENS, SAVED_STEPS, NEXT_STEPS, LR = 8, 8, 16, 3, 2, 1e-2
# (ep_size, world, tp_size): the last splits every expert's d_ff over TP pairs (expert tensor parallelism)
TOPOLOGIES = [(4, 4, 1), (1, 2, 1), (2, 4, 1), (2, 4, 2)]
IDS = [f"ep{e}-world{w}" + (f"-etp{t}" if t > 1 else "") for e, w, t in TOPOLOGIES]
BROKEN_AT = (1, 2, 1)  # the topology that also tries the broken copies


class Net(nn.Module):
    """Dense in, an MoE layer (no aux loss, no drops: the loss is the same at every topology), dense out."""

    def __init__(self, ep_size: int, tp_size: int = 1) -> None:
        super().__init__()
        cfg = MoEConfig(d_model=D, d_ff=16, num_experts=E, ep_size=ep_size, router="topk", top_k=2,
                        expert="swiglu", dropless=True, aux_loss_weight=0.0, tp_size=tp_size,
                        expert_tensor_parallel=tp_size > 1)
        self.inp = nn.Linear(D, D)
        self.moe = MoELayer(cfg)
        self.out = nn.Linear(D, D)

    def forward(self, x):
        hidden = torch.tanh(self.inp(x))
        return self.out(hidden + self.moe(hidden).output)


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    return torch.randn(TOKENS, D, generator=generator), torch.randn(TOKENS, D, generator=generator)


def train_step(model, optimizer, step, rank, world, groups) -> float:
    """One step on this rank's share of the global batch (the ranks of a TP group share one); the
    mean loss over the data-parallel ranks."""
    if groups is not None and len(groups.tp_ranks) > 1:
        rank, world = groups.dp_ranks.index(rank), len(groups.dp_ranks)
    x, y = (t.chunk(world)[rank] for t in global_batch(step))
    loss = ((model(x) - y) ** 2).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if groups is not None:
        reduce_gradients(model, groups)
    optimizer.step()
    total = loss.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(total)
        return float(total) / dist.get_world_size()
    return float(total)


def _build(ep_size: int, seed: int, tp_size: int = 1):
    groups = expert_groups(ep_size, tp_size, tp_size > 1)
    torch.manual_seed(seed)
    model = Net(ep_size, tp_size)
    return model, torch.optim.AdamW(model.parameters(), lr=LR), groups


def save_run(rank: int, world: int, root: str) -> None:
    """Train SAVED_STEPS steps at EP 2, save (complete), one more step, then rank 1 dies mid-save."""
    model, optimizer, groups = _build(2, seed=0)
    for step in range(SAVED_STEPS):
        train_step(model, optimizer, step, rank, world, groups)
    save_checkpoint(Path(root) / "good", model, optimizer, extra={"step": SAVED_STEPS})
    if rank == 0:
        mark_latest(root, "good")
    train_step(model, optimizer, SAVED_STEPS, rank, world, groups)
    if rank == 1:  # die once this rank's storage file is partly written
        import torch.distributed.checkpoint.filesystem as fs

        def write_part_then_die(transforms, stream, *args, **kwargs):
            stream.write(b"\0" * 100)
            stream.flush()
            os._exit(3)

        fs._write_item = write_part_then_die
    save_checkpoint(Path(root) / "killed", model, optimizer, extra={"step": SAVED_STEPS + 1})
    if rank == 0:
        mark_latest(root, "killed")


def resume_run(rank: int, world: int, root: str, ep_size: int, tp_size: int, broken: dict) -> dict:
    """Failing loads first (every rank raises alike), then the latest checkpoint; its tensors,
    then NEXT_STEPS steps, then a save of this topology's state (``root/after-<topology>``)."""
    model, optimizer, groups = _build(ep_size, seed=123, tp_size=tp_size)  # everything must come from the file
    errors = {}
    for name, path in broken.items():
        try:
            load_checkpoint(path, model, optimizer)
        except CheckpointError as error:
            errors[name] = str(error)
    extra = load_checkpoint(latest_checkpoint(root), model, optimizer)
    first = model.moe.first_expert
    loaded = {name: p.detach().clone() for name, p in model.named_parameters()}
    moments = {name: {k: v.clone() for k, v in optimizer.state[p].items()} for name, p in model.named_parameters()}
    losses = [train_step(model, optimizer, extra["step"] + i, rank, world, groups) for i in range(NEXT_STEPS)]
    save_checkpoint(Path(root) / f"after-{ep_size}-{world}-{tp_size}", model, optimizer)
    return {"errors": errors, "extra": extra, "first": first, "loaded": loaded, "moments": moments, "losses": losses,
            "tp_rank": groups.tp_ranks.index(rank)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    with pytest.raises(RankError, match=r"--- rank 1 ---\nthe process exited with code 3"):
        run_ranks(save_run, 2, str(root), timeout=90)
    reference = root / "reference.pt"
    dcp_to_torch_save(root / "good", reference)
    return root, torch.load(reference, weights_only=False)


def reference_run(whole: dict) -> tuple[list[float], dict[str, torch.Tensor]]:
    """A plain single-process run (EP 1) from the saved tensors, through torch's own loaders: its
    losses and its final parameters and moments (under the checkpoint's keys)."""
    model = Net(1)
    model.load_state_dict({k.removeprefix("model."): v for k, v in whole.items() if k.startswith("model.")})
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    names = [name for name, _ in model.named_parameters()]
    state = {i: {key: whole[f"optim.{name}.{key}"].clone() for key in ("step", "exp_avg", "exp_avg_sq")}
             for i, name in enumerate(names)}
    optimizer.load_state_dict({"state": state, "param_groups": [{**optimizer.param_groups[0],
                                                                  "params": list(range(len(names)))}]})
    losses = [train_step(model, optimizer, SAVED_STEPS + i, 0, 1, None) for i in range(NEXT_STEPS)]
    final = {f"model.{name}": param.detach() for name, param in model.named_parameters()}
    final.update({f"optim.{name}.{key}": value for name, param in model.named_parameters()
                  for key, value in optimizer.state[param].items()})
    return losses, final


def _expert_rows_in_file(path: Path, rows: torch.Tensor) -> int:
    return path.read_bytes().find(rows.contiguous().view(torch.uint8).numpy().tobytes())


def broken_copies(root: Path, whole: dict) -> dict[str, str]:
    """Corrupted copies of the good checkpoint, by what was done to them."""
    copies = {}

    def copy(name):
        target = root / name
        shutil.copytree(root / "good", target)
        copies[name] = str(target)
        return target

    w1 = whole["model.moe.experts.w1"]
    flipped = copy("flipped") / "__1_0.distcp"  # rank 1 wrote experts 4-7
    data = bytearray(flipped.read_bytes())
    at = _expert_rows_in_file(flipped, w1[5])
    assert at > 0
    data[at + 7] ^= 0x40
    flipped.write_bytes(bytes(data))
    (copy("dropped") / "__1_0.distcp").unlink()
    swapped = copy("swapped_experts")  # expert 0's and expert 4's rows of w1 trade places between the files
    first, second = swapped / "__0_0.distcp", swapped / "__1_0.distcp"
    a, b = bytearray(first.read_bytes()), bytearray(second.read_bytes())
    at_a, at_b, size = _expert_rows_in_file(first, w1[0]), _expert_rows_in_file(second, w1[4]), w1[0].numel() * 4
    a[at_a:at_a + size], b[at_b:at_b + size] = b[at_b:at_b + size], a[at_a:at_a + size]
    first.write_bytes(bytes(a))
    second.write_bytes(bytes(b))
    files = copy("swapped_files")
    (files / "__0_0.distcp").rename(files / "tmp")
    (files / "__1_0.distcp").rename(files / "__0_0.distcp")
    (files / "tmp").rename(files / "__1_0.distcp")
    copies["killed"] = str(root / "killed")
    return copies


@pytest.fixture(scope="module")
def resumed(saved):
    root, whole = saved
    broken = broken_copies(root, whole)
    return {topology: run_ranks(resume_run, topology[1], str(root), topology[0], topology[2],
                                broken if topology == BROKEN_AT else {}, timeout=120)
            for topology in TOPOLOGIES}


@pytest.fixture(scope="module")
def reference(saved):
    return reference_run(saved[1])


def _my_part(whole: torch.Tensor, name: str, per_rank: dict, topology: tuple[int, int, int]) -> torch.Tensor:
    """This rank's part of a saved whole tensor: its experts' rows and, with expert TP, its slice of d_ff."""
    if not name.startswith("moe.experts.") or whole.dim() == 0:
        return whole
    part = whole[per_rank["first"]:per_rank["first"] + E // topology[0]]
    tp = topology[2]
    dim = {"w1": 2, "w3": 2, "w2": 1}[name.rsplit(".", 1)[-1]]  # d_ff's dimension in [E, D, F] / [E, F, D]
    width = part.shape[dim] // tp
    return part.narrow(dim, per_rank["tp_rank"] * width, width)


def test_killed_save_leaves_the_previous_checkpoint_latest(saved):
    root, _ = saved
    assert latest_checkpoint(root) == root / "good"
    assert (root / "killed").exists() and not (root / "killed" / "manifest.json").exists()


@pytest.mark.parametrize("topology", TOPOLOGIES, ids=IDS)
def test_resume_at_another_topology_loads_the_saved_logical_tensors_exactly(saved, resumed, topology):
    _, whole = saved
    for per_rank in resumed[topology]:
        assert per_rank["extra"] == {"step": SAVED_STEPS}
        for name, value in per_rank["loaded"].items():
            assert torch.equal(value, _my_part(whole[f"model.{name}"], name, per_rank, topology)), name
            for key, moment in per_rank["moments"][name].items():
                saved_moment = _my_part(whole[f"optim.{name}.{key}"], name, per_rank, topology)
                assert torch.equal(moment, saved_moment), f"{name}.{key}"


@pytest.mark.parametrize("topology", TOPOLOGIES, ids=IDS)
def test_resumed_losses_equal_an_uninterrupted_single_process_run(reference, resumed, topology):
    torch.testing.assert_close(resumed[topology][0]["losses"], reference[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("topology", TOPOLOGIES, ids=IDS)
def test_a_save_at_the_new_topology_holds_the_single_process_runs_tensors(saved, resumed, reference, topology):
    after = saved[0] / "after-{}-{}-{}".format(*topology)
    dcp_to_torch_save(after, after / "whole.pt")
    whole = torch.load(after / "whole.pt", weights_only=False)
    assert set(whole) - {"objects"} == set(reference[1])
    for key, expected in reference[1].items():
        torch.testing.assert_close(whole[key], expected, rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize("name, message", [
    ("flipped", r"'model\.moe\.experts\.w1' expert 5: checksum differs .* corrupted"),
    ("dropped", r"storage file __1_0\.distcp .* is missing; it holds .*model\.moe\.experts\.w1"),
    ("swapped_experts", r"'model\.moe\.experts\.w1' expert 0: .* holds the saved data of expert 4: an expert loaded "
                        r"into the wrong slot"),
    ("swapped_files", r"storage file __[01]_0\.distcp .* is (truncated|corrupted); it holds .*(model|optim)\."),
    ("killed", r"no manifest\.json: the save that wrote it did not finish"),
])
def test_corrupted_checkpoint_fails_on_every_rank_naming_the_tensor(resumed, name, message):
    for per_rank in resumed[BROKEN_AT]:
        assert name in per_rank["errors"], f"{name} loaded without an error"
        assert per_rank["errors"][name] == resumed[BROKEN_AT][0]["errors"][name]
        assert re.search(message, per_rank["errors"][name]), per_rank["errors"][name]


def test_checkpoint_files_hold_each_expert_once(saved):
    root, _ = saved
    metadata = FileSystemReader(root / "good").read_metadata()
    chunks = metadata.state_dict_metadata["model.moe.experts.w1"].chunks
    expected = [((0, 0, 0), (4, D, 16)), ((4, 0, 0), (4, D, 16))]
    assert sorted((tuple(c.offsets), tuple(c.sizes)) for c in chunks) == expected
