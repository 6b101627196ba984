"""Checks of ``launch.train``'s flags: every problem the run would hit is a one-line ``ValueError``
naming the flag, its value and the fix, raised in the launching process before any rank starts."""

from __future__ import annotations

import argparse
import json
import math
import re
from importlib.util import find_spec
from pathlib import Path

from expert_parallel import MoEConfig
from expert_parallel.config import check_experts_split
from expert_parallel.presets import preset
from launch.corpus import CharCorpus
from launch.faults import FAILURE_PATTERN
from launch.hf import TOP_K

# flags of the demo model that a Hugging Face model does not read: --preset always (the model
# routes with its own router), the sizes with --hf-path (its saved config fixes them)
TOY_ONLY = ("preset",)
SIZES = ("experts", "d_model", "d_ff", "layers", "heads")


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def moe_config(args: argparse.Namespace, world_size: int) -> MoEConfig:
    """The demo model's MoE config; ValueError (one line) for a bad combination of flags."""
    rate = getattr(args, "bias_update_rate", 0.0)  # --bias-update-rate: DeepSeek-V3's selection-bias balancing
    cfg = preset(args.preset, args.d_model, args.d_ff, args.experts, ep_size=args.ep_size or world_size,
                 **({"bias_update_rate": rate} if rate else {}))
    if args.deepspeed_config and (cfg.num_shared_experts or cfg.router in ("soft", "expert_choice")):
        raise ValueError(f"--preset {args.preset} with --deepspeed-config: DeepSpeed's MoE layer has no shared "
                         "experts and routes token-choice only; pick another preset or train without DeepSpeed")
    return cfg


def check_flags(args: argparse.Namespace, world_size: int, given: frozenset[str] = frozenset()) -> None:
    """ValueError (one line naming the flag, its value and the fix) for flags the run cannot use.

    Args:
        args: the parsed flags.
        world_size: ranks of the job.
        given: the flags given on the command line (``launch.train.given_flags``); a demo-model
            flag among them that a Hugging Face model does not read is an error.
    """
    if args.max_restarts < 0:
        raise ValueError(f"--max-restarts {args.max_restarts}: must be >= 0")
    for flag in ("steps", "nproc", "log_every", "heads", "seq_len", "batch_size"):
        if getattr(args, flag) < 1:
            raise ValueError(f"{_flag(flag)} {getattr(args, flag)}: must be >= 1")
    if args.d_model % args.heads:
        raise ValueError(f"--d-model {args.d_model} is not divisible by --heads {args.heads}; choose "
                         "heads that divide the model width")
    if args.ep_size is not None and args.ep_size < 1:
        raise ValueError(f"--ep-size {args.ep_size}: must be >= 1 (leave it out for the default)")
    ep_size = args.ep_size or world_size
    if world_size % ep_size:
        raise ValueError(f"--ep-size {ep_size} does not divide the world size {world_size}; "
                         "choose an ep size that divides it")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise ValueError(f"--lr {args.lr}: must be a finite number > 0")
    if not (math.isfinite(args.clip_grad) and args.clip_grad >= 0):
        raise ValueError(f"--clip-grad {args.clip_grad}: must be a finite number >= 0 (0 turns clipping off)")
    if args.ckpt_every < 0 or not args.timeout_s > 0:
        raise ValueError(f"--ckpt-every {args.ckpt_every} must be >= 0 and --timeout-s {args.timeout_s} > 0")
    if args.simulate_failure and not re.fullmatch(FAILURE_PATTERN, args.simulate_failure):
        raise ValueError(f"--simulate-failure {args.simulate_failure!r}: expected RANK:STEP or RANK:STEP:hang, "
                         "e.g. 1:5")
    if args.deepspeed_config and not Path(args.deepspeed_config).is_file():
        raise ValueError(f"--deepspeed-config {args.deepspeed_config}: no such file")
    if args.hf_model or args.hf_path:
        _check_hf(args, ep_size, given)
    else:
        if args.layers < 2:
            raise ValueError(f"--layers {args.layers}: every other block is MoE (the 2nd, 4th, ...), so the "
                             "model needs --layers >= 2")
        check_experts_split(args.experts, ep_size, "--experts", "--ep-size")
        moe_config(args, world_size)


def _check_hf(args: argparse.Namespace, ep_size: int, given: frozenset[str]) -> None:
    """The ``--hf-model`` / ``--hf-path`` part of ``check_flags``."""
    source = f"--hf-path {args.hf_path}" if args.hf_path else f"--hf-model {args.hf_model}"
    if find_spec("transformers") is None:
        raise ValueError(f"{source} needs transformers; install it: pip install -e \".[launch,huggingface]\"")
    for dest in TOY_ONLY + (SIZES if args.hf_path else ()):
        if dest in given:
            why = ("the model routes with its own router" if dest in TOY_ONLY
                   else "the saved config fixes the model's sizes")
            raise ValueError(f"{_flag(dest)} {getattr(args, dest)} does not apply to {source} ({why}); "
                             f"remove {_flag(dest)}")
    from launch.hf import bias_update_override, saved_model_info, sparse_blocks, tiny_hf_config

    if args.hf_path:
        info = saved_model_info(args.hf_path)
        config = info["config"]
        if args.hf_model and args.hf_model != info["model_type"]:
            raise ValueError(f"--hf-model {args.hf_model} and --hf-path {args.hf_path} disagree: the saved model is "
                             f"{info['model_type']}; remove --hf-model")
        vocab = CharCorpus.named(args.corpus).vocab_size
        if info["vocab_size"] < vocab:
            raise ValueError(f"--hf-path {args.hf_path} has vocab_size {info['vocab_size']}, fewer than the "
                             f"{vocab} characters of --corpus {args.corpus}; start from a model trained on it")
        if info["max_position_embeddings"] < args.seq_len + 1:
            raise ValueError(f"--seq-len {args.seq_len}: --hf-path {args.hf_path} holds at most "
                             f"{info['max_position_embeddings']} positions (seq len + 1); lower --seq-len")
        experts = info["num_experts"]
    else:
        experts = args.experts
        if args.experts < TOP_K:
            raise ValueError(f"--experts {args.experts}: the tiny models route each token to {TOP_K} experts; "
                             f"choose --experts >= {TOP_K}")
        if (args.d_model // args.heads) % 2:
            raise ValueError(f"--d-model {args.d_model} / --heads {args.heads} is an odd head width; rotary "
                             "embeddings need an even one")
        if args.layers < 1:
            raise ValueError(f"--layers {args.layers}: must be >= 1")
        config = tiny_hf_config(args, CharCorpus.named(args.corpus).vocab_size)
        if not sparse_blocks(config):
            raise ValueError(f"--layers {args.layers}: the tiny {args.hf_model} model has no sparse-MoE block with "
                             f"{config.num_hidden_layers} layers (its sparse ones start later); choose more --layers")
    bias_update_override(getattr(args, "bias_update_rate", 0.0), config)  # a selection bias to update
    name = f"{source} num_experts" if args.hf_path else "--experts"  # a saved model's count is fixed
    check_experts_split(experts, ep_size, name, "--ep-size", fixed=bool(args.hf_path))
    if args.deepspeed_config:
        _check_deepspeed_for_hf(args.deepspeed_config)


def _check_deepspeed_for_hf(path: str) -> None:
    """A converted model under DeepSpeed: ZeRO stage 1 or 2 (stage 3 does not take DeepSpeed MoE
    layers; without ZeRO the engine's MoE checkpoints are untested here)."""
    stage = json.loads(Path(path).read_text()).get("zero_optimization", {}).get("stage", 0)
    if stage not in (1, 2):
        raise ValueError(f"--deepspeed-config {path}: zero_optimization.stage {stage} with a Hugging Face model; "
                         "use stage 1 or 2 (e.g. launch/ds_zero2_bf16.json)")
