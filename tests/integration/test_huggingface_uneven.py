"""Converted transformers models at EP 2 whose ranks hold different batch sizes and sequence
lengths (a rank with no tokens included), against the unconverted model run single-process on
each rank's batch: logits, router logits, the model's aux loss, gradients. The default (dropless,
the buffer size agreed per batch) and ``drop_tokens=False``. Tiny random models, no hub access."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from expert_parallel.integrations.huggingface import ExpertParallelBlock, convert  # noqa: E402
from tests.harness import run_ranks  # noqa: E402
from tests.integration.test_huggingface import (  # noqa: E402
    SIZES,
    assert_same_step,
    hf_grads,
    run,
    sharded_keys,
    tiny_model,
)

NAMES = ("mixtral", "deepseek_v3")  # softmax top-k; sigmoid group-limited with a bias and shared experts
MODES = {"dropless": {}, "drop_tokens=False": {"drop_tokens": False}}
# per rank: [batch, seq]; a rank with batch 0 runs its converted blocks on [0, seq, D] (transformers'
# attention cannot take an empty batch), as a rank out of data does for the collectives
SHAPES = {"ragged": ((2, 8), (3, 5)), "empty": ((2, 6), (0, 6))}


def ids(shape: tuple[int, int], rank: int) -> torch.Tensor:
    return torch.randint(0, SIZES.vocab_size, shape, generator=torch.Generator().manual_seed(20 + rank))


def blocks_only(model: torch.nn.Module, seq: int, keys: set[str]) -> dict:
    """A rank without tokens: every converted block, in order, on ``[0, seq, D]`` (forward and
    backward: the same collectives as the other rank's model), and its gradients under the HF keys."""
    model.zero_grad()
    hidden = torch.zeros(0, seq, SIZES.d_model, requires_grad=True)
    shapes = []
    for block in (module for module in model.modules() if isinstance(module, ExpertParallelBlock)):
        hidden = block(hidden)
        shapes.append(tuple(hidden.shape))
    hidden.sum().backward()
    return {"shapes": shapes, "grads": hf_grads(model, keys)}


def uneven_worker(rank: int, world: int) -> dict:
    results = {}
    for name in NAMES:
        reference = tiny_model(name)
        keys = {key for key, _ in reference.named_parameters()}
        for case, shapes in SHAPES.items():
            wants = [run(reference, ids(shape, r), keys) if shape[0] else None for r, shape in enumerate(shapes)]
            for mode, overrides in MODES.items():
                model = convert(copy.deepcopy(reference), ep_size=2, **overrides)
                batch, seq = shapes[rank]
                got = run(model, ids(shapes[rank], rank), keys) if batch else blocks_only(model, seq, keys)
                results[name, case, mode] = {"wants": wants, "got": got}
    return results


@pytest.fixture(scope="module")
def uneven() -> list[dict]:
    return run_ranks(uneven_worker, 2, timeout=240)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("case", list(SHAPES))
@pytest.mark.parametrize("name", NAMES)
def test_ranks_with_different_shapes_compute_what_transformers_computes(uneven, name, case, mode):
    """An expert's gradient (gathered from its owner) holds every rank's tokens; dense gradients
    are this rank's (0 on a rank without tokens, whose blocks return ``[0, seq, D]``)."""
    for rank, results in enumerate(uneven):
        result = results[name, case, mode]
        wants = [want for want in result["wants"] if want is not None]
        expert_grads = {key: sum(want["grads"][key] for want in wants)
                        for key in wants[0]["grads"] if key.endswith(sharded_keys(name))}
        want = result["wants"][rank]
        if want is None:
            seq = SHAPES[case][rank][1]
            assert result["got"]["shapes"] == [(0, seq, SIZES.d_model)] * 2
            for key, grad in result["got"]["grads"].items():
                torch.testing.assert_close(grad, expert_grads.get(key, torch.zeros_like(grad)), rtol=1e-4,
                                           atol=1e-5, msg=key)
        else:
            assert_same_step(result["got"], want, {**want["grads"], **expert_grads})
