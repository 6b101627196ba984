"""Our DeepSpeed ``MoE`` against ``deepspeed.moe.layer.MoE`` on the same weights (gloo, CPU)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

pytest.importorskip("deepspeed")

from tests.harness import run_ranks  # noqa: E402
from tests.integration import deepspeed_helpers as helpers  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

TOKENS = 16  # per sequence; 4 sequences -> S = 64 tokens per rank, E = 4: capacity 16 * k
BASE = {"capacity_factor": 1.0, "min_capacity": 0}
EVAL_FACTORS = (0.5, 2.0)  # eval_capacity_factor: capacity half / twice the training one
CASES = [
    {"name": "top1_drop", "kwargs": dict(BASE, k=1, use_rts=False)},
    {"name": "top1_nodrop", "kwargs": dict(BASE, k=1, use_rts=False, drop_tokens=False)},
    {"name": "top2_drop", "kwargs": dict(BASE, k=2, top2_2nd_expert_sampling=False)},
    {"name": "top2_nodrop", "kwargs": dict(BASE, k=2, top2_2nd_expert_sampling=False, drop_tokens=False)},
    {"name": "top3_drop", "kwargs": dict(BASE, k=3)},
    {"name": "top2_low_capacity", "kwargs": dict(BASE, k=2, capacity_factor=0.5,
                                                 top2_2nd_expert_sampling=False)},
    # sampled variants draw exactly as DeepSpeed does: equal seeds give equal samples
    {"name": "top1_rts_same_seed", "kwargs": dict(BASE, k=1)},
    {"name": "top1_rsample_same_seed", "kwargs": dict(BASE, k=1, noisy_gate_policy="RSample")},
    {"name": "top2_sampled_same_seed", "kwargs": dict(BASE, k=2)},
    {"name": "top2_jitter_same_seed", "kwargs": dict(BASE, k=2, noisy_gate_policy="Jitter")},
    # expert kinds: stacked (MLP without bias, SwiGLU) and the generic fallback
    {"name": "mlp_nobias_relu", "expert": "mlp_nobias_relu", "kwargs": dict(BASE, k=2)},
    {"name": "swiglu", "expert": "swiglu", "kwargs": dict(BASE, k=2)},
    {"name": "generic_expert", "expert": "residual", "kwargs": dict(BASE, k=2)},
    {"name": "generic_forced", "kwargs": dict(BASE, k=1), "extra": {"expert_impl": "generic"}},
    {"name": "residual_moe", "kwargs": dict(BASE, k=2, use_residual=True)},
    # the layer's own communication options change no number: chunked overlap, hierarchical all-to-all
    {"name": "top2_chunked_hierarchical", "kwargs": dict(BASE, k=2, top2_2nd_expert_sampling=False),
     "extra": {"num_chunks": 3, "a2a": "hierarchical", "ranks_per_node": 1}},
    {"name": "swiglu_chunked", "expert": "swiglu", "kwargs": dict(BASE, k=2), "extra": {"num_chunks": 2}},
    # .eval(): capacity from eval_capacity_factor (capacity_factor stays 1), sampling as DeepSpeed's
    # eval does it (no RSample noise nor jitter; random token selection and the Gumbel second
    # expert still drawn)
    *({"name": f"eval_top{k}_capacity_x{factor}", "eval": True,
       "kwargs": dict(BASE, k=k, use_rts=False, top2_2nd_expert_sampling=False, eval_capacity_factor=factor)}
      for k in (1, 2) for factor in EVAL_FACTORS),
    {"name": "eval_top1_rsample_rts_same_seed", "eval": True,
     "kwargs": dict(BASE, k=1, noisy_gate_policy="RSample", eval_capacity_factor=0.5)},
    {"name": "eval_top2_sampled_jitter_same_seed", "eval": True,
     "kwargs": dict(BASE, k=2, noisy_gate_policy="Jitter", eval_capacity_factor=0.5)},
    {"name": "eval_top3", "eval": True, "kwargs": dict(BASE, k=3, eval_capacity_factor=0.5)},
]
NAMES = [case["name"] for case in CASES]


@pytest.fixture(scope="module", params=[1, 2], ids=["ep1", "ep2"])
def parity(request) -> dict[str, list[dict]]:
    """Results of every case on every rank, at ep = world = 1 and 2 (one spawn per ep)."""
    for case in CASES:
        case.setdefault("tokens", TOKENS)
    per_rank = run_ranks(helpers.parity_worker, request.param, CASES, timeout=240)
    return {name: [rank_results[i] for rank_results in per_rank] for i, name in enumerate(NAMES)}


def _assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("name", NAMES)
def test_same_outputs_aux_loss_counts_and_gradients_as_deepspeed(parity, name):
    for rank, result in enumerate(parity[name]):
        ours, ref = result["ours"], result["deepspeed"]
        _assert_close(ours["y"], ref["y"], f"rank {rank} output")
        _assert_close(ours["l_aux"], ref["l_aux"], f"rank {rank} l_aux")
        assert torch.equal(ours["exp_counts"], ref["exp_counts"]), f"rank {rank} exp_counts"
        _assert_close(ours["x_grad"], ref["x_grad"], f"rank {rank} input gradient")
        assert ours["grads"].keys() == ref["grads"].keys()
        for key, grad in ref["grads"].items():
            _assert_close(ours["grads"][key], grad, f"rank {rank} gradient of {key}")


def test_the_drop_in_builds_the_hierarchy_once_deepspeed_gives_it_an_ep_group(parity):
    ranks = parity["top2_chunked_hierarchical"]
    assert all(r["hierarchical"] for r in ranks) == (len(ranks) > 1)  # ep 1: no all-to-all, no hierarchy


@pytest.mark.parametrize("name,k", [("top1_drop", 1), ("top2_drop", 2), ("top2_low_capacity", 1)])
def test_drop_cases_really_drop_tokens(parity, name, k):
    capacity = 64 // 4 * k  # ceil(S / E * cf * k) with cf = 1 (0.5 * 2 for the low-capacity case)
    assert any(int(r["deepspeed"]["exp_counts"].max()) > capacity for r in parity[name])


@pytest.mark.parametrize("name", [case["name"] for case in CASES if case.get("eval")])
def test_eval_cases_hit_a_load_where_eval_and_training_capacities_keep_different_tokens(parity, name):
    """Some expert gets more choices than the smaller of the two capacities, so routing with the
    training capacity in eval would keep a different number of them (and change the output)."""
    case = CASES[NAMES.index(name)]
    k, factor = case["kwargs"]["k"], case["kwargs"]["eval_capacity_factor"]
    per_expert = 64 // 4 * k  # ceil(S / E * k) tokens at factor 1
    smaller = min(per_expert, math.ceil(per_expert * factor))
    assert any(int(r["deepspeed"]["exp_counts"].max()) > smaller for r in parity[name])


def test_sampled_variants_match_deepspeed_statistics():
    """Independent seeds: the mean expert load and kept-token fraction agree with DeepSpeed's."""
    options = [dict(k=1, capacity_factor=1.0, min_capacity=0),  # random token selection
               dict(k=2, capacity_factor=1.0, min_capacity=0)]  # Gumbel second expert
    for stats in run_ranks(helpers.sampled_stats_worker, 1, options, 200, timeout=180)[0]:
        ours, ref = stats["ours"], stats["deepspeed"]
        spread = ref["counts"].std(dim=0) / 200 ** 0.5
        assert (ours["counts"].mean(0) - ref["counts"].mean(0)).abs().le(5 * spread + 0.5).all()
        assert abs(float(ours["kept"].mean() - ref["kept"].mean())) < 0.02


def test_import_expert_parallel_does_not_import_deepspeed():
    code = "import sys, expert_parallel; assert 'deepspeed' not in sys.modules, 'deepspeed imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=helpers.__file__.rsplit("/tests/", 1)[0])
