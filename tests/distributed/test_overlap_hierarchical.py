"""Chunked overlap (``num_chunks``) and the hierarchical all-to-all (``a2a="hierarchical"``).

One spawn of 4 gloo ranks (2 "nodes" x 2 with ``ranks_per_node=2``) runs everything:

* the hierarchical all-to-all alone, blocking and started asynchronously, forward and backward,
  on buffers whose every element encodes (source rank, destination rank, slot), against the
  closed form of an all-to-all (and the flat one);
* GShard/Switch layers with chunks and the hierarchy against the float64 loop and the EP=1 layer
  (``scenarios.check_case``): EP 2 and 4, uneven batches, a rank with no tokens, capacities not
  divisible by the chunks, filled and padded expert compute, a deep-copied layer;
* every router of the registry, chunked (2, 4 chunks) and hierarchical with 3 chunks, against
  the plain layer (one chunk, flat) with the same weights, tokens and seeds on the same rank:
  outputs, aux losses and the gradients of the input and every parameter;
* a fixed-capacity hierarchical chunked layer reads nothing back to the host.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.testing import assert_close

from expert_parallel import MoEConfig, MoELayer
from expert_parallel.comm import Hierarchy, NodeRanks, all_to_all, all_to_all_start, expert_groups
from expert_parallel.routing.registry import ROUTERS
from tests.harness import run_ranks
from tests.unit.test_sync_free import host_reads_forbidden

from .reference import Case
from .scenarios import check_case, run_case
from .test_dispatch_routing import CAPACITY, _codes

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

WORLD = 4
NODE = dict(a2a="hierarchical", ranks_per_node=2)
SLOTS = CAPACITY  # coded buffers [R(dest), SLOTS, 3]: (source, destination, slot), as for dispatch

CASES = [
    Case("ep4-hierarchical-chunks3-gshard-empty-rank", 4, ((7,), (0,), (11,), (5,)), num_experts=8,
         options=dict(second_policy="all", capacity_factor=1.5, num_chunks=3, **NODE), seed=51),
    Case("ep4-hierarchical-padded-switch", 4, ((6,), (9,), (0,), (4,)),
         options=dict(router="switch", capacity_factor=1.5, expert_compute="padded", **NODE), seed=52),
    Case("ep2-chunks4-capacity5-swiglu-bias", 2, ((9,), (0,), (12,), (3,)),
         options=dict(second_policy="all", capacity=5, num_chunks=4, expert="swiglu", expert_bias=True),
         seed=53),
    Case("ep2-chunks2-padded-hierarchical-gshard-random-deepcopy", 2, ((8,), (13,), (4,), (0,)),
         options=dict(capacity_factor=0.75, num_chunks=2, expert_compute="padded", **NODE), seed=54,
         build="deepcopy"),
]

# every router of the registry, with what it needs; the variants run against the plain layer
ROUTER_OPTIONS = {"gshard": dict(second_policy="random"), "switch": {}, "topk": dict(top_k=3, normalize_topk=True),
                  "noisy_topk": dict(top_k=2, load_loss_weight=0.1), "soft": {},
                  "expert_choice": dict(capacity_factor=1.0), "deepspeed": dict(top_k=2, second_policy="all")}
# (the blocking hierarchical exchange alone is router-agnostic: CASES cover it)
VARIANTS = {"chunks2": dict(num_chunks=2), "chunks4": dict(num_chunks=4),
            "hierarchical-chunks3": dict(num_chunks=3, **NODE)}
ROUTER_TOKENS = (10, 0, 7, 13)
LAYOUTS = ((2, "filled"), (2, "padded"), (4, "filled"), (4, "padded"))  # (EP size, expert compute)


def _a2a_checks(rank: int) -> dict[str, Any]:
    """The hierarchical all-to-all for 2, 1 and 4 ranks per node, and the flat one: outputs of
    the blocking and started versions, and input gradients from a received-side coded upstream."""
    flat = expert_groups(WORLD).ep_group
    ep_ranks = tuple(range(WORLD))
    out: dict[str, Any] = {}
    for name, group in [("flat", flat)] + [(f"node{p}", NodeRanks.build(ep_ranks, p).groups()) for p in (2, 1, 4)]:
        x = _codes(rank, WORLD).requires_grad_()
        y = all_to_all(x, group)
        upstream = _codes(rank, WORLD) * 100.0  # received block r gets (me, r, slot) * 100
        y.backward(upstream)
        x2 = _codes(rank, WORLD).requires_grad_()
        pending = [all_to_all_start(x2 * (k + 1), group) for k in range(2)]  # two in flight at once
        y2 = [p.wait() for p in pending]
        (y2[0] + y2[1]).backward(upstream)
        out[name] = {"y": y.detach(), "grad": x.grad, "started": [t.detach() for t in y2], "started_grad": x2.grad,
                     "hierarchy": isinstance(group, Hierarchy)}
    return out


def _router_layers(rank: int) -> dict[str, Any]:
    """Every router x (EP, expert compute) of ``LAYOUTS`` x variant: (plain, variant) results."""
    results: dict[str, Any] = {}
    for router, options in ROUTER_OPTIONS.items():
        for ep_size, compute in LAYOUTS:
            base = Case(f"{router}-ep{ep_size}-{compute}", ep_size, tuple((s,) for s in ROUTER_TOKENS),
                        num_experts=8, d_model=8, d_ff=16, seed=len(results) + 60,
                        options=dict(router=router, expert_compute=compute, **options))
            plain = run_case(rank, base)
            for variant, extra in VARIANTS.items():
                case = Case(base.name, ep_size, base.tokens, num_experts=8, d_model=8, d_ff=16, seed=base.seed,
                            options={**base.options, **extra})
                results[f"{base.name}-{variant}"] = (plain, run_case(rank, case))
    return results


def _host_reads(rank: int) -> dict[str, str]:
    """Fixed-capacity hierarchical chunked layers (filled and padded), forward and backward with
    every host read forbidden (``test_sync_free.host_reads_forbidden``): what raised, per layer."""
    found = {}
    for compute in ("filled", "padded"):
        torch.manual_seed(0)
        layer = MoELayer(MoEConfig(d_model=16, d_ff=32, num_experts=8, ep_size=WORLD, capacity=5, num_chunks=2,
                                   router="topk", top_k=2, expert_compute=compute, **NODE))
        x = torch.randn(3 * rank, 16, requires_grad=True)  # rank 0: no tokens
        try:
            with host_reads_forbidden():
                out = layer(x)
                (out.output.sum() + out.aux_loss).backward()
            found[compute] = ""
        except AssertionError as error:
            found[compute] = str(error)
            dist.barrier()  # the other ranks may wait in a collective: let the test fail, not hang
    return found


def _schedule(rank: int) -> list[str]:
    """The order of a 3-chunk layer's all-to-alls (``"sync"``/``"async"`` as issued) and its
    exchange phase events, forward then backward."""
    log: list[str] = []
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(d_model=16, d_ff=32, num_experts=8, ep_size=WORLD, capacity=6, num_chunks=3,
                               router="topk", top_k=2))
    layer.register_phase_hook(lambda event: log.append(event) if event.split("/")[1] in (
        "dispatch", "experts", "return") else None)
    issue = dist.all_to_all_single

    class Work:  # a handle that logs its wait
        def __init__(self, work: Any) -> None:
            self.work = work

        def wait(self) -> Any:
            log.append("wait")
            return self.work.wait()

    def logged(*args: Any, async_op: bool = False, **kwargs: Any) -> Any:
        log.append("start" if async_op else "blocking")
        work = issue(*args, async_op=async_op, **kwargs)
        return Work(work) if async_op else work

    dist.all_to_all_single = logged
    try:
        out = layer(torch.randn(12, 16, requires_grad=True))
        log.append("backward")
        out.output.sum().backward()
    finally:
        dist.all_to_all_single = issue
    return log


def _worker(rank: int, world_size: int) -> dict[str, Any]:
    return {"a2a": _a2a_checks(rank), "cases": [run_case(rank, case) for case in CASES],
            "routers": _router_layers(rank), "host_reads": _host_reads(rank), "schedule": _schedule(rank)}


@pytest.fixture(scope="module")
def spawned() -> list[dict[str, Any]]:
    return run_ranks(_worker, WORLD, timeout=240)


def test_hierarchical_all_to_all_equals_the_flat_one_forward_and_backward(spawned):
    for rank, res in enumerate(spawned):
        sources = torch.arange(WORLD).view(-1, 1).expand(WORLD, SLOTS).float()
        want = torch.stack([sources, torch.full((WORLD, SLOTS), float(rank)),
                            torch.arange(SLOTS).float().expand(WORLD, SLOTS)], dim=-1)
        # the gradient of sent block d is d's upstream of received block `rank`: (d, rank, slot) * 100
        want_grad = want * 100.0
        for name, got in res["a2a"].items():
            where = f"rank {rank} {name}"
            assert got["hierarchy"] == (name != "flat"), where
            assert torch.equal(got["y"], want), f"{where}: received (source, dest, slot) {got['y'][:, 0].tolist()}"
            assert torch.equal(got["grad"], want_grad), f"{where}: gradient {got['grad'][:, 0].tolist()}"
            assert torch.equal(got["started"][0], want) and torch.equal(got["started"][1], 2 * want), where
            assert torch.equal(got["started_grad"], 3 * want_grad), f"{where}: started gradient"


@pytest.mark.parametrize("index", range(len(CASES)), ids=[case.name for case in CASES])
def test_chunked_and_hierarchical_layers_equal_the_references(spawned, index):
    case = CASES[index]
    check_case(case, [res["cases"][index] for res in spawned])


def test_chunk_exchanges_are_in_flight_while_other_chunks_compute(spawned):
    """Forward: chunk i+1's dispatch is started before chunk i's experts run and waited for after
    them; chunk i's return is started before chunk i+1's experts and waited for at the end. Backward
    (last chunk first): every return gradient is started at once, and chunk i's dispatch gradient
    is in flight while chunk i-1's experts run their backward."""
    dispatch = ["fwd/dispatch", "fwd/experts", "start", "fwd/return"]  # the exchange phases of a chunk
    for rank, res in enumerate(spawned):
        log = res["schedule"]
        split = log.index("backward")
        assert log[:split] == [
            "start", "wait",  # the filled counts, blocking
            "start", "wait", "start", *dispatch,  # chunk 0: dispatch 0 received, dispatch 1 started
            "wait", "start", *dispatch,  # chunk 1: dispatch 1 received, dispatch 2 started
            "wait", *dispatch[:-1], "wait", "wait", "wait", "fwd/return",  # chunk 2, then every return received
        ], f"rank {rank}: {log[:split]}"
        assert log[split + 1:] == [
            "start", "start", "start",  # every return gradient
            "wait", "bwd/return", "bwd/experts", "start",  # chunk 2; its dispatch gradient started
            "wait", "bwd/return", "bwd/experts", "wait", "bwd/dispatch", "start",  # chunk 1 ran meanwhile
            "wait", "bwd/return", "bwd/experts", "wait", "bwd/dispatch", "start",  # chunk 0 ran meanwhile
            "wait", "bwd/dispatch",
        ], f"rank {rank}: {log[split + 1:]}"


def test_fixed_capacity_hierarchical_chunked_layer_reads_nothing_back(spawned):
    for rank, res in enumerate(spawned):
        assert res["host_reads"] == {"filled": "", "padded": ""}, f"rank {rank}: {res['host_reads']}"


def test_cases_split_capacities_unevenly(spawned):
    """The cases cover what their names say: a capacity that the chunks do not divide, and one
    below the chunk count (fewer chunks)."""
    capacities = {case.name: int(spawned[0]["cases"][i]["stats"]["capacity"]) for i, case in enumerate(CASES)}
    assert capacities["ep2-chunks4-capacity5-swiglu-bias"] == 5
    assert capacities["ep4-hierarchical-chunks3-gshard-empty-rank"] % 3
    router_capacities = {int(res["routers"][key][1]["stats"]["capacity"]) for res in spawned for key in res["routers"]}
    assert any(c % 4 for c in router_capacities) and any(c < 4 for c in router_capacities), router_capacities


def _keys() -> list[str]:
    return [f"{router}-ep{ep}-{compute}-{variant}" for router in ROUTER_OPTIONS for ep, compute in LAYOUTS
            for variant in VARIANTS]


@pytest.mark.parametrize("router", list(ROUTERS))
def test_every_router_chunked_and_hierarchical_equals_the_plain_layer(spawned, router):
    keys = [key for key in _keys() if key.startswith(f"{router}-ep")]
    assert keys, f"router {router!r} of the registry has no case here; add it to ROUTER_OPTIONS"
    for rank, res in enumerate(spawned):
        for key in keys:
            plain, got = res["routers"][key]
            where = f"{key} rank {rank}"
            assert int(got["stats"]["capacity"]) == int(plain["stats"]["capacity"]), where
            _close(got["y"], plain["y"], f"{where}: output")
            _close(got["aux"], plain["aux"], f"{where}: aux loss")
            assert plain["grads"].keys() == got["grads"].keys()
            for name, grad in plain["grads"].items():
                _close(got["grads"][name], grad, f"{where}: {name} grad")


def test_plain_layers_have_work_on_every_rank_but_the_empty_one(spawned):
    """Guards the comparison above from comparing zeros: every non-empty rank's output and its
    experts' gradients are non-zero (the empty rank still computes for the others)."""
    for rank, res in enumerate(spawned):
        for key, (plain, _) in res["routers"].items():
            assert plain["grads"]["w1"].abs().sum() > 0, f"{key} rank {rank}"
            if ROUTER_TOKENS[rank]:
                assert plain["y"].abs().sum() > 0, f"{key} rank {rank}"


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert_close(actual, expected, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")
