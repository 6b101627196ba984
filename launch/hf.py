"""Hugging Face transformers MoE models for the demo job (``--hf-model`` / ``--hf-path``).

The model is a tiny random one built from its transformers config class (no download) or a local
``save_pretrained`` directory, converted in place by
``expert_parallel.integrations.huggingface.convert`` (each sparse-MoE block becomes an
``MoELayer`` holding this rank's experts), trained on the model's own LM loss (plus its router aux
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

# --hf-model: the architectures a tiny random model is built for
HF_MODELS = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3")
TOP_K = 2  # experts per token of every tiny model
PROBE = "hf_probe.pt"  # OUT/hf_probe.pt: a batch and the trained converted model's logits on it


def tiny_config(name: str, vocab_size: int, d_model: int, d_ff: int, experts: int, layers: int, heads: int,
                max_positions: int) -> Any:
    """The transformers config of a tiny ``name`` model (one of ``HF_MODELS``).

    Every block is sparse (DeepSeek-V3: all but the first, ``first_k_dense_replace=1``), ``TOP_K``
    experts per token of ``experts`` of width ``d_ff`` (Qwen2-MoE and DeepSeek-V3 add one shared
    expert of that width), ``heads`` attention heads (DeepSeek-V3's MLA with ranks ``d_model / 2``).
    Mixtral and Qwen record router logits (``output_router_logits=True``), so their ``loss``
    includes ``router_aux_loss_coef * aux_loss`` (the config class's default coefficient);
    DeepSeek-V3 has no router aux loss in transformers.
    """
    import transformers

    head_dim = d_model // heads
    common = dict(vocab_size=vocab_size, hidden_size=d_model, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=heads, intermediate_size=d_ff, max_position_embeddings=max_positions,
                  num_experts_per_tok=TOP_K, tie_word_embeddings=False)
    if name == "mixtral":
        return transformers.MixtralConfig(**common, num_local_experts=experts, output_router_logits=True)
    if name == "qwen2_moe":
        return transformers.Qwen2MoeConfig(**common, num_experts=experts, moe_intermediate_size=d_ff,
                                           shared_expert_intermediate_size=d_ff, output_router_logits=True)
    if name == "qwen3_moe":
        return transformers.Qwen3MoeConfig(**common, num_experts=experts, moe_intermediate_size=d_ff,
                                           head_dim=head_dim, norm_topk_prob=True, output_router_logits=True)
    if name == "deepseek_v3":
        n_group = 2 if experts % 2 == 0 and experts >= 4 else 1  # group-limited routing: the best group
        return transformers.DeepseekV3Config(
            **common, n_routed_experts=experts, n_shared_experts=1, moe_intermediate_size=d_ff,
            first_k_dense_replace=1, n_group=n_group, topk_group=1, q_lora_rank=d_model // 2,
            kv_lora_rank=d_model // 2, qk_nope_head_dim=head_dim, qk_rope_head_dim=max(2, head_dim // 4 * 2),
            v_head_dim=head_dim)
    raise ValueError(f"--hf-model {name!r} is unknown; choose one of {list(HF_MODELS)}")


def saved_model_info(path: str) -> dict[str, Any]:
    """What ``check_flags`` needs of a ``save_pretrained`` directory, read from its config only:
    ``model_type``, ``num_experts`` (routed experts per block), ``vocab_size``,
    ``max_position_embeddings``.

    Raises:
        ValueError: no config there, a model type the integration does not convert, or a config
            value its conversion does not implement (one line each).
    """
    if not (Path(path) / "config.json").is_file():
        raise ValueError(f"--hf-path {path}: no config.json there; pass a directory written by save_pretrained "
                         "(e.g. OUT/hf of an earlier --hf-model run)")
    import transformers

    from expert_parallel.integrations.huggingface import SPECS

    config = transformers.AutoConfig.from_pretrained(path)
    specs = {spec.name: spec for spec in SPECS}
    if config.model_type not in specs:
        raise ValueError(f"--hf-path {path}: a {config.model_type!r} model, which the Hugging Face integration "
                         f"does not convert; supported: {sorted(specs)}")
    fields = specs[config.model_type].moe_fields(config)
    return {"model_type": config.model_type, "num_experts": fields["num_experts"], "vocab_size": config.vocab_size,
            "max_position_embeddings": config.max_position_embeddings}


def build_hf_model(args: Any, vocab_size: int, ep_size: int) -> nn.Module:
    """The converted model of this run, in fp32 on the CPU, the same on every rank before the
    conversion keeps this rank's experts (seed ``args.seed``). Collective when ``ep_size > 1``."""
    import transformers

    from expert_parallel.integrations.huggingface import convert

    torch.manual_seed(args.seed)
    if args.hf_path:
        model = transformers.AutoModelForCausalLM.from_pretrained(args.hf_path, dtype=torch.float32)
    else:
        config = tiny_config(args.hf_model, vocab_size, args.d_model, args.d_ff, args.experts, args.layers,
                             args.heads, max_positions=max(256, args.seq_len + 1))
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return convert(model, ep_size=ep_size, **bias_update_override(getattr(args, "bias_update_rate", 0.0),
                                                                  model.config.model_type))


def bias_update_override(rate: float, model_type: str) -> dict[str, float]:
    """``convert``'s override for ``--bias-update-rate``: ``{"bias_update_rate": rate}`` for a model
    whose router has a selection bias (DeepSeek-V3), nothing for rate 0.

    Raises:
        ValueError: a rate for a model without a selection bias.
    """
    if not rate:
        return {}
    from expert_parallel.integrations.huggingface import SPECS

    if not any(spec.name == model_type and dict(spec.fixed).get("selection_bias") for spec in SPECS):
        raise ValueError(f"--bias-update-rate {rate}: a {model_type} model's router has no selection bias to "
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
        self.aux_coef = config.router_aux_loss_coef if getattr(config, "output_router_logits", False) else 0.0
        self.blocks = converted_blocks(model)

    def __call__(self, model: nn.Module, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, list[RoutingStats]]:
        ids = lm_window(inputs, targets)
        out = model(input_ids=ids, labels=ids, use_cache=False)
        aux = self.aux_coef * out.aux_loss.float() if self.aux_coef else out.loss.new_zeros(())
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
