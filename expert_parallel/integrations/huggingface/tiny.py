"""Tiny random models of every supported family, built from their transformers config classes (no
download): the tests and ``python -m launch.train --hf-model NAME`` use them."""

from __future__ import annotations

from typing import Any, Optional

import transformers

from .families import SPECS_BY_NAME
from .specs import TinySizes

# MoEConfig field -> the TinySizes attribute a spec's config map sets it from
SIZED = {"d_model": "d_model", "d_ff": "d_ff", "d_ff_shared": "d_ff", "num_experts": "experts", "top_k": "top_k"}


def tiny_config(name: str, sizes: Optional[TinySizes] = None) -> Any:
    """The transformers config of a tiny random ``name`` model (a spec's ``name``): ``sizes``
    (default ``TinySizes()``)
    through the spec's ``config`` map (hidden size, expert width, experts, top-k), the common
    fields (layers, heads, vocabulary, positions, a dense MLP of width ``d_ff``, untied
    embeddings, eager attention), then the spec's ``tiny`` fields. Records router logits
    (``output_router_logits=True``) where the config has that field. A sub-config's fields (a
    dotted attribute of the config map, a dict of ``spec.tiny``) are merged into one dict.

    Raises:
        ValueError: ``name`` is no supported family (the message lists them).
    """
    if name not in SPECS_BY_NAME:
        raise ValueError(f"{name!r} is not a supported Hugging Face family; choose one of {sorted(SPECS_BY_NAME)}")
    spec, sizes = SPECS_BY_NAME[name], sizes or TinySizes()
    fields: dict[str, Any] = dict(
        vocab_size=sizes.vocab_size, hidden_size=sizes.d_model, intermediate_size=sizes.d_ff,
        num_hidden_layers=sizes.layers, num_attention_heads=sizes.heads, num_key_value_heads=sizes.kv_heads,
        head_dim=sizes.d_model // sizes.heads, max_position_embeddings=sizes.max_positions, tie_word_embeddings=False)
    for field, attr in spec.config:
        if field in SIZED:  # a dotted attribute is a field of a sub-config (a dict here)
            *outer, name = attr.split(".")
            _sub(fields, outer)[name] = getattr(sizes, SIZED[field])
    for attr, value in (spec.tiny(sizes) if spec.tiny is not None else {}).items():
        fields[attr] = {**fields[attr], **value} if isinstance(value, dict) and isinstance(fields.get(attr), dict) \
            else value
    config = transformers.AutoConfig.for_model(spec.config_type or spec.name, **fields)
    if hasattr(config, "output_router_logits"):
        config.output_router_logits = True
    config._attn_implementation = "eager"
    return config


def _sub(fields: dict[str, Any], path: list[str]) -> dict[str, Any]:
    """The nested dict of ``fields`` at ``path`` (sub-config names), made where missing."""
    for name in path:
        fields = fields.setdefault(name, {})
    return fields
