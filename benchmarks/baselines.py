"""The runtimes we are compared with in the same run: ``deepspeed.moe.layer.MoE`` and the
reason DeepSpeed's AutoEP path is or is not measured here.

``deepspeed_moe`` builds DeepSpeed's MoE with the same shape as our layer: the same experts
(bias-free FFN or SwiGLU ``nn.Sequential``-style modules, which DeepSpeed runs one by one), the
same top-k, capacity factor and minimum capacity, token dropping on, no random token selection
and a deterministic second choice (matching our ``second_policy="all"``).
"""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch
from torch import nn

from expert_parallel.experts import plain_expert

from .shapes import RunSpec


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
    return layer.to(device, spec.torch_dtype), ""


def autoep_status(device: torch.device) -> str:
    """Why DeepSpeed's AutoEP (the ``expert_parallel`` section of a DeepSpeed config: dropless,
    grouped GEMM) is not measured in this run, or ``""`` where it could be.

    AutoEP replaces the MoE blocks of a Hugging Face model (``MixtralForCausalLM`` here) inside
    ``deepspeed.initialize`` and runs its experts with ``torch._grouped_mm`` and Triton kernels,
    so it needs CUDA and ``transformers``. ``benchmarks/autoep.py`` is the GPU path.
    """
    if importlib.util.find_spec("deepspeed") is None:
        return "deepspeed is not installed"
    if importlib.util.find_spec("deepspeed.module_inject.auto_ep") is None:
        return "this deepspeed has no AutoEP (deepspeed/module_inject/auto_ep.py)"
    if device.type != "cuda":
        return "AutoEP needs CUDA (grouped GEMM and Triton kernels); not run on the CPU"
    if importlib.util.find_spec("transformers") is None:
        return "AutoEP wraps a Hugging Face Mixtral model; transformers is not installed"
    return ""
