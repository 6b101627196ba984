"""The runtimes we are compared with in the same run: ``deepspeed.moe.layer.MoE`` and DeepSpeed's
AutoEP (on a one-block Mixtral model), each with the reason when it cannot run.

``deepspeed_moe`` builds DeepSpeed's MoE with the same shape as our layer: the same experts
(bias-free FFN or SwiGLU ``nn.Sequential``-style modules, which DeepSpeed runs one by one), the
same top-k, capacity factor and minimum capacity, token dropping on, no random token selection
and a deterministic second choice (matching our ``second_policy="all"``).

With ``spec.skew > 0`` both get the skewed router weight of ``benchmarks/skew.py`` (the one our
layer gets), so every runtime routes the same tokens to the same experts.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Optional

import torch
from torch import nn

from expert_parallel.experts import plain_expert

from .shapes import RunSpec
from .skew import set_router


def deepspeed_moe(spec: RunSpec, world: int, device: torch.device) -> tuple[Optional[nn.Module], str]:
    """``(DeepSpeed's MoE or None, why not)`` for ``spec`` on this rank's process group."""
    if importlib.util.find_spec("deepspeed") is None:
        return None, "deepspeed is not installed"
    import deepspeed
    from deepspeed.moe.layer import MoE

    if not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    shape = spec.shape
    expert = plain_expert(shape.expert, shape.activation, shape.d_model, shape.d_ff)
    layer = MoE(shape.d_model, expert, num_experts=shape.experts, ep_size=spec.ep_size or world,
                k=shape.top_k, capacity_factor=spec.capacity_factor,
                eval_capacity_factor=spec.capacity_factor, min_capacity=4, drop_tokens=True,
                use_rts=False, top2_2nd_expert_sampling=False)
    layer.set_deepspeed_parallelism()
    set_router(layer.deepspeed_moe.gate.wg.weight, spec)
    return layer.to(device, spec.torch_dtype), ""


# DeepSpeed 0.19.8's AutoEP reads transformers' output-recorder registry as a plain dict
# (``registry.get(key, default)``); transformers 5.23 made it a class whose ``get`` takes one
# argument, and ``deepspeed.initialize`` fails there. 5.1-5.22 work.
AUTOEP_TRANSFORMERS = ">=5.1,<5.23"


class AutoEPBlock(nn.Module):
    """DeepSpeed AutoEP's replacement of a Mixtral MoE block, called like our layer:
    ``x [S, D] -> (y [S, D], aux_loss)``.

    AutoEP's block returns the output alone: the Mixtral model computes its load-balancing loss
    from the router logits outside the block, so ``aux_loss`` is a constant 0 here and the timed
    step is the block's forward and backward. ``engine`` is kept so its process groups live on.
    """

    def __init__(self, block: nn.Module, engine: Any) -> None:
        super().__init__()
        self.block = block
        self.engine = [engine]  # a list: not a submodule, not in parameters()

    def forward(self, x_SD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y_SD = self.block(x_SD.unsqueeze(0)).squeeze(0)
        return y_SD, y_SD.new_zeros(())


def autoep_status(spec: RunSpec) -> str:
    """Why DeepSpeed's AutoEP cannot be measured for ``spec`` here, or ``""`` where it can.

    AutoEP (the ``expert_parallel`` section of a DeepSpeed config: dropless, grouped GEMM)
    replaces the MoE blocks of a Hugging Face model inside ``deepspeed.initialize``; it is
    measured on a one-block ``MixtralForCausalLM`` of the spec's shape, so it needs
    ``transformers`` and SwiGLU experts. It runs on the CPU (``torch._grouped_mm`` or its
    sequential expert loop, gloo all-to-alls) as well as on GPUs.
    """
    if importlib.util.find_spec("deepspeed") is None:
        return "deepspeed is not installed"
    if importlib.util.find_spec("deepspeed.module_inject.auto_ep") is None:
        return "this deepspeed has no AutoEP (deepspeed/module_inject/auto_ep.py)"
    if importlib.util.find_spec("transformers") is None:
        return f"AutoEP wraps a Hugging Face Mixtral model: pip install 'transformers{AUTOEP_TRANSFORMERS}'"
    from packaging.specifiers import SpecifierSet
    from transformers import __version__ as transformers_version

    if not SpecifierSet(AUTOEP_TRANSFORMERS).contains(transformers_version, prereleases=True):
        return (f"transformers {transformers_version} does not work with this AutoEP; pip install "
                f"'transformers{AUTOEP_TRANSFORMERS}'")
    shape = spec.shape
    if shape.expert != "swiglu":
        return (f"AutoEP is measured on a Mixtral model, whose experts are SwiGLU; preset {spec.preset} "
                f"has {shape.activation} FFN experts")
    if spec.dtype == "fp16":
        return "AutoEP is measured in fp32 and bf16 only (fp16 needs DeepSpeed's loss scaler)"
    return ""


def autoep_moe(spec: RunSpec, world: int, device: torch.device) -> tuple[Optional[AutoEPBlock], str]:
    """``(DeepSpeed AutoEP's MoE block or None, why not)`` for ``spec`` on this rank.

    Builds a one-block ``MixtralForCausalLM`` with the spec's ``d_model``, ``d_ff``, experts and
    top-k, seeded alike on every rank (AutoEP keeps each rank's slice of the full model), and
    lets ``deepspeed.initialize`` with ``expert_parallel.autoep_size = ep`` replace its MoE block.
    Routing: softmax top-k, renormalised over the k, no capacity (dropless); the skewed router
    weight when ``spec.skew > 0``.
    """
    why_not = autoep_status(spec)
    if why_not:
        return None, why_not
    import deepspeed
    from transformers import MixtralConfig, MixtralForCausalLM

    if not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    shape, ep = spec.shape, spec.ep_size or world
    heads = max(1, shape.d_model // 64)
    config = MixtralConfig(hidden_size=shape.d_model, intermediate_size=shape.d_ff,
                           num_local_experts=shape.experts, num_experts_per_tok=shape.top_k,
                           num_hidden_layers=1, num_attention_heads=heads, num_key_value_heads=heads,
                           vocab_size=128, max_position_embeddings=max(shape.tokens, 128))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.device(device):
        torch.manual_seed(spec.seed)
        model = MixtralForCausalLM(config).to(spec.torch_dtype)  # built in place: GPU shapes are GBs
    # no "bf16" section even for bf16 runs: the model is cast already, and DeepSpeed's bf16 mode
    # would build its bf16 optimizer wrapper, which the timed block does not use (and which wants
    # MoE parameter groups)
    ds_config = {"train_micro_batch_size_per_gpu": 1,
                 "expert_parallel": {"enabled": True, "autoep_size": ep, "preset_model": "mixtral"}}
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    block = engine.module.model.layers[0].mlp
    set_router(block.router.gate.weight, spec)
    return AutoEPBlock(block, engine), ""
