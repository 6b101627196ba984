"""Big models: ``from_pretrained`` reads only this rank's experts (equal to ``convert`` of
transformers' own ``from_pretrained``, for every family, at EP 2; a rank's host memory grows with
1/ep of the experts, measured); ``save_pretrained`` writes HF's sharded safetensors with an index,
one gathered tensor at a time, which plain transformers loads with the same logits. The docs'
families table is the generated one."""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import os
import weakref
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from expert_parallel.checkpoint.logical import ExpertShard  # noqa: E402
from expert_parallel.integrations.huggingface import causal_lm_class, convert, from_pretrained  # noqa: E402
from expert_parallel.integrations.huggingface.loading import Checkpoint  # noqa: E402
from expert_parallel.integrations.huggingface.saving import INDEX, save_pretrained  # noqa: E402
from expert_parallel.integrations.huggingface.specs import TinySizes  # noqa: E402
from expert_parallel.integrations.huggingface.table import DOC, with_table  # noqa: E402
from expert_parallel.integrations.huggingface.tiny import tiny_config  # noqa: E402
from tests.harness import run_ranks  # noqa: E402
from tests.integration.test_huggingface import NAMES, batch, tiny_model  # noqa: E402

SHARD_LIMIT = 40_000  # bytes: several shards of a tiny model


def test_the_docs_families_table_is_the_one_generated_from_the_specs():
    text = DOC.read_text()
    assert with_table(text) == text, "run python -m expert_parallel.integrations.huggingface.table"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    """Every family's tiny model saved by plain transformers (the original format, experts stored
    one tensor each, in small shards with an index), and Mixtral in transformers' own fused
    format (stacked ``[E, ...]`` expert tensors, read by rows)."""
    root = tmp_path_factory.mktemp("hf_checkpoints")
    for name in NAMES:
        tiny_model(name).save_pretrained(root / name, max_shard_size=SHARD_LIMIT)
    tiny_model("mixtral").save_pretrained(root / "fused", save_original_format=False)
    return root


def _logits(model, seed: int) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch(seed)).logits


def loading_worker(rank: int, world: int, root: str, names: list[str]) -> dict:
    """Per checkpoint: ``from_pretrained`` at EP 2 against ``convert(AutoModelForCausalLM.
    from_pretrained)`` (state and logits); then, from Mixtral's converted model, the sharded save
    (through plain ``save_pretrained`` with a ``max_shard_size``) with the most gathered expert
    tensors alive at once."""
    results = {}
    for name in [*names, "fused"]:
        path = os.path.join(root, name)
        reference = causal_lm_class(transformers.AutoConfig.from_pretrained(path)).from_pretrained(path)
        want = convert(reference, ep_size=2).eval()
        got = from_pretrained(path, ep_size=2)
        want_state, got_state = want.state_dict(), got.state_dict()
        results[name] = {
            "same_keys": list(got_state) == list(want_state),
            "differ": [key for key, value in want_state.items()
                       if key not in got_state or not torch.equal(got_state[key], value)],
            "same_logits": torch.equal(_logits(got, 10 + rank), _logits(want, 10 + rank)),
        }
    alive: list[weakref.ref] = []
    most, read_bytes = 0, []
    gather, read = ExpertShard.gather, Checkpoint.read

    def counting_gather(self, local):
        nonlocal most
        most = max(most, sum(ref() is not None for ref in alive))
        out = gather(self, local)
        alive.append(weakref.ref(out))
        return out

    def counting_read(self, key, rows=None):
        tensor = read(self, key, rows)
        read_bytes.append(tensor.numel() * tensor.element_size())
        return tensor

    ExpertShard.gather, Checkpoint.read = counting_gather, counting_read
    try:
        model = from_pretrained(os.path.join(root, "mixtral"), ep_size=2)
        model.save_pretrained(os.path.join(root, "saved"), max_shard_size=SHARD_LIMIT)
    finally:
        ExpertShard.gather, Checkpoint.read = gather, read
    results.update(gathers=len(alive), most_alive=most, read=sum(read_bytes))
    return results


@pytest.fixture(scope="module")
def loaded(checkpoints) -> list[dict]:
    return run_ranks(loading_worker, 2, str(checkpoints), NAMES, timeout=300)


def stored_bytes(path: Path) -> dict[str, int]:
    """The bytes of a checkpoint's routed-expert tensors (``.experts.`` keys) and of the others."""
    sizes = {"experts": 0, "other": 0}
    with contextlib.ExitStack() as stack:
        checkpoint = Checkpoint(path, stack)
        for key in checkpoint.file_of:
            tensor = checkpoint.read(key)
            sizes["experts" if ".experts." in key else "other"] += tensor.numel() * tensor.element_size()
    return sizes


@pytest.mark.distributed
def test_a_rank_reads_the_dense_tensors_and_one_ep_th_of_the_experts(loaded, checkpoints):
    sizes = stored_bytes(checkpoints / "mixtral")
    assert sizes["experts"] > sizes["other"] > 0
    assert [rank["read"] for rank in loaded] == [sizes["experts"] // 2 + sizes["other"]] * 2


@pytest.mark.distributed
@pytest.mark.parametrize("name", [*NAMES, "fused"])
def test_from_pretrained_at_ep2_equals_convert_of_the_transformers_model_on_every_rank(loaded, name):
    for results in loaded:
        result = results[name]
        assert result["same_keys"] and result["differ"] == [] and result["same_logits"], result


@pytest.mark.distributed
def test_save_pretrained_writes_sharded_safetensors_with_an_index_one_gathered_tensor_at_a_time(loaded,
                                                                                                 checkpoints):
    """Plain transformers loads it with the original model's logits; every shard is at most
    ``max_shard_size``; the non-writing rank never holds two gathered expert tensors but the
    parts of one fused tensor (gate and up)."""
    saved = checkpoints / "saved"
    index = json.loads((saved / INDEX).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and sorted(p.name for p in saved.glob("*.safetensors")) == files
    assert all((saved / name).stat().st_size <= SHARD_LIMIT + 1000 for name in files)  # + the header
    original = transformers.AutoModelForCausalLM.from_pretrained(checkpoints / "mixtral")
    assert set(index["weight_map"]) == set(Checkpoint(checkpoints / "mixtral", contextlib.ExitStack()).file_of)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(saved)
    assert torch.equal(_logits(reloaded, 3), _logits(original, 3))
    assert loaded[1]["gathers"] >= 6 and loaded[1]["most_alive"] <= 1, loaded[1]


def test_save_pretrained_of_a_small_model_writes_one_file_without_an_index(tmp_path):
    reference = tiny_model("qwen2_moe")
    save_pretrained(convert(tiny_model("qwen2_moe")), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "generation_config.json",
                                                          "model.safetensors"]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert torch.equal(_logits(loaded, 4), _logits(reference.eval(), 4))


# --- memory: a model whose experts dominate its size ---------------------------------------------

BIG = TinySizes(d_model=64, d_ff=1024, experts=32, layers=2)


def _status(field: str) -> int:
    """``/proc/self/status`` ``field`` (e.g. ``VmHWM``, the peak resident memory) in bytes."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def memory_worker(rank: int, world: int, path: str) -> dict:
    """In a fresh process: the bytes of every tensor the loader reads, and the growth of the peak
    resident memory (``VmHWM``, which also counts the file's pages mapped by safetensors while
    they are read) over the resident memory before loading."""
    read, counted = Checkpoint.read, []

    def counting(self, key, rows=None):
        tensor = read(self, key, rows)
        counted.append(tensor.numel() * tensor.element_size())
        return tensor

    Checkpoint.read = counting
    gc.collect()
    before = _status("VmRSS")
    model = from_pretrained(path, ep_size=world)
    grown = _status("VmHWM") - before
    Checkpoint.read = read
    return {"read": sum(counted), "grown": grown, "params": sum(p.numel() * 4 for p in model.parameters())}


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory) -> tuple[Path, int, int]:
    """``(path, expert bytes, other bytes)`` of an expert-dominated tiny Mixtral (~50 MB of experts)."""
    path = tmp_path_factory.mktemp("big")
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(tiny_config("mixtral", BIG)).save_pretrained(path)
    sizes = stored_bytes(path)
    assert sizes["experts"] > 20 * sizes["other"]
    return path, sizes["experts"], sizes["other"]


def _memory(path: Path, ep: int) -> list[dict]:
    return run_ranks(memory_worker, ep, str(path), reuse=False, timeout=180)  # fresh processes: their own peak


@pytest.fixture(scope="module")
def at_ep1(big_checkpoint) -> dict:
    (one,) = _memory(big_checkpoint[0], 1)
    return one


@pytest.mark.slow  # fresh processes
@pytest.mark.distributed
def test_a_rank_reads_and_holds_one_ep_th_of_the_experts_at_ep2(big_checkpoint, at_ep1):
    path, experts, other = big_checkpoint
    one, two = at_ep1, _memory(path, 2)
    assert one["read"] == experts + other
    for rank in two:
        assert rank["read"] == experts // 2 + other
        assert rank["params"] < 0.55 * one["params"]
        # the peak grew by at least the experts at EP 1, and by about half of that at EP 2
        assert one["grown"] > experts and rank["grown"] < 0.7 * one["grown"], (one, rank)


@pytest.mark.slow
@pytest.mark.distributed
def test_a_rank_reads_and_holds_one_ep_th_of_the_experts_at_ep4(big_checkpoint, at_ep1):
    path, experts, other = big_checkpoint
    one, four = at_ep1, _memory(path, 4)
    for rank in four:
        assert rank["read"] == experts // 4 + other
        assert rank["grown"] < 0.45 * one["grown"], (one, rank)


@pytest.mark.parametrize("name,overrides", [("deepseek_v3", {"bias_update_rate": 0.1}),
                                            ("mixtral", {"router": "noisy_topk", "gate_after_topk": False})])
def test_from_pretrained_with_overrides_equals_convert_with_them_to_every_tensor(checkpoints, name, overrides):
    """The layer's tensors without an HF counterpart (the selection-bias counts of
    ``bias_update_rate``, a noisy router's noise weights) start as ``convert`` leaves them, and the
    layer's expert compute is chosen for the loaded tensors."""
    path = checkpoints / name
    want = convert(transformers.AutoModelForCausalLM.from_pretrained(path), **overrides)
    got = from_pretrained(path, **overrides)
    for kind in ("named_parameters", "named_buffers"):
        want_tensors, got_tensors = dict(getattr(want, kind)()), dict(getattr(got, kind)())
        assert list(got_tensors) == list(want_tensors)
        for name, tensor in want_tensors.items():
            assert torch.equal(got_tensors[name], tensor), name
    blocks = [m.moe for m in got.modules() if hasattr(m, "moe")]
    assert blocks and all(m.filled_compute == w.moe.filled_compute
                          for m, w in zip(blocks, (m for m in want.modules() if hasattr(m, "moe"))))


def test_from_pretrained_refuses_before_reading_and_without_safetensors(tmp_path, checkpoints):
    with pytest.raises(ValueError, match=r"num_experts=8 is invalid: it is not divisible by ep_size=3"):
        from_pretrained(checkpoints / "mixtral", ep_size=3)
    (tmp_path / "config.json").write_text((checkpoints / "mixtral" / "config.json").read_text())
    with pytest.raises(ValueError, match=r"holds no model.safetensors or model.safetensors.index.json"):
        from_pretrained(tmp_path)


def test_save_pretrained_writes_tied_weights_once_and_parameters_in_one_flat_buffer_each(tmp_path):
    """Tied embeddings (one tensor) are written once, as transformers does; parameters that are
    views of one flat buffer (DeepSpeed's ZeRO) are different tensors and all written."""
    config = tiny_config("mixtral")
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    reference = transformers.AutoModelForCausalLM.from_config(config).eval()
    model = convert(copy.deepcopy(reference))
    params = list(model.parameters())
    flat = torch.cat([p.detach().flatten() for p in params])
    offset = 0
    for param in params:
        param.data = flat[offset:offset + param.numel()].view_as(param)
        offset += param.numel()
    save_pretrained(model, tmp_path)
    with contextlib.ExitStack() as stack:
        keys = set(Checkpoint(tmp_path, stack).file_of)
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert torch.equal(_logits(loaded, 5), _logits(reference, 5))
