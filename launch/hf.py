"""Hugging Face transformers MoE models for the demo job (``--hf-model`` / ``--hf-path``).

The model is a tiny random one of any supported family (``--hf-model NAME``, the library's
``tiny.tiny_config``: no download), converted in place by
``expert_parallel.integrations.huggingface.convert``, or a local ``save_pretrained`` directory
(``--hf-path``) read by ``expert_parallel.integrations.huggingface.from_pretrained`` (only this
rank's experts); either way each sparse-MoE block becomes an ``MoELayer`` holding this rank's
experts. It is trained on the model's own LM loss (plus its router aux
loss when its config has ``output_router_logits``) and saved back to a plain transformers
checkpoint at the end. ``transformers`` is imported only here, and only when one of these flags
is given.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from expert_parallel import RoutingStats

TOP_K = 2  # experts per token of every tiny model
PROBE = "hf_probe.pt"  # OUT/hf_probe.pt: a batch and the trained converted model's logits on it
HF_MODELS_HELP = ("a supported transformers MoE family's model_type (the table in docs/huggingface.md; an unknown "
                  "name lists them), e.g. mixtral, qwen3_moe, deepseek_v3")


def tiny_hf_config(args: Any, vocab_size: int) -> Any:
    """The transformers config of the tiny random ``--hf-model`` model of this run: the library's
    ``tiny.tiny_config`` with the run's sizes (``TOP_K`` of ``--experts`` experts of width
    ``--d-ff``, ``--layers`` sparse blocks (plus the dense first blocks a family has), ``--heads``
    attention and key-value heads) and router logits recorded where the family has them (its
    ``loss`` then includes ``router_aux_loss_coef * aux_loss``).

    Raises:
        ValueError: ``--hf-model`` names no supported family (the message lists them).
    """
    from expert_parallel.integrations.huggingface.specs import TinySizes
    from expert_parallel.integrations.huggingface.tiny import tiny_config

    sizes = TinySizes(vocab_size=vocab_size, d_model=args.d_model, d_ff=args.d_ff, experts=args.experts, top_k=TOP_K,
                      layers=args.layers, heads=args.heads, kv_heads=args.heads,
                      max_positions=max(256, args.seq_len + 1))
    try:
        return tiny_config(args.hf_model, sizes)
    except ValueError as error:
        raise ValueError(f"--hf-model {args.hf_model}: {error}") from None


def family_spec(config: Any) -> Any:
    """The ``BlockSpec`` of a transformers config's family (by ``model_type``).

    Raises:
        ValueError: a model type the integration does not convert.
    """
    from expert_parallel.integrations.huggingface import SPECS

    spec = next((spec for spec in SPECS if config.model_type in (spec.name, spec.config_type)), None)
    if spec is None:
        raise ValueError(f"a {config.model_type!r} model, which the Hugging Face integration does not convert; "
                         f"supported: {sorted(spec.name for spec in SPECS)}")
    return spec


def sparse_blocks(config: Any) -> int:
    """The sparse-MoE blocks of a model with ``config`` (built on the meta device: no memory)."""
    from expert_parallel.integrations.huggingface import causal_lm_class
    from expert_parallel.integrations.huggingface.families import SPECS_BY_BLOCK

    with torch.device("meta"):
        model = causal_lm_class(config)._from_config(config)
    return sum(type(module).__name__ in SPECS_BY_BLOCK for module in model.modules())


def saved_model_info(path: str) -> dict[str, Any]:
    """What ``check_flags`` needs of a ``save_pretrained`` directory, read from its config only:
    ``model_type``, ``num_experts`` (routed experts per block), ``vocab_size``,
    ``max_position_embeddings`` and the transformers ``config``.

    Raises:
        ValueError: no config there, a model type the integration does not convert, or a config
            value its conversion does not implement (one line each).
    """
    if not (Path(path) / "config.json").is_file():
        raise ValueError(f"--hf-path {path}: no config.json there; pass a directory written by save_pretrained "
                         "(e.g. OUT/hf of an earlier --hf-model run)")
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    try:
        fields = family_spec(config).moe_fields(config)
    except ValueError as error:
        raise ValueError(f"--hf-path {path}: {error}") from None
    return {"model_type": config.model_type, "num_experts": fields["num_experts"], "vocab_size": config.vocab_size,
            "max_position_embeddings": config.max_position_embeddings, "config": config}


def build_hf_model(args: Any, vocab_size: int, ep_size: int) -> nn.Module:
    """The converted model of this run, in fp32 on the CPU. ``--hf-model``: the tiny random model,
    the same on every rank (seed ``args.seed``) before the conversion keeps this rank's experts;
    ``--hf-path``: read by ``from_pretrained``, only this rank's experts. Collective when
    ``ep_size > 1``."""
    import transformers

    from expert_parallel.integrations.huggingface import causal_lm_class, convert, from_pretrained

    torch.manual_seed(args.seed)
    rate = getattr(args, "bias_update_rate", 0.0)
    if args.hf_path:
        config = transformers.AutoConfig.from_pretrained(args.hf_path)
        return from_pretrained(args.hf_path, ep_size=ep_size, dtype=torch.float32,
                               **bias_update_override(rate, config))
    config = tiny_hf_config(args, vocab_size)
    model = causal_lm_class(config)._from_config(config, dtype=torch.float32)
    return convert(model, ep_size=ep_size, **bias_update_override(rate, config))


def bias_update_override(rate: float, config: Any) -> dict[str, float]:
    """``convert``'s override for ``--bias-update-rate``: ``{"bias_update_rate": rate}`` for a model
    (of transformers config ``config``) whose router has a selection bias (its spec sets
    ``selection_bias``, e.g. DeepSeek-V3's), nothing for rate 0.

    Raises:
        ValueError: a rate for a model without a selection bias.
    """
    if not rate:
        return {}
    if not family_spec(config).moe_fields(config).get("selection_bias"):
        raise ValueError(f"--bias-update-rate {rate}: a {config.model_type} model's router has no selection bias to "
                         "update (DeepSeek-V3's has); remove --bias-update-rate")
    return {"bias_update_rate": rate}


def converted_blocks(model: nn.Module) -> list[nn.Module]:
    """Every converted block (``ExpertParallelBlock``), in module order."""
    from expert_parallel.integrations.huggingface import ExpertParallelBlock

    return [module for module in model.modules() if isinstance(module, ExpertParallelBlock)]


def lm_window(inputs: Tensor, targets: Tensor) -> Tensor:
    """``[B, T+1]``: the inputs and the last target. As ``input_ids`` and ``labels`` (transformers
    shifts the labels itself) the loss covers the same ``T`` next-character targets."""
    return torch.cat([inputs, targets[:, -1:]], dim=1)


class CausalLMLoss:
    """``(model, inputs, targets) -> (LM loss, weighted router aux loss, stats)`` of a converted model.

    The model's own ``loss`` (cross-entropy in fp32, plus ``router_aux_loss_coef * aux_loss`` when
    its config has ``output_router_logits``) is split into the two parts, whose sum is what the
    backends differentiate. The stats are the ``RoutingStats`` of every converted block in this
    forward (``ExpertParallelBlock.stats``; the block returns hidden states only).

    Args:
        model: the converted model (hooks are registered on its layers).
    """

    def __init__(self, model: nn.Module) -> None:
        config = model.config
        recorded = getattr(config, "output_router_logits", False)  # DeepSeek-V2 records, but has no aux loss
        self.aux_coef = getattr(config, "router_aux_loss_coef", 0.0) if recorded else 0.0
        self.blocks = converted_blocks(model)

    def __call__(self, model: nn.Module, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, list[RoutingStats]]:
        ids = lm_window(inputs, targets)
        out = model(input_ids=ids, labels=ids, use_cache=False)
        aux = self.aux_coef * out.aux_loss.float() if self.aux_coef and out.aux_loss is not None \
            else out.loss.new_zeros(())
        return out.loss - aux, aux, [block.stats for block in self.blocks]


def save_hf(model: nn.Module, corpus: Any, out: Path, rank: int, seq_len: int) -> None:
    """Save the model as a plain transformers checkpoint in ``OUT/hf`` (every expert gathered
    back under the HF keys; collective, every rank calls it, rank 0 writes), with
    ``OUT/hf/char_vocab.json`` (the corpus's characters in id order), and ``OUT/hf_probe.pt``: a
    fixed batch and this converted model's fp32 logits on it (eval mode), which
    ``from_pretrained(OUT/hf)`` reproduces without this library."""
    was_training = model.training
    model.eval()
    inputs, targets = corpus.batch(0, 0, 2, seq_len)
    ids = lm_window(inputs, targets).to(next(model.parameters()).device)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits.float().cpu()
    model.train(was_training)
    model.save_pretrained(out / "hf")  # a converted model's: the experts gathered under the HF keys
    if rank == 0:
        (out / "hf" / "char_vocab.json").write_text(json.dumps(corpus.vocab) + "\n")
        torch.save({"input_ids": ids.cpu(), "logits": logits}, out / PROBE)
