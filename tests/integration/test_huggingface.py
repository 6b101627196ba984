"""Converted transformers models against transformers' own: logits, router logits, the model's
aux loss and gradients at EP 1 (in process) and EP 2 (2 gloo ranks); plain ``save_pretrained`` at
EP 1 and EP 2 loaded by plain transformers; the release policy; errors. Tiny random models, no hub
access. CI runs this file under the oldest and the newest supported release (.ci/hf_newest.sh)."""

from __future__ import annotations

import copy
import dataclasses
import os
import subprocess
import sys
import warnings

import pytest
import torch
from packaging.specifiers import SpecifierSet

transformers = pytest.importorskip("transformers")

from expert_parallel.comm import expert_groups, reduce_gradients  # noqa: E402
from expert_parallel.experts import StackedExperts  # noqa: E402
from expert_parallel.integrations.huggingface import (  # noqa: E402
    SUPPORTED_TRANSFORMERS,
    TESTED_TRANSFORMERS,
    ExpertParallelBlock,
    causal_lm_class,
    convert,
    to_hf_state_dict,
)
from expert_parallel.integrations.huggingface.compat import recorded  # noqa: E402
from expert_parallel.integrations.huggingface.families import SPECS_BY_NAME  # noqa: E402
from expert_parallel.integrations.huggingface.specs import TinySizes, hf_to_ours, ours_to_hf  # noqa: E402
from expert_parallel.integrations.huggingface.tiny import tiny_config  # noqa: E402
from tests.harness import run_ranks  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SIZES = TinySizes()
NAMES = list(SPECS_BY_NAME)  # every supported family: a spec with its tiny model is tested by every test here
BATCH, SEQ = 2, 8


def sharded_keys(name: str) -> tuple[str, ...]:
    """The HF block's routed-expert tensors (split over EP), e.g. ``experts.gate_up_proj``."""
    return tuple(sorted({wm.hf for wm in SPECS_BY_NAME[name].weights if wm.sharded}))


def trained_keys(model: torch.nn.Module) -> set[str]:
    """The parameters that get gradients (Ernie 4.5's, AFMoE's and Laguna's
    selection biases are parameters without)."""
    return {key for key, param in model.named_parameters() if param.requires_grad}


def tiny_model(name: str, **config: object) -> transformers.PreTrainedModel:
    """A random tiny model with decisive routing (router weights ~N(0, 1), so no near-ties flip
    between two implementations) and non-zero router buffers (e.g. a selection bias); ``config``:
    HF config attributes set on the tiny config (another variant of the family)."""
    spec = SPECS_BY_NAME[name]
    scales = {wm.hf: 1.0 if wm.ours == "router.weight" else 0.1 for wm in spec.weights
              if wm.ours == "router.weight" or wm.ours.startswith("router.") or wm.sharded}
    torch.manual_seed(0)
    hf_config = tiny_config(name, SIZES)
    for attr, value in config.items():
        setattr(hf_config, attr, value)
    model = causal_lm_class(hf_config)._from_config(hf_config)
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            scale = next((scale for hf, scale in scales.items() if key.endswith("." + hf)), None)
            if scale is not None and tensor.is_floating_point():
                tensor.normal_(0.0, scale)
    return model


def num_experts(name: str) -> int:
    return SPECS_BY_NAME[name].moe_fields(tiny_config(name, SIZES))["num_experts"]


def batch(seed: int, shape: tuple[int, int] = (BATCH, SEQ)) -> torch.Tensor:
    return torch.randint(0, SIZES.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


RAGGED = ((2, 8), (3, 5))  # [batch, seq] per EP rank: different token counts


def load(directory) -> transformers.PreTrainedModel:
    """Plain transformers' model of a saved directory, with the tiny models' attention; its tensors
    copied to fresh memory (a loaded tensor may sit at an address that is not 64-byte aligned, where
    the CPU matmul kernels round differently, e.g. Mistral 4's and DBRX's experts: not a change of the weights)."""
    model = causal_lm_class(transformers.AutoConfig.from_pretrained(directory)).from_pretrained(
        directory, attn_implementation="eager")
    with torch.no_grad():
        for tensor in (*model.parameters(), *model.buffers()):
            tensor.data = tensor.data.clone()
    return model


def hf_grads(model: torch.nn.Module, keys: set[str]) -> dict[str, torch.Tensor]:
    """The gradients under the HF keys ``keys``: for a converted model, through ``to_hf_state_dict``
    (experts gathered from the EP group) with every parameter's gradient standing in for it."""
    params = dict(model.named_parameters())
    if not any(isinstance(module, ExpertParallelBlock) for module in model.modules()):
        return {key: params[key].grad.clone() for key in keys}
    saved = {name: param.data for name, param in params.items()}
    with torch.no_grad():
        for param in params.values():
            param.data = param.grad if param.grad is not None else torch.zeros_like(param)
        state = {key: value.clone() for key, value in to_hf_state_dict(model).items() if key in keys}
        for name, param in params.items():
            param.data = saved[name]
    return state


def run(model: torch.nn.Module, input_ids: torch.Tensor, keys: set[str]) -> dict:
    """Logits, router logits, aux loss and gradients (under the HF keys) of one training step."""
    model.zero_grad()
    out = model(input_ids=input_ids, labels=input_ids, output_router_logits=True)
    out.loss.backward()
    return {"logits": out.logits.detach(), "aux_loss": None if out.aux_loss is None else out.aux_loss.detach(),
            "router_logits": [logits.detach().float() for logits in out.router_logits],
            "grads": hf_grads(model, keys)}


def assert_same_step(got: dict, want: dict, want_grads: dict) -> None:
    torch.testing.assert_close(got["logits"], want["logits"], rtol=1e-4, atol=1e-5)
    assert len(got["router_logits"]) == len(want["router_logits"]) > 0
    for ours, theirs in zip(got["router_logits"], want["router_logits"]):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    if want["aux_loss"] is None:
        assert got["aux_loss"] is None
    else:
        torch.testing.assert_close(got["aux_loss"], want["aux_loss"], rtol=1e-5, atol=1e-6)
    assert set(got["grads"]) == set(want_grads)
    for key, grad in want_grads.items():
        torch.testing.assert_close(got["grads"][key], grad, rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("name", NAMES)
def test_converted_model_equals_transformers_at_ep1(name):
    reference = tiny_model(name)
    keys = trained_keys(reference)
    model = convert(copy.deepcopy(reference))
    want = run(reference, batch(1), keys)
    assert sum(isinstance(m, ExpertParallelBlock) for m in model.modules()) == len(want["router_logits"])
    assert_same_step(run(model, batch(1), keys), want, want["grads"])


def test_greedy_generation_with_the_kv_cache_is_unchanged():
    reference = tiny_model("mixtral").eval()
    model = convert(copy.deepcopy(reference))
    prompt = batch(2)[:, :5]
    want = reference.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0), want)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_goes_back_to_the_original_keys_exactly_at_ep1(name):
    reference = tiny_model(name)
    state = to_hf_state_dict(convert(copy.deepcopy(reference)))
    want = reference.state_dict()
    assert list(state) == list(want)
    for key, value in want.items():
        assert torch.equal(state[key], value), key


@pytest.mark.parametrize("name", NAMES)
def test_tiny_models_build_and_record_router_logits_on_cpu(name):
    """The reference side of every spec runs here (MLA attention, dense first layers, hybrids)."""
    model = tiny_model(name)
    blocks = [m for m in model.modules() if type(m).__name__ == SPECS_BY_NAME[name].block]
    out = model(input_ids=batch(0), output_router_logits=True)
    assert out.logits.shape == (BATCH, SEQ, SIZES.vocab_size) and len(blocks) >= 2
    assert [tuple(logits.shape) for logits in out.router_logits] == [(BATCH * SEQ, num_experts(name))] * len(blocks)


SHARED = [name for name in NAMES if any(wm.ours.startswith("shared_experts.") for wm in SPECS_BY_NAME[name].weights)]


@pytest.mark.parametrize("name", SHARED)
def test_shared_mlp_layouts_compute_the_hf_mlp(name):
    """The shared-expert maps: the HF shared MLP (width ``n_shared * d_ff_shared``) as ``n_shared``
    stacked experts, and back."""
    model, spec = tiny_model(name), SPECS_BY_NAME[name]
    block = next(m for m in model.modules() if type(m).__name__ == spec.block)
    fields = spec.moe_fields(tiny_config(name, SIZES))
    experts = StackedExperts(fields["num_shared_experts"], SIZES.d_model, fields["d_ff_shared"], gated=True,
                             sharded=False)
    hf_state = block.state_dict()
    maps = [wm for wm in spec.weights if wm.ours.startswith("shared_experts.")]
    for wm in maps:
        param = getattr(experts, wm.ours.split(".")[1])
        param.data = hf_to_ours(hf_state[wm.hf], wm, tuple(param.shape))
        assert torch.equal(ours_to_hf(param.data, wm), hf_state[wm.hf])
    x = torch.randn(5, SIZES.d_model)
    mlp = block.get_submodule(maps[0].hf.rsplit(".", 2)[0])
    torch.testing.assert_close(experts.dense(x), mlp(x), rtol=1e-5, atol=1e-6)


def ep2_worker(rank: int, world: int, names: list[str], save_dir: str) -> dict:
    """Per model: HF's step on each rank's batch (reference), ours at EP 2 on this rank's batch
    (``RAGGED``: different shapes);
    a plain save_pretrained and the state dict gathered back; one data-parallel SGD step, then a
    plain save_pretrained and the logits after it."""
    results = {}
    for name in names:
        reference = tiny_model(name)
        keys = trained_keys(reference)
        wants = [run(reference, batch(10 + r, RAGGED[r]), keys) for r in range(world)]
        model = convert(copy.deepcopy(reference), ep_size=2)
        model.save_pretrained(os.path.join(save_dir, name, "converted"))  # plain: every rank, rank 0 writes
        gathered = to_hf_state_dict(model)
        same_state = list(gathered) == list(reference.state_dict()) and all(
            torch.equal(gathered[key], value) for key, value in reference.state_dict().items())
        got = run(model, batch(10 + rank, RAGGED[rank]), keys)
        reduce_gradients(model, expert_groups(2))  # as a training loop does: ranks stay in step
        torch.optim.SGD(model.parameters(), lr=0.5).step()
        with torch.no_grad():
            after = model(input_ids=batch(99)).logits
        model.save_pretrained(os.path.join(save_dir, name, "trained"))
        block = next(module for module in model.modules() if isinstance(module, ExpertParallelBlock))
        results[name] = {"wants": wants, "got": got, "same_state": same_state, "after": after,
                         "local_experts": block.moe.experts.w1.shape[0]}
    return results


@pytest.fixture(scope="module")
def ep2(tmp_path_factory) -> tuple[list[dict], str]:
    save_dir = str(tmp_path_factory.mktemp("hf_ep2"))
    return run_ranks(ep2_worker, 2, NAMES, save_dir, timeout=240), save_dir


@pytest.mark.distributed
@pytest.mark.parametrize("name", NAMES)
def test_converted_model_equals_transformers_at_ep2(ep2, name):
    """Dense gradients are this rank's; an expert's gradient (gathered from its owner) holds both
    ranks' tokens, as the all-to-all's backward delivers them."""
    per_rank, _ = ep2
    for rank, results in enumerate(per_rank):
        result = results[name]
        wants = result["wants"]
        assert result["same_state"] and result["local_experts"] * 2 == num_experts(name)
        want_grads = {key: (sum(want["grads"][key] for want in wants) if key.endswith(sharded_keys(name)) else grad)
                      for key, grad in wants[rank]["grads"].items()}
        assert_same_step(result["got"], wants[rank], want_grads)


@pytest.mark.distributed
@pytest.mark.parametrize("name", NAMES)
def test_plain_save_pretrained_at_ep2_loads_in_plain_transformers_with_the_same_logits(ep2, name):
    """Right after convert: the original model's logits exactly; after a trained step: the
    converted model's logits (every rank's)."""
    per_rank, save_dir = ep2
    fresh, trained = (load(os.path.join(save_dir, name, kind)) for kind in ("converted", "trained"))
    assert not any(isinstance(m, ExpertParallelBlock) for m in (*fresh.modules(), *trained.modules()))
    with torch.no_grad():
        before = tiny_model(name)(input_ids=batch(99)).logits
        assert torch.equal(fresh(input_ids=batch(99)).logits, before)
        logits = trained(input_ids=batch(99)).logits
    assert not torch.allclose(logits, before, atol=1e-3)  # the step changed the model
    for results in per_rank:
        torch.testing.assert_close(logits, results[name]["after"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("given", [None, "hf", "ours"])
def test_save_pretrained_at_ep1_writes_the_hf_checkpoint_whatever_state_dict_it_gets(tmp_path, given):
    """Plain, the documented ``state_dict=to_hf_state_dict(model)``, and a state dict under the
    converted keys (as Trainer passes ``model.state_dict()``): the original logits exactly."""
    reference = tiny_model("qwen2_moe")
    model = convert(copy.deepcopy(reference))
    state = {None: None, "hf": lambda: to_hf_state_dict(model), "ours": model.state_dict}[given]
    model.save_pretrained(tmp_path, **({} if state is None else {"state_dict": state()}))
    loaded = load(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=batch(3)).logits, reference(input_ids=batch(3)).logits)


def test_push_to_hub_uploads_the_hf_checkpoint(tmp_path, monkeypatch):
    """push_to_hub saves through save_pretrained; the hub calls are stubbed, the upload is a copy."""
    reference = tiny_model("mixtral")
    model = convert(copy.deepcopy(reference))
    from transformers.utils import hub
    monkeypatch.setattr(hub, "hf_api", lambda: type("Api", (), {
        "create_repo": lambda self, repo_id, **kwargs: type("Repo", (), {"repo_id": repo_id})()})())
    monkeypatch.setattr(hub, "create_and_tag_model_card",
                        lambda *args, **kwargs: type("Card", (), {"save": lambda self, path: None})())
    monkeypatch.setattr(type(model), "_upload_modified_files",
                        lambda self, folder, *args, **kwargs: __import__("shutil").copytree(folder, tmp_path / "hub"))
    model.push_to_hub("me/tiny")
    loaded = load(tmp_path / "hub")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=batch(3)).logits, reference(input_ids=batch(3)).logits)


def test_the_recorded_outputs_are_read_while_the_model_collects_them():
    """The one private transformers API (the output collector), on the installed release."""
    model = convert(tiny_model("mixtral"))
    seen = []
    model.model.layers[0].mlp.register_forward_pre_hook(lambda *_: seen.append(recorded("router_logits")))
    model(input_ids=batch(0), output_router_logits=True)
    model(input_ids=batch(0), output_router_logits=False)
    assert isinstance(seen[0], list) and seen[1] is None


def test_an_unsupported_moe_block_names_its_class():
    """PhiMoE's sparsemixer router has no exact equivalent: a clear error naming the block."""
    config = transformers.PhimoeConfig(vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=48, num_local_experts=4)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp is a PhimoeSparseMoeBlock, a sparse-MoE block that no "
                                         r"spec converts.*add a BlockSpec"):
        convert(transformers.AutoModelForCausalLM.from_config(config))


def test_num_experts_not_divisible_by_ep_size_names_both_and_the_fix():
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp \(MixtralSparseMoeBlock\) num_experts=8 is invalid: "
                                         r"it is not divisible by ep_size=3; choose ep_size among the divisors of 8: "
                                         r"\[1, 2, 4, 8\]$"):
        convert(tiny_model("mixtral"), ep_size=3)


@pytest.mark.parametrize("version", ["5.21.1", "4.57.0"])
def test_a_transformers_release_older_than_the_range_names_both(monkeypatch, version):
    monkeypatch.setattr(transformers, "__version__", version)
    with pytest.raises(ValueError, match=rf"transformers {version} is installed.*supports "
                                         rf"transformers{SUPPORTED_TRANSFORMERS}"):
        convert(tiny_model("mixtral"))


def test_the_tested_releases_are_the_supported_range_and_convert_without_a_warning():
    assert all(version in SpecifierSet(SUPPORTED_TRANSFORMERS) for version in TESTED_TRANSFORMERS)
    assert transformers.__version__ in TESTED_TRANSFORMERS
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert(tiny_model("mixtral"))


def test_a_newer_release_converts_with_a_warning_when_the_structure_is_as_expected(monkeypatch):
    reference = tiny_model("deepseek_v3")
    monkeypatch.setattr(transformers, "__version__", "5.26.0")
    with pytest.warns(UserWarning, match=r"transformers 5\.26\.0 is newer than the releases .* tested on"):
        model = convert(copy.deepcopy(reference))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=batch(4)).logits, reference(input_ids=batch(4)).logits,
                                   rtol=1e-4, atol=1e-5)


def _renamed_config_field(model):
    def without(config, name):
        if name == "num_local_experts":
            raise AttributeError(name)
        return object.__getattribute__(config, name)
    model.config.__class__ = type("MixtralConfig", (type(model.config),), {"__getattribute__": without})


def _extra_tensor(model):
    model.model.layers[1].mlp.register_buffer("scale", torch.ones(1))


def _renamed_block(model):
    model.model.layers[1].mlp.__class__ = type("MixtralSparseMoE", (type(model.model.layers[1].mlp),), {})


def _recording_moved(model):
    from expert_parallel.integrations.huggingface import compat
    compat._active_collector = None


@pytest.mark.parametrize("change,match", [
    (_renamed_config_field, r"config \(MixtralConfig\) has no \['num_local_experts'\], which the mixtral spec reads"),
    (_extra_tensor, r"holds tensors \['scale'\] that the spec does not map"),
    (_renamed_block, r"is a MixtralSparseMoE, a sparse-MoE block that no spec converts"),
    (_recording_moved, r"_active_collector, where transformers collects the router logits .* is missing"),
])
def test_a_newer_release_that_changed_what_a_spec_reads_is_refused(monkeypatch, change, match):
    from expert_parallel.integrations.huggingface import compat
    monkeypatch.setattr(compat, "_active_collector", compat._active_collector)
    model = tiny_model("mixtral")
    change(model)
    monkeypatch.setattr(transformers, "__version__", "6.0.0")
    with pytest.raises(ValueError, match=match + r".*transformers 6\.0\.0 is newer than the newest release tested "
                                               rf"\({TESTED_TRANSFORMERS[-1]}\)"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # refused before any warning
            convert(model)
    assert not any(isinstance(m, ExpertParallelBlock) for m in model.modules())


@pytest.mark.parametrize("override,match", [
    ({"capacity_factr": 1.0}, r"capacity_factr is not a MoEConfig field"),
    ({"d_ff": 64}, r"d_ff=64\) cannot be overridden: it is fixed by the model's weights"),
    ({"num_shared_experts": 1}, r"num_shared_experts=1\) cannot be overridden"),
    ({"router": "gshard"}, r"MoEConfig.gate_after_topk=True is invalid"),
])
def test_bad_overrides_are_value_errors(override, match):
    with pytest.raises(ValueError, match=match):
        convert(tiny_model("mixtral"), **override)


def test_overrides_apply_and_asking_for_a_capacity_turns_dropless_off():
    default = convert(tiny_model("mixtral")).model.layers[0].mlp.moe.cfg
    assert default.dropless and default.router == "topk" and default.gate_after_topk and default.top_k == 2
    capped = convert(tiny_model("mixtral"), capacity_factor=0.5, expert_compute="padded").model.layers[0].mlp.moe.cfg
    assert not capped.dropless and capped.capacity_factor == 0.5 and capped.expert_compute == "padded"


def test_a_block_variant_with_unmapped_tensors_is_refused_before_any_change():
    model = tiny_model("mixtral")
    model.model.layers[1].mlp.register_parameter("bias", torch.nn.Parameter(torch.zeros(32)))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp \(MixtralSparseMoeBlock\) holds tensors \['bias'\]"):
        convert(model)
    assert not any(isinstance(m, ExpertParallelBlock) for m in model.modules())


def test_converting_twice_or_a_plain_module_is_refused():
    model = convert(tiny_model("mixtral"))
    with pytest.raises(ValueError, match="converted already"):
        convert(model)
    with pytest.raises(ValueError, match="takes a transformers PreTrainedModel"):
        convert(torch.nn.Linear(2, 2))


def test_a_spec_needing_missing_core_fields_says_which(monkeypatch):
    convert_module = sys.modules["expert_parallel.integrations.huggingface.convert"]
    spec = SPECS_BY_NAME["mixtral"]
    future = dataclasses.replace(spec, fixed=(*spec.fixed, ("expert_wizardry", 1)))
    monkeypatch.setitem(convert_module.SPECS_BY_BLOCK, spec.block, future)
    with pytest.raises(ValueError, match=r"needs the MoEConfig fields \['expert_wizardry'\].*update expert_parallel"):
        convert(tiny_model("mixtral"))


def test_convert_leaves_the_global_rng_as_it_was():
    model = tiny_model("mixtral")
    state = torch.get_rng_state()
    convert(model)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.slow  # a fresh interpreter
def test_the_core_imports_without_transformers():
    code = ("import sys; sys.modules['transformers'] = None\n"
            "import expert_parallel, expert_parallel.integrations, expert_parallel.layer, expert_parallel.comm\n"
            "try:\n    import expert_parallel.integrations.huggingface\nexcept ImportError:\n    print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_the_extra_pins_the_supported_range_and_ci_runs_the_newest_release():
    """The library's extra is the tested range, the AutoEP baseline's pin is its own extra, and
    the CI script runs every Hugging Face test file under the newest tested release."""
    with open(os.path.join(ROOT, "setup.py")) as f:
        setup = f.read()
    assert f'"huggingface": ["transformers{SUPPORTED_TRANSFORMERS}"]' in setup
    assert '"autoep": ["transformers>=5.1,<5.23"]' in setup
    with open(os.path.join(ROOT, ".ci", "hf_newest.sh")) as f:
        script = f.read()
    assert "TESTED_TRANSFORMERS[-1]" in script
    assert "tests/integration/test_huggingface*.py tests/integration/test_hf_*.py" in script
