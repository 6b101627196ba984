"""Named shape presets and the spec of one benchmark run (picklable, sent to every rank)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Optional

import torch

from expert_parallel import MoEConfig
from expert_parallel.layout import expert_capacity


@dataclass(frozen=True)
class Shape:
    """An MoE layer's shape: ``d_model``, ``d_ff``, experts, top-k, expert kind, tokens per rank."""

    d_model: int
    d_ff: int
    experts: int
    top_k: int
    expert: str = "swiglu"
    activation: str = "silu"
    tokens: int = 4096


SHAPES: dict[str, Shape] = {
    # Mixtral 8x7B: d 4096, d_ff 14336, 8 SwiGLU experts, top-2
    "mixtral": Shape(4096, 14336, 8, 2),
    # fine-grained experts (DeepSeek-MoE / Qwen-MoE style): many narrow SwiGLU experts
    "fine-grained": Shape(2048, 1024, 64, 2),
    # Switch Transformer: top-1 over 64 ReLU FFN experts
    "switch": Shape(1024, 4096, 64, 1, expert="ffn", activation="relu"),
    # DeepSeek-V3: d 7168, 256 routed SwiGLU experts of d_ff 2048, top-8 (its shared expert left
    # out); 4096 tokens per GPU as in DeepEP's published benchmarks
    "deepseek-v3": Shape(7168, 2048, 256, 8),
    # CPU versions: the same expert counts, k and d_ff/d_model ratios, scaled down
    "mixtral-small": Shape(256, 896, 8, 2, tokens=2048),
    "fine-grained-small": Shape(256, 128, 64, 2, tokens=2048),
    "switch-small": Shape(128, 512, 64, 1, expert="ffn", activation="relu", tokens=2048),
}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class RunSpec:
    """Everything a rank needs to build and time one configuration.

    ``tokens`` is per rank; ``ep_size=None`` means the whole world. The capacity is fixed from
    ``tokens`` (no all-reduce, no host sync) unless ``agree_capacity``. ``skew > 0`` biases every
    runtime's router to Zipf-like loads with that exponent (``benchmarks/skew.py``); ``autoep``
    says whether to build DeepSpeed's AutoEP when ``deepspeed`` is on. ``num_chunks``, ``a2a`` and
    ``ranks_per_node`` are the layer's ``MoEConfig`` fields of the same names (chunked overlap, the
    hierarchical all-to-all); the baselines do not take them. ``variants`` also times our layer with
    ``recompute="experts"`` and under ``torch.compile``; ``memory`` measures every runtime's memory.
    """

    preset: str
    shape: Shape
    dtype: str = "fp32"
    ep_size: Optional[int] = None
    capacity_factor: float = 1.25
    second_policy: str = "all"
    agree_capacity: bool = False
    warmup: int = 3
    repeat: int = 10
    phases: bool = True
    deepspeed: bool = True
    gpu_checks: bool = True
    seed: int = 0
    skew: float = 0.0
    autoep: bool = True
    num_chunks: int = 1
    a2a: str = "flat"
    ranks_per_node: Optional[int] = None
    variants: bool = False
    memory: bool = True

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def capacity(self) -> int:
        """Slots per expert: ``C = max(4, ceil(k * S * cf / E))`` with ``S`` the tokens per rank."""
        shape = self.shape
        return expert_capacity(shape.tokens, shape.experts, shape.top_k, self.capacity_factor, 4)

    def config(self, world: int) -> MoEConfig:
        """The layer's ``MoEConfig`` on ``world`` ranks."""
        shape = self.shape
        router = {"router": "gshard", "second_policy": self.second_policy} if shape.top_k == 2 else {
            "router": "switch"}
        return MoEConfig(d_model=shape.d_model, d_ff=shape.d_ff, num_experts=shape.experts,
                         top_k=shape.top_k, capacity_factor=self.capacity_factor, min_capacity=4,
                         expert=shape.expert, activation=shape.activation,
                         ep_size=self.ep_size or world,
                         capacity=None if self.agree_capacity else self.capacity(), num_chunks=self.num_chunks,
                         a2a=self.a2a, ranks_per_node=self.ranks_per_node, **router)

    def expert_flops(self, world: int) -> float:
        """Forward+backward FLOPs of one rank's expert matmuls at full capacity (3x the forward)."""
        shape, ep = self.shape, self.ep_size or world
        rows = shape.experts // ep * ep * self.capacity()
        mats = 3 if shape.expert == "swiglu" else 2
        return 3.0 * 2.0 * rows * shape.d_model * shape.d_ff * mats

    def a2a_bytes(self) -> int:
        """Bytes of one rank's expert buffer ``[E, C, D]``: what each all-to-all moves."""
        element = torch.empty((), dtype=self.torch_dtype).element_size()
        return self.shape.experts * self.capacity() * self.shape.d_model * element

    def describe(self) -> dict:
        """JSON-ready summary (the shape flattened in)."""
        out = asdict(self)
        out["capacity"] = self.capacity()
        return out


def spec_from_args(args, preset: Optional[str] = None, tokens: Optional[int] = None,
                   capacity_factor: Optional[float] = None) -> RunSpec:
    """A ``RunSpec`` from the common CLI flags (``--preset``, ``--tokens`` and the rest);
    ``capacity_factor`` defaults to the first of ``--capacity-factor``."""
    name = preset or args.preset
    if name not in SHAPES:
        raise ValueError(f"preset={name!r} is unknown; choose one of {sorted(SHAPES)}")
    shape = SHAPES[name]
    if args.skew < 0:
        raise ValueError(f"--skew {args.skew} is negative; use 0 (uniform routing) or an exponent > 0 (e.g. 1.0)")
    shape = replace(shape, tokens=tokens or args.tokens or shape.tokens)
    factor = args.capacity_factor[0] if capacity_factor is None else capacity_factor
    return RunSpec(preset=name, shape=shape, dtype=args.dtype, ep_size=args.ep_size,
                   capacity_factor=factor, second_policy=args.second_policy,
                   agree_capacity=args.agree_capacity, warmup=args.warmup, repeat=args.repeat,
                   phases=not args.no_phases, deepspeed=not args.no_deepspeed,
                   gpu_checks=not args.no_gpu_checks, seed=args.seed, skew=args.skew,
                   autoep=not args.no_autoep, num_chunks=args.num_chunks, a2a=args.a2a,
                   ranks_per_node=args.ranks_per_node, variants=args.variants, memory=not args.no_memory)


def weight_bytes(spec: RunSpec, world: int) -> int:
    """Bytes of one rank's expert weights (for the dry run)."""
    shape, ep = spec.shape, spec.ep_size or world
    mats = 3 if shape.expert == "swiglu" else 2
    element = torch.empty((), dtype=spec.torch_dtype).element_size()
    return math.prod((shape.experts // ep, shape.d_model, shape.d_ff)) * mats * element
