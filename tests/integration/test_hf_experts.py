"""The expert-variant families beyond the generic tests of test_huggingface.py: the weight layouts
their specs map (each an exact inverse, sharded slices included, and the matrices the HF modules
multiply by), GPT-OSS's experts against transformers' ``GptOssExperts``, and the multimodal
Llama 4 and Aria models converting their text blocks."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts  # noqa: E402

from expert_parallel import MoEConfig, MoELayer  # noqa: E402
from expert_parallel.integrations.huggingface import ExpertParallelBlock, convert  # noqa: E402
from expert_parallel.integrations.huggingface.families.experts import GPT_OSS  # noqa: E402
from expert_parallel.integrations.huggingface.specs import WeightMap, hf_to_ours, join_parts, ours_to_hf  # noqa: E402
from expert_parallel.integrations.huggingface.tiny import tiny_config  # noqa: E402

N, IN, OUT = 4, 3, 5  # experts, a matrix's input and output width


def hf_matrix(layout: str, hf_NX: torch.Tensor, e: int, part: int) -> torch.Tensor:
    """Expert ``e``'s ``[IN, OUT]`` matrix (part ``part`` of 2 where fused) as the HF modules use
    it, written from their code: ``F.linear`` rows, ``x @ w`` columns, GPT-OSS's ``[..., part::2]``."""
    if layout == "linear_out":  # DBRX's w1 / v1: F.linear(x, w.view(N, OUT, IN)[e])
        return hf_NX.view(N, OUT, IN)[e].t()
    if layout == "matmul_rows":  # DBRX's w2: x @ w.view(N, IN, OUT)[e]
        return hf_NX.view(N, IN, OUT)[e]
    if layout == "matmul":  # Aria's and Llama 4's gate_up_proj: (x @ w[e]).chunk(2, dim=-1)
        return hf_NX[e].chunk(2, dim=-1)[part]
    return hf_NX[e][..., part::2]  # GPT-OSS's interleaved gate_up_proj


HF_SHAPES = {"linear_out": (N * OUT, IN), "matmul_rows": (N * IN, OUT), "matmul": (N, IN, 2 * OUT),
             "matmul_interleaved": (N, IN, 2 * OUT)}


@pytest.mark.parametrize("layout", list(HF_SHAPES))
def test_weight_layouts_map_each_expert_matrix_and_back_exactly(layout):
    hf = torch.randn(HF_SHAPES[layout])
    parts = 2 if layout.startswith("matmul") and layout != "matmul_rows" else 1
    maps = [WeightMap("experts.w1", "experts.x", layout, (index, parts)) for index in range(parts)]
    back = {}
    for index, wm in enumerate(maps):
        ours = hf_to_ours(hf, wm, (N, IN, OUT))
        for e in range(N):
            assert torch.equal(ours[e], hf_matrix(layout, hf, e, index))
        halves = [hf_to_ours(hf, wm, (N // 2, IN, OUT), first) for first in (0, N // 2)]  # EP 2's shards
        assert torch.equal(torch.cat(halves), ours)
        back[index] = ours_to_hf(ours, wm)
    assert torch.equal(join_parts(back, layout), hf)


def test_a_per_expert_bias_of_interleaved_parts_maps_and_back():
    """GPT-OSS's ``gate_up_proj_bias [E, 2F]``: gate columns ``0, 2, ...``, up columns ``1, 3, ...``."""
    hf = torch.randn(N, 2 * OUT)
    maps = [WeightMap(f"experts.b{index}", "experts.bias", "matmul_interleaved", (index, 2)) for index in (0, 1)]
    ours = [hf_to_ours(hf, wm, (N, OUT)) for wm in maps]
    assert torch.equal(ours[0], hf[:, 0::2]) and torch.equal(ours[1], hf[:, 1::2])
    assert torch.equal(hf_to_ours(hf, maps[1], (1, OUT), first=3), hf[3:, 1::2])
    assert torch.equal(join_parts({index: ours_to_hf(o, wm) for index, (o, wm) in enumerate(zip(ours, maps))},
                                  "matmul_interleaved"), hf)


def test_gpt_oss_experts_compute_transformers_gpt_oss_experts():
    """Every token through each expert with weight 1: our clamped SwiGLU experts, loaded by the
    spec's maps, against ``GptOssExperts`` (interleaved gate/up, biases, alpha and limit)."""
    config = tiny_config("gpt_oss")
    torch.manual_seed(0)
    theirs = GptOssExperts(config)
    with torch.no_grad():
        for param in theirs.parameters():
            param.normal_(0.0, 0.3)
    cfg = MoEConfig(**GPT_OSS.moe_fields(config))
    ours = MoELayer(cfg).experts
    state = theirs.state_dict()
    for wm in GPT_OSS.weights:
        if wm.sharded:
            param = getattr(ours, wm.ours.split(".")[1])
            param.data = hf_to_ours(state[wm.hf.split(".", 1)[1]], wm, tuple(param.shape))
    x = torch.randn(6, cfg.d_model)
    with torch.no_grad():
        want = torch.stack([theirs(x, torch.full((6, 1), e), torch.ones(6, 1)) for e in range(cfg.num_experts)])
        got = ours(x.expand(cfg.num_experts, -1, -1))
    assert (x @ state["gate_up_proj"][..., 0::2] > config.swiglu_limit).any()  # the clamp is hit
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _multimodal(name: str) -> transformers.PreTrainedModel:
    """A tiny Llama 4 or Aria model with its vision tower, the text model of ``tiny_config``."""
    text = tiny_config(name).to_dict()
    vision = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=28,
                  patch_size=14)
    if name == "llama4":
        config = transformers.Llama4Config(text_config=text, vision_config=dict(
            vision, vision_output_dim=16, projector_input_dim=16, projector_output_dim=16))
    else:
        config = transformers.AriaConfig(text_config=text, vision_config=vision, projector_patch_to_query_dict={4: 2})
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.AutoModelForImageTextToText.from_config(config)
    with torch.no_grad():  # decisive routing, as the text models' tests
        for key, tensor in model.state_dict().items():
            if key.endswith("router.weight"):
                tensor.normal_(0.0, 1.0)
    return model


@pytest.mark.parametrize("name", ["llama4", "aria"])
def test_a_multimodal_model_converts_its_text_blocks(name):
    reference = _multimodal(name)
    model = convert(copy.deepcopy(reference), expert_compute="padded")
    assert sum(isinstance(module, ExpertParallelBlock) for module in model.modules()) == 2
    input_ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=input_ids).logits, reference(input_ids=input_ids).logits,
                                   rtol=1e-4, atol=1e-5)


def test_the_routed_logits_the_block_returns_are_the_routers():
    """GPT-OSS and Llama 4 blocks return ``(hidden, router tensor)``; ours returns the logits."""
    model = convert(transformers.AutoModelForCausalLM.from_config(tiny_config("llama4")))
    block = next(module for module in model.modules() if isinstance(module, ExpertParallelBlock))
    x = torch.randn(2, 3, 32)
    out, logits = block(x)
    assert out.shape == x.shape
    torch.testing.assert_close(logits, F.linear(x.reshape(6, 32), block.moe.router.weight))
