"""Published all-to-all numbers, the bytes behind them, and the cost model held against them.

DeepEP (``deepseek-ai/DeepEP``, README "Performance", now ``docs/legacy.md`` for its V1 kernels)
publishes two tables measured on H800 GPUs (NVLink, "~160 GB/s maximum"), each with one CX7
400 Gb/s InfiniBand NIC ("~50 GB/s maximum"), 7168 hidden, top-8 experts, FP8 dispatch and BF16
combine. It reports a *bandwidth*, so the time is ``bytes / bandwidth`` with DeepEP's own byte
count, which we reproduce from its tests:

- normal kernels (``tests/test_internode.py``, ``test_intranode.py``; 4096 tokens per rank, 256
  experts, node-limited routing to ``min(4, nodes)`` nodes): the NVLink figure counts the tokens a
  rank *receives*, once per (token, rank) however many of the rank's experts it picked, the RDMA
  figure the tokens a rank *sends*, once per (token, node) **including its own node**; a token is
  ``7168 * (1 + 4/128)`` bytes in FP8 (with its scales) and ``7168 * 2`` in BF16. So these are
  "logical" bandwidths: a share of the counted bytes never leaves the GPU or the node.
- low-latency kernels (``tests/test_low_latency.py``; 128 tokens per rank, 10 of the 1024
  (token, choice) pairs masked): one copy per (token, choice), ``7168 + 7168/128*4 + 16`` bytes in
  FP8 and ``7168 * 2`` in BF16, local choices included.

The expected distinct ranks and nodes per token under uniform routing are closed forms
(``expected_bins``). The model's terms for each row say which bytes really cross which link.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Callable

import numpy as np

HIDDEN, TOPK, EXPERTS = 7168, 8, 256
FP8_NORMAL = HIDDEN * (1 + 4 / 128)  # bytes per token, FP8 with per-128 scales (test_internode.py)
FP8_LOW_LATENCY = HIDDEN + HIDDEN / 128 * 4 + 16  # test_low_latency.py
BF16 = HIDDEN * 2
DEEPEP = "deepseek-ai/DeepEP README.md (V1 tables, now docs/legacy.md), H800 + CX7 400 Gb/s IB"

# (kind, EP size, dispatch GB/s, combine GB/s[, dispatch us, combine us]) exactly as published
NORMAL = [("intranode", 8, 153, 158), ("internode", 16, 43, 43), ("internode", 32, 58, 57),
          ("internode", 64, 51, 50)]
LOW_LATENCY = [(8, 77, 98, 114, 127), (16, 118, 63, 195, 74), (32, 155, 48, 273, 53),
               (64, 173, 43, 314, 46), (128, 192, 39, 369, 39), (256, 194, 39, 360, 40)]

# DeepSeek-V3 technical report (arXiv 2412.19437): 2,048 H800 GPUs (8 per node, NVLink inside,
# InfiniBand across), 64-way EP over 8 nodes, "each trillion tokens requires only 180K H800 GPU
# hours"; shape from its inference/configs/config_671B.json (61 layers of which the first 3 are
# dense, so 58 MoE; dim 7168; 256 routed experts + 1 shared of moe_inter_dim 2048; top-8; 8 groups,
# routed to <= 4 of them, i.e. <= 4 nodes).
DEEPSEEK_V3 = {"source": "DeepSeek-V3 technical report (arXiv 2412.19437), Table 1 and sections 3.1-3.2",
               "gpus": 2048, "ep": 64, "nodes_per_ep_group": 8, "gpu_hours_per_trillion_tokens": 180e3,
               "moe_layers": 58, "d_model": 7168, "d_ff": 2048, "experts": 256, "shared_experts": 1,
               "top_k": 8, "max_nodes_per_token": 4}

Terms = list[dict[str, float]]  # branches; the time is the slowest branch's sum of coef * constant
CONSTANTS: dict[str, Callable[[Any], float]] = {
    "intra_alpha": lambda c: c.intra_alpha_s, "inter_alpha": lambda c: c.inter_alpha_s,
    "peer": lambda c: c.peer_s, "intra_s_per_byte": lambda c: 1 / c.intra_bytes_per_s,
    "inter_s_per_byte": lambda c: 1 / c.inter_bytes_per_s}
FIELDS = {"intra_alpha": "intra_alpha_s", "inter_alpha": "inter_alpha_s", "peer": "peer_s",
          "intra_s_per_byte": "intra_bytes_per_s", "inter_s_per_byte": "inter_bytes_per_s"}


def evaluate(terms: Terms, cluster: Any) -> float:
    """Seconds: the slowest branch of ``terms`` under ``cluster``'s constants (0 for no branch)."""
    return max((sum(coef * CONSTANTS[name](cluster) for name, coef in branch.items()) for branch in terms),
               default=0.0)


def expected_bins(picks: int, pool: int, bins: int) -> float:
    """Expected distinct bins hit by ``picks`` experts drawn without replacement from ``pool``
    experts split evenly into ``bins`` bins (ranks or nodes)."""
    return bins * (1 - math.comb(pool - pool // bins, picks) / math.comb(pool, picks))


def link(prefix: str, peers: int, nbytes: float) -> dict[str, float]:
    """One link's branch: its fixed latency, ``peers`` messages and ``nbytes`` on it."""
    return {f"{prefix}_alpha": 1.0, "peer": float(peers), f"{prefix}_s_per_byte": float(nbytes)}


def _normal_rows(gpus_per_node: int = 8) -> list[dict[str, Any]]:
    rows = []
    for kind, ep, dispatch_gbps, combine_gbps in NORMAL:
        nodes = max(ep // gpus_per_node, 1)
        allowed = min(4, nodes)  # node-limited routing: the top-4 node groups
        pool = EXPERTS * allowed // nodes
        ranks = expected_bins(TOPK, pool, allowed * min(ep, gpus_per_node))
        node_hits = expected_bins(TOPK, pool, allowed) if nodes > 1 else 1.0
        local = min(ep, gpus_per_node)
        for op, gbps, per_token in (("dispatch", dispatch_gbps, FP8_NORMAL), ("combine", combine_gbps, BF16)):
            counted = 4096 * (node_hits if nodes > 1 else ranks) * per_token
            nvlink = 4096 * ranks * per_token * (local - 1) / local  # forwarded to the other local GPUs
            terms = [link("intra", local - 1, nvlink)]
            if nodes > 1:  # RDMA to the other nodes, pipelined with the NVLink forwarding
                terms.append(link("inter", nodes - 1, 4096 * node_hits * per_token * (nodes - 1) / nodes))
            rows.append({"table": "normal", "kind": kind, "op": op, "ep": ep, "published_gbps": gbps,
                         "counted_bytes": counted, "published_us": counted / (gbps * 1e9) * 1e6, "terms": terms})
    return rows


def _low_latency_rows(gpus_per_node: int = 8) -> list[dict[str, Any]]:
    rows, choices = [], 128 * TOPK - 10
    for ep, dispatch_us, dispatch_gbps, combine_us, combine_gbps in LOW_LATENCY:
        local = min(ep, gpus_per_node)
        for op, us, gbps, per_token in (("dispatch", dispatch_us, dispatch_gbps, FP8_LOW_LATENCY),
                                        ("combine", combine_us, combine_gbps, BF16)):
            counted = choices * per_token
            terms = [link("intra", local - 1, counted * (local - 1) / ep)]
            if ep > local:
                terms.append(link("inter", ep - local, counted * (ep - local) / ep))
            rows.append({"table": "low-latency", "kind": "RDMA", "op": op, "ep": ep, "published_gbps": gbps,
                         "counted_bytes": counted, "published_us": us, "terms": terms})
    return rows


def published_rows() -> list[dict[str, Any]]:
    """Every published DeepEP row with its time (us), DeepEP's byte count and the model's terms."""
    return _normal_rows() + _low_latency_rows()


def fit(rows: list[dict[str, Any]], base: Any, names: tuple[str, ...], rounds: int = 20) -> Any:
    """``base`` with the constants ``names`` fitted to ``rows`` (least squares on the relative
    error): each round takes every row's slowest branch under the current constants, solves the
    linear system in ``names`` (the other constants fixed), and drops a constant that comes out
    negative (keeping its base value)."""
    cluster, free = base, list(names)
    for _ in range(rounds):
        a, b = [], []
        for row in rows:
            branch = max(row["terms"], key=lambda br: evaluate([br], cluster))
            fixed = sum(c * CONSTANTS[n](cluster) for n, c in branch.items() if n not in free)
            scale = row["published_us"] * 1e-6
            a.append([branch.get(n, 0.0) / scale for n in free])
            b.append((scale - fixed) / scale)
        solution = np.linalg.lstsq(np.array(a), np.array(b), rcond=None)[0]
        negative = [n for n, v in zip(free, solution) if v <= 0]
        values = {n: v for n, v in zip(free, solution) if v > 0}
        updated = replace(cluster, **{FIELDS[n]: (1 / v if n.endswith("per_byte") else v) for n, v in values.items()})
        free = [n for n in free if n not in negative]
        if updated == cluster and not negative:
            break
        cluster = updated
    return cluster


def compare(rows: list[dict[str, Any]], clusters: dict[str, Any]) -> list[dict[str, Any]]:
    """Per row: published us, and for each named cluster the model's us and relative error."""
    out = []
    for row in rows:
        entry = {k: v for k, v in row.items() if k != "terms"}
        for name, cluster in clusters.items():
            us = evaluate(row["terms"], cluster) * 1e6
            entry[f"{name}_us"], entry[f"{name}_error"] = us, us / row["published_us"] - 1
        out.append(entry)
    return out
