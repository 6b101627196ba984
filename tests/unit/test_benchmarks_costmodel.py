"""The alpha-beta cost model against closed forms, and its calibration on synthetic runs."""

from __future__ import annotations

from dataclasses import replace

import pytest

from benchmarks.costmodel import Cluster, all_to_all_s, calibrate, predict, step_s
from benchmarks.shapes import SHAPES, RunSpec

CLUSTER = Cluster(gpus_per_node=8, intra_alpha_s=2e-6, intra_bytes_per_s=100e9, inter_alpha_s=8e-6,
                  inter_bytes_per_s=10e9, flops_per_s=1e14, memory_bytes_per_s=1e12, local_passes=10)


def test_all_to_all_is_free_on_one_rank():
    assert all_to_all_s(1e9, 1, CLUSTER) == 0.0


def test_all_to_all_inside_a_node_is_latency_plus_bandwidth_over_the_peers():
    # 4 ranks: 3 peers, each sent a quarter of the buffer over NVLink
    assert all_to_all_s(4e6, 4, CLUSTER) == pytest.approx(3 * (2e-6 + 1e6 / 100e9))


def test_all_to_all_across_nodes_is_bound_by_the_slower_link():
    # 32 ranks, 8 per node: 7 peers on NVLink, 24 over the network
    chunk = 32e6 / 32
    expected = max(7 * (2e-6 + chunk / 100e9), 24 * (8e-6 + chunk / 10e9))
    assert all_to_all_s(32e6, 32, CLUSTER) == pytest.approx(expected)


def test_step_is_experts_plus_four_all_to_alls_plus_local_work():
    spec = RunSpec("mixtral", SHAPES["mixtral"], dtype="bf16", ep_size=8)
    parts = step_s(spec, 8, CLUSTER)
    shape = spec.shape
    assert parts["expert_math"] == pytest.approx(spec.expert_flops(8) / 1e14)
    assert spec.expert_flops(8) == 6 * 3 * 8 * spec.capacity() * shape.d_model * shape.d_ff
    assert parts["all_to_all"] == pytest.approx(4 * all_to_all_s(spec.a2a_bytes(), 8, CLUSTER))
    assert parts["local"] == pytest.approx(10 * shape.tokens * 2 * shape.d_model * 2 / 1e12)
    assert parts["step"] == pytest.approx(parts["expert_math"] + parts["all_to_all"] + parts["local"])
    assert parts["efficiency"] == pytest.approx(parts["expert_math"] / parts["step"])


def _record(spec: RunSpec, ranks: int, cluster: Cluster) -> dict:
    """A result record whose timings the model produces exactly."""
    parts = step_s(spec, ranks, cluster)
    local = parts["local"] * 1e3
    return {"kind": "layer", "copy_gbps": cluster.memory_bytes_per_s / 1e9,
            "config": {**spec.describe(), "ranks": ranks},
            "timings_ms": {"floor": {"matmuls": {"median": parts["expert_math"] * 1e3},
                                     "all_to_all": {"median": parts["all_to_all"] * 1e3}},
                           "layer": {"total": {"median": parts["step"] * 1e3}}},
            "excess_over_floor_ms": {"route+plan+pack+combine": local}}


def test_calibration_recovers_the_parameters_that_made_the_runs():
    truth = replace(CLUSTER, gpus_per_node=4)
    specs = [RunSpec("mixtral-small", replace(SHAPES["mixtral-small"], tokens=t), ep_size=r)
             for t, r in ((512, 2), (2048, 2), (1024, 4), (4096, 4), (256, 1))]
    fitted, checks = calibrate([_record(s, s.ep_size, truth) for s in specs], Cluster())
    assert fitted.intra_alpha_s == pytest.approx(truth.intra_alpha_s, rel=1e-6)
    assert fitted.intra_bytes_per_s == pytest.approx(truth.intra_bytes_per_s, rel=1e-6)
    assert fitted.flops_per_s == pytest.approx(truth.flops_per_s)
    assert fitted.local_passes == pytest.approx(truth.local_passes)
    assert all(abs(c["error"]) < 1e-6 for c in checks)


def test_experts_cap_the_ep_size_unless_they_grow_with_the_gpus():
    fixed = predict(["mixtral"], [8, 64], CLUSTER, "bf16", None, None)
    assert [r["ep_size"] for r in fixed] == [8, 8] and fixed[0]["step"] == fixed[1]["step"]
    grown = predict(["switch"], [8, 64], CLUSTER, "bf16", None, 1)
    assert [(r["ep_size"], r["experts"]) for r in grown] == [(8, 8), (64, 64)]
    assert grown[1]["all_to_all"] > grown[0]["all_to_all"]
