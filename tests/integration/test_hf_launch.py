"""Every supported family through the launcher's own build (``--hf-model NAME``): its flags pass,
the tiny model it builds is transformers' own model of that config (same loss), and one training
step runs. In process at EP 1, one case per family; tests/integration/test_launch.py launches two
families end to end on 2 ranks."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from expert_parallel.integrations.huggingface import causal_lm_class  # noqa: E402
from launch.corpus import CharCorpus  # noqa: E402
from launch.hf import CausalLMLoss, build_hf_model, converted_blocks, lm_window, tiny_hf_config  # noqa: E402
from launch.train import build_parser, check_flags, given_flags  # noqa: E402
from tests.integration.test_huggingface import NAMES  # noqa: E402

FLAGS = ["--d-model", "32", "--d-ff", "48", "--layers", "2", "--seq-len", "16", "--batch-size", "2"]


@pytest.mark.parametrize("name", NAMES)
def test_every_family_builds_through_the_launcher_as_transformers_model_and_trains_a_step(name):
    flags = ["--hf-model", name, *FLAGS]
    args = build_parser().parse_args(flags)
    check_flags(args, 1, given_flags(flags))
    corpus = CharCorpus.named(args.corpus)
    inputs, targets = corpus.batch(0, 0, args.batch_size, args.seq_len)
    torch.manual_seed(args.seed)  # the launcher's init: transformers' model of the same config and seed
    config = tiny_hf_config(args, corpus.vocab_size)
    reference = causal_lm_class(config)._from_config(config, dtype=torch.float32)
    ids = lm_window(inputs, targets)
    want = reference(input_ids=ids, labels=ids, use_cache=False).loss
    model = build_hf_model(args, corpus.vocab_size, ep_size=1)
    loss_fn = CausalLMLoss(model)
    lm, aux, stats = loss_fn(model, inputs, targets)
    torch.testing.assert_close(lm + aux, want, rtol=1e-5, atol=1e-5)
    assert len(stats) == len(converted_blocks(model)) >= 1 and all(s is not None for s in stats)
    (lm + aux).backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    with torch.no_grad():
        after = sum(loss_fn(model, inputs, targets)[:2])
    assert after < lm + aux
