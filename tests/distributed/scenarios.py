"""Run ``Case``s on spawned ranks (``run_cases``) and check them in the parent (``check_case``)."""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch
from torch import nn
from torch.distributed import ProcessGroup
from torch.testing import assert_close

from expert_parallel import MoELayer
from expert_parallel.comm import expert_groups, reduce_gradients

from .reference import (
    TOLERANCE,
    Case,
    capacity_formula,
    cotangent,
    ep1_layer_run,
    full_weights,
    load_layer,
    reference_name,
    reference_rank,
    tokens,
    uniform_seed,
)


def build_layer(case: Case, rank: int, ep_group: Optional[ProcessGroup] = None) -> tuple[nn.Module, MoELayer, int]:
    """The EP layer of ``case`` holding the full weights' slice, made as ``case.build`` says.

    ``ep_group`` is passed to the layer (``None``: the layer builds consecutive groups). Returns
    the module to call (the compiled wrapper for ``"compile"``), the layer, its EP rank (from the
    test's groups, not the layer's word for them).
    """
    cfg = case.config()
    if case.build == "meta":
        with torch.device("meta"):
            layer = MoELayer(cfg, ep_group=ep_group)
        layer.to_empty(device="cpu")
    else:
        layer = MoELayer(cfg, ep_group=ep_group)
    ep_rank = case.ep_group_of(rank).index(rank)
    load_layer(layer, full_weights(case), ep_rank)
    if case.build == "assign":
        loaded, layer = layer, MoELayer(cfg, ep_group=ep_group)
        layer.load_state_dict({k: v.clone() for k, v in loaded.state_dict().items()}, assign=True)
    elif case.build == "deepcopy":
        layer = copy.deepcopy(layer)
    # the eager backend: Dynamo's wrapper and graph capture without paying for code generation
    module = torch.compile(layer, backend="eager") if case.build == "compile" else layer
    return module, layer, ep_rank


def run_case(rank: int, case: Case, ep_group: Optional[ProcessGroup] = None) -> dict[str, Any]:
    """Build the EP layer of ``case`` with the full weights' slice, run it, return what it gave."""
    torch.manual_seed(case.seed)
    cfg = case.config()
    module, layer, ep_rank = build_layer(case, rank, ep_group)
    layer.train(not case.eval)
    x = tokens(case, rank).requires_grad_()
    torch.manual_seed(uniform_seed(case, rank))
    out = module(x)
    result: dict[str, Any] = {"y": out.output.detach(), "aux": out.aux_loss.detach(),
                              "stats": out.stats._asdict(), "ep_ranks": layer.ep_ranks,
                              "ep_rank": ep_rank}
    if case.backward:
        ((out.output * cotangent(case, rank)).sum() + out.aux_loss).backward()
        if case.reduce:
            reduce_gradients(module, expert_groups(cfg.ep_size))
        result["grads"] = {reference_name(n): p.grad.clone() for n, p in layer.named_parameters()}
        result["grads"]["x"] = x.grad if x.grad is not None else torch.zeros_like(x)
    return result


def run_cases(rank: int, world_size: int, cases: list[Case]) -> list[dict[str, Any]]:
    """Spawned worker: every case in order, on every rank."""
    return [run_case(rank, case) for case in cases]


def expected_capacity(case: Case, group: tuple[int, ...]) -> int:
    """The capacity the EP ``group`` must agree on, from every rank's token count (or loads)."""
    cfg = case.config()
    if cfg.capacity is not None:
        return cfg.capacity
    if cfg.max_tokens_per_rank is not None:  # dropless with a static bound: the bound
        return cfg.max_tokens_per_rank
    if cfg.dropless:  # the group's largest token count
        return max(max(case.num_tokens(r) for r in group), 1)
    if not cfg.drop_tokens:
        loads = [reference_rank(case, r, None, backward=False)["count"].max() for r in group]
        return max(int(max(loads)), 1)
    factor = cfg.eval_capacity_factor if case.eval else cfg.capacity_factor
    return capacity_formula(max(case.num_tokens(r) for r in group), cfg, factor)


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert_close(actual.double(), expected.double(), **TOLERANCE,
                 msg=lambda m: f"{what}: {m}")


def _check_grads(case: Case, rank: int, res: dict[str, Any], refs: dict[int, dict], against: str) -> None:
    """``res``'s gradients against the reference gradients of the ranks that feed them."""
    where, world = f"{case.name} rank {rank} vs {against}", case.world_size
    local = case.config().num_local_experts
    group = case.ep_group_of(rank)
    grads = res["grads"]
    _close(grads["x"], refs[rank]["grads"]["x"], f"{where}: x.grad")
    # after reduce_gradients: the gradient of the mean loss over the world
    contributors, scale = (range(world), 1.0 / world) if case.reduce else (group, 1.0)
    router = (sum(refs[r]["grads"]["router"] for r in contributors) if case.reduce
              else refs[rank]["grads"]["router"])
    _close(grads["router"], router * scale, f"{where}: router grad")
    part = slice(res["ep_rank"] * local, (res["ep_rank"] + 1) * local)
    for name in ("w1", "w2", "w3", "b1", "b2"):
        if name not in refs[rank]["grads"]:
            assert name not in grads, f"{where}: unexpected {name}"
            continue
        expected = sum(refs[r]["grads"][name][part] for r in contributors) * scale
        _close(grads[name], expected, f"{where}: {name} grad")


def _check_wire(case: Case, stats: dict[str, Any], count_E: list[int], capacity: int, ep_rank: int,
                where: str) -> None:
    """``wire_bytes`` and ``padding_fraction`` from the reference counts: the dispatch sends the
    ``[E_local, C, D]`` fp32 blocks of the other EP ranks, whose filled slots are ``min(count, C)``."""
    local = case.num_experts // case.ep_size
    fill = [min(count, capacity) for count in count_E]
    sent_slots = (case.ep_size - 1) * local * capacity
    assert int(stats["wire_bytes"]) == sent_slots * case.d_model * 4, f"{where}: wire_bytes"
    if sent_slots:
        want = 1 - (sum(fill) - sum(fill[ep_rank * local:(ep_rank + 1) * local])) / sent_slots
    else:
        want = 1 - sum(fill) / (case.num_experts * capacity)
    assert abs(float(stats["padding_fraction"]) - want) < 1e-6, f"{where}: padding_fraction"


def check_case(case: Case, results: list[dict[str, Any]], compare_ep1_layer: bool = True) -> dict:
    """Assert every rank's output, stats and gradients against the single-process references.

    Expert gradients (before ``reduce_gradients``) on EP rank ``q`` equal the sum over the EP
    group's ranks of the reference gradients of ``q``'s slice; the router's equal the rank's own.
    After ``reduce_gradients`` both equal the gradient of the mean loss over all ranks.

    Returns ``{rank: (capacity, reference)}`` for extra checks.
    """
    world = case.world_size
    capacity_of = {r: expected_capacity(case, g) for g in case.ep_groups() for r in g}
    refs = {r: reference_rank(case, r, capacity_of[r], backward=case.backward) for r in range(world)}
    ep1 = {r: ep1_layer_run(case, r, capacity_of[r]) for r in range(world)} if compare_ep1_layer else {}
    for rank, (res, ref) in enumerate(zip(results, refs.values())):
        where = f"{case.name} rank {rank}"
        group = case.ep_group_of(rank)
        assert res["ep_ranks"] == group, where
        stats = res["stats"]
        assert int(stats["capacity"]) == capacity_of[rank], f"{where}: capacity"
        if case.nan_rank == rank:
            assert int(stats["nonfinite_tokens"]) == 1, where
            continue
        assert int(stats["nonfinite_tokens"]) == 0, where
        assert res["y"].shape == ref["y"].shape, where
        _close(res["y"], ref["y"], f"{where}: output")
        _close(res["aux"], ref["aux"], f"{where}: aux_loss")
        assert torch.equal(stats["tokens_per_expert"].long(), ref["count"]), f"{where}: tokens_per_expert"
        dropped = ref["dropped"] / max(ref["dispatched"], 1)
        assert abs(float(stats["dropped_fraction"]) - dropped) < 1e-6, f"{where}: dropped_fraction"
        _check_wire(case, stats, ref["count"].tolist(), capacity_of[rank], group.index(rank), where)
        if compare_ep1_layer:
            _close(res["y"], ep1[rank]["y"], f"{where}: output vs EP=1 layer")
        if case.backward:
            _check_grads(case, rank, res, refs, "float64 loop")
            if compare_ep1_layer:
                _check_grads(case, rank, res, ep1, "EP=1 layer")
    return {r: (capacity_of[r], refs[r]) for r in range(world)}
