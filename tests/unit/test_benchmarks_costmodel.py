"""The alpha-beta cost model against closed forms, its calibration on synthetic runs, and the
published DeepEP numbers it is held against."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import pytest

from benchmarks import published
from benchmarks.costmodel import (
    CLUSTERS,
    Cluster,
    all_to_all_s,
    best_chunks,
    calibrate,
    parse_cluster,
    pipeline_s,
    predict,
    step_s,
)
from benchmarks.shapes import SHAPES, RunSpec

CLUSTER = Cluster(gpus_per_node=8, intra_alpha_s=3e-6, intra_bytes_per_s=100e9, inter_alpha_s=8e-6,
                  inter_bytes_per_s=10e9, peer_s=1e-6, flops_per_s=1e14, memory_bytes_per_s=1e12, local_passes=10)
MIXTRAL = RunSpec("mixtral", SHAPES["mixtral"], dtype="bf16", ep_size=8)


def test_all_to_all_is_free_on_one_rank():
    assert all_to_all_s(1e9, 1, CLUSTER) == 0.0
    assert all_to_all_s(1e9, 1, CLUSTER, "hierarchical") == 0.0


def test_all_to_all_inside_a_node_is_latency_plus_peers_plus_bandwidth():
    # 4 ranks: 3 peers, each sent a quarter of the buffer over NVLink
    assert all_to_all_s(4e6, 4, CLUSTER) == pytest.approx(3e-6 + 3 * 1e-6 + 3 * 1e6 / 100e9)


def test_flat_all_to_all_across_nodes_is_bound_by_the_slower_link():
    # 32 ranks, 8 per node: 7 peers on NVLink, 24 over the network, concurrently
    chunk = 32e6 / 32
    expected = max(3e-6 + 7 * (1e-6 + chunk / 100e9), 8e-6 + 24 * (1e-6 + chunk / 10e9))
    assert all_to_all_s(32e6, 32, CLUSTER) == pytest.approx(expected)


@pytest.mark.parametrize("ep", [2, 4, 8])
def test_hierarchical_on_one_node_is_the_flat_all_to_all(ep):
    assert all_to_all_s(8e6, ep, CLUSTER, "hierarchical") == all_to_all_s(8e6, ep, CLUSTER, "flat")


def test_hierarchical_is_a_node_stage_then_one_message_per_node():
    # 32 ranks = 4 nodes of 8: 7 local peers get b/8 each, then 3 nodes get b/4 each
    b = 32e6
    expected = 3e-6 + 7 * 1e-6 + 7 * (b / 8) / 100e9 + 8e-6 + 3 * 1e-6 + 3 * (b / 4) / 10e9
    assert all_to_all_s(b, 32, CLUSTER, "hierarchical") == pytest.approx(expected)


def test_hierarchical_wins_only_when_messages_cost_more_than_the_extra_node_stage():
    b, ep = 1e6, 1024
    chatty = replace(CLUSTER, peer_s=5e-6)
    assert all_to_all_s(b, ep, chatty, "hierarchical") < all_to_all_s(b, ep, chatty, "flat")
    free_messages = replace(CLUSTER, peer_s=0.0)
    assert all_to_all_s(b, ep, free_messages, "hierarchical") > all_to_all_s(b, ep, free_messages, "flat")


def test_unchunked_step_is_experts_plus_four_all_to_alls_plus_local_work():
    parts = step_s(MIXTRAL, 8, CLUSTER)
    shape = MIXTRAL.shape
    assert parts["expert_math"] == pytest.approx(MIXTRAL.expert_flops(8) / 1e14)
    assert MIXTRAL.expert_flops(8) == 6 * 3 * 8 * MIXTRAL.capacity() * shape.d_model * shape.d_ff
    assert parts["all_to_all"] == pytest.approx(4 * all_to_all_s(MIXTRAL.a2a_bytes(), 8, CLUSTER))
    assert parts["local"] == pytest.approx(10 * shape.tokens * 2 * shape.d_model * 2 / 1e12)
    assert parts["step"] == pytest.approx(parts["expert_math"] + parts["all_to_all"] + parts["local"])
    assert parts["efficiency"] == pytest.approx(parts["expert_math"] / parts["step"])


def test_filled_compute_counts_the_routed_rows_not_the_capacity():
    padded, filled = step_s(MIXTRAL, 8, CLUSTER), step_s(MIXTRAL, 8, CLUSTER, filled=True)
    shape = MIXTRAL.shape  # k * S = 8192 filled rows of E * C = 8 * 1280 slots
    assert filled["expert_math"] == pytest.approx(padded["expert_math"] * 8192 / (8 * MIXTRAL.capacity()))
    assert shape.top_k * shape.tokens == 8192 and filled["all_to_all"] == padded["all_to_all"]


def test_chunked_step_pipelines_each_pass_and_pays_the_latency_per_chunk():
    n = 4
    d = 2 * all_to_all_s(MIXTRAL.a2a_bytes() / n, 8, CLUSTER)  # one chunk's dispatch + return
    x = step_s(MIXTRAL, 8, CLUSTER)["expert_math"]

    def one_pass(compute):  # fill with one chunk, then the slower resource per further chunk
        return d + compute / n + (n - 1) * max(d, compute / n)

    parts = step_s(MIXTRAL, 8, CLUSTER, chunks=n)
    assert parts["step"] - parts["local"] == pytest.approx(one_pass(x / 3) + one_pass(2 * x / 3))
    assert parts["all_to_all"] == pytest.approx(2 * n * d)
    assert pipeline_s(1.0, 3.0, 1) == 4.0 and pipeline_s(1.0, 4.0, 4) == pytest.approx(1 + 1 + 3 * 1)


def test_best_chunks_is_the_argmin_of_the_step():
    cases = [(MIXTRAL, 8), (RunSpec("deepseek-v3", SHAPES["deepseek-v3"], dtype="bf16", ep_size=64), 64)]
    for spec, ep in cases:
        n, best = best_chunks(spec, ep, CLUSTER, "flat", True, (1, 2, 4, 8))
        steps = {c: step_s(spec, ep, CLUSTER, "flat", c, True)["step"] for c in (1, 2, 4, 8)}
        assert n == min(steps, key=steps.get) and best["step"] == steps[n]
    # latency alone: chunks only add all-to-all latencies, so one chunk is best
    slow_start = replace(CLUSTER, intra_alpha_s=1.0, inter_alpha_s=1.0)
    assert best_chunks(MIXTRAL, 8, slow_start)[0] == 1


def _hand_record(tokens: int, ep: int) -> dict:
    """A mixtral-small fp32 run on one node whose timings are written from the closed forms by hand
    (not by the model), for a machine of 2 TFLOP/s, 5 GB/s and 2 us per peer message, 20 GB/s
    copies, 6 local passes."""
    d, f, e, k = 256, 896, 8, 2
    c = max(4, math.ceil(k * tokens * 1.25 / e))  # slots per expert
    matmul = 3 * 2 * (e * c) * d * f * 3 / 2e12  # fwd+bwd of 3 swiglu matmuls over E*C rows
    a2a = 4 * (ep - 1) * (2e-6 + (e * c * d * 4 / ep) / 5e9)  # 4 passes, ep-1 peers, E*C*D/ep bytes each
    local = 6 * tokens * k * d * 4 / 20e9
    spec = RunSpec("mixtral-small", replace(SHAPES["mixtral-small"], tokens=tokens), ep_size=ep)
    return {"kind": "layer", "copy_gbps": 20.0, "config": {**spec.describe(), "ranks": ep},
            "timings_ms": {"floor": {"matmuls": {"median": matmul * 1e3}, "all_to_all": {"median": a2a * 1e3}},
                           "layer": {"total": {"median": (matmul + a2a + local) * 1e3}}},
            "excess_over_floor_ms": {"route+plan+pack+combine": local * 1e3}}


def test_calibration_recovers_the_machine_that_hand_written_runs_describe():
    runs = [(512, 2), (2048, 2), (1024, 4), (4096, 4), (256, 1)]
    fitted, checks = calibrate([_hand_record(t, ep) for t, ep in runs], Cluster())
    assert fitted.peer_s == pytest.approx(2e-6, rel=1e-6)
    assert fitted.intra_bytes_per_s == pytest.approx(5e9, rel=1e-6)
    assert fitted.flops_per_s == pytest.approx(2e12)
    assert fitted.memory_bytes_per_s == pytest.approx(20e9) and fitted.local_passes == pytest.approx(6)
    # the calibrated model predicts each run's hand-written total
    assert all(abs(c["error"]) < 1e-6 for c in checks), checks


def test_experts_cap_the_ep_size_unless_they_grow_with_the_gpus():
    fixed = predict(["mixtral"], [8, 64], CLUSTER, "bf16", None, None, (1, 2))
    assert [r["ep_size"] for r in fixed] == [8, 8] and fixed[0]["flat"] == fixed[1]["flat"]
    grown = predict(["switch"], [8, 64], CLUSTER, "bf16", None, 1, (1, 2))
    assert [(r["ep_size"], r["experts"]) for r in grown] == [(8, 8), (64, 64)]
    assert grown[1]["flat"]["all_to_all"] > grown[0]["flat"]["all_to_all"]
    assert grown[0]["flat"]["step"] == grown[0]["hierarchical"]["step"]  # one node


def test_cluster_presets_take_key_value_overrides_and_name_what_is_wrong():
    assert parse_cluster("h800-deepep") == CLUSTERS["h800-deepep"]
    assert parse_cluster("h800,inter_bytes_per_s=25e9,gpus_per_node=4") == replace(
        CLUSTERS["h800"], inter_bytes_per_s=25e9, gpus_per_node=4)
    assert parse_cluster("peer_s=0") == replace(CLUSTERS["h100-8x400g"], peer_s=0.0)
    with pytest.raises(ValueError, match="--cluster 'h900' is unknown; choose one of"):
        parse_cluster("h900")
    with pytest.raises(ValueError, match="'nvlink=1' is not key=value with a key of"):
        parse_cluster("h800,nvlink=1")


def test_expected_bins_is_the_mean_over_every_draw():
    # 3 picks of 8 experts in 4 bins of 2: the average number of distinct bins over all draws
    draws = list(itertools.combinations(range(8), 3))
    mean = sum(len({e // 2 for e in draw}) for draw in draws) / len(draws)
    assert published.expected_bins(3, 8, 4) == pytest.approx(mean)


def test_our_reading_of_deepeps_byte_count_reproduces_its_low_latency_bandwidths():
    # the low-latency table gives both the time and the bandwidth: bytes / time must match
    for row in published.published_rows():
        if row["table"] == "low-latency":
            gbps = row["counted_bytes"] / (row["published_us"] * 1e-6) / 1e9
            assert gbps == pytest.approx(row["published_gbps"], rel=0.04), row


def test_fit_recovers_the_constants_that_made_the_rows():
    truth = replace(CLUSTER, intra_alpha_s=30e-6, inter_alpha_s=20e-6, peer_s=1e-7,
                    intra_bytes_per_s=140e9, inter_bytes_per_s=40e9)
    rows = [dict(row, published_us=published.evaluate(row["terms"], truth) * 1e6)
            for row in published.published_rows() if row["table"] == "low-latency"]
    fitted = published.fit(rows, Cluster(), ("intra_alpha", "inter_alpha", "peer", "intra_s_per_byte",
                                             "inter_s_per_byte"))
    for name in ("intra_alpha_s", "inter_alpha_s", "peer_s", "intra_bytes_per_s", "inter_bytes_per_s"):
        assert getattr(fitted, name) == pytest.approx(getattr(truth, name), rel=1e-6), name


def test_fitted_h800_predicts_deepeps_tables_within_the_documented_errors():
    table = published.compare(published.published_rows(), {"fit": CLUSTERS["h800-deepep"]})
    normal = [abs(r["fit_error"]) for r in table if r["table"] == "normal"]
    low_latency = [abs(r["fit_error"]) for r in table if r["table"] == "low-latency"]
    assert len(normal) == 8 and len(low_latency) == 12
    assert max(normal) < 0.07 and max(low_latency) < 0.18
    assert math.isclose(CLUSTERS["h800-deepep"].inter_bytes_per_s, 44.1e9, rel_tol=0.01)
