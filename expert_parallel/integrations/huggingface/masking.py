"""The model's attention mask, passed through to the converted blocks as their token mask.

A Hugging Face decoder calls its sparse-MoE block with the hidden states only; the padding the
model's ``attention_mask [B, T]`` marks would be routed like any token. ``pass_attention_mask``
hooks every ``PreTrainedModel`` of a converted model so that, while one runs, its 2-D attention
mask is the converted blocks' ``token_mask`` (``MoELayer.forward``): padding takes no expert slot,
outputs 0 and counts in no loss or statistic.
"""

from __future__ import annotations

from contextvars import ContextVar, Token
from typing import Any, Optional

from torch import Tensor, nn
from transformers import PreTrainedModel

_ATTENTION_MASK: ContextVar[Optional[Tensor]] = ContextVar("expert_parallel_attention_mask", default=None)


def pass_attention_mask(model: nn.Module) -> None:
    """Hook every ``PreTrainedModel`` in ``model`` (itself included): its ``attention_mask``
    argument is the current mask while its forward runs (``current_token_mask``)."""
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and not getattr(module, "_passes_attention_mask", False):
            tokens: list[Token] = []
            module.register_forward_pre_hook(_enter(tokens), with_kwargs=True)
            module.register_forward_hook(_exit(tokens), always_call=True)
            module._passes_attention_mask = True


def _enter(tokens: list[Token]):  # noqa: ANN202 - a hook
    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        usable = isinstance(mask, Tensor) and mask.dim() == 2
        tokens.append(_ATTENTION_MASK.set(mask if usable else None))
    return hook


def _exit(tokens: list[Token]):  # noqa: ANN202 - a hook
    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        if tokens:
            _ATTENTION_MASK.reset(tokens.pop())
    return hook


def current_token_mask(hidden_states: Tensor) -> Optional[Tensor]:
    """The running model's attention mask as a bool token mask of ``hidden_states [B, T, D]``
    (its last ``T`` columns, which a cached generation step keeps), or ``None`` without one or
    where the shapes do not match."""
    mask = _ATTENTION_MASK.get()
    if mask is None or hidden_states.dim() != 3:
        return None
    batch, length = hidden_states.shape[:2]
    if mask.shape[0] != batch or mask.shape[1] < length:
        return None
    return mask[:, mask.shape[1] - length:].bool()
