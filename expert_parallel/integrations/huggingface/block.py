"""The converted block: a Hugging Face sparse-MoE block's call and return around an ``MoELayer``."""

from __future__ import annotations

from typing import Iterator, Optional, Union

import torch
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from ...checkpoint import expert_shards
from ...config import MoEConfig
from ...layer import MoELayer
from ...stats import RoutingStats
from .compat import recorded
from .masking import current_token_mask
from .specs import BlockSpec, hf_to_ours, join_parts, ours_to_hf


class ExpertParallelBlock(nn.Module):
    """Stands in for one Hugging Face sparse-MoE block (its ``spec.block``), built on ``MoELayer``.

    ``forward(hidden_states [B, T, D]) -> [B, T, D]``, the call and return of the Hugging Face
    blocks in transformers 5.22-5.25 (a tensor; ``(tensor, router logits)`` where the HF block
    returns a pair, ``spec.returns_logits``); any ``[..., D]``, ``B = 0`` included, and EP ranks
    may pass different shapes (with the default dropless layer, agreed per batch). While the
    model collects router logits (``output_router_logits=True``), the block appends its logits
    ``[B*T, E]`` (fp32, ``Router.logits``: from the un-jittered input, with the router's bias and
    soft cap; one extra ``[S, D] x [D, E]`` matmul, only then or where the block returns them) to
    the model's ``spec.record_key`` output, so ``outputs.router_logits`` and the model's own
    load-balancing ``aux_loss`` work as before. The layer's own ``aux_loss`` is not used; its
    stats of the latest forward are ``stats``. The padding of the model's ``attention_mask`` is
    not routed (``masking.pass_attention_mask``).

    Attributes:
        spec: the ``BlockSpec`` it was converted with.
        moe: the ``MoELayer`` (router, this rank's experts, shared experts).
        hf_keys: the HF block's state-dict keys, in its order (``hf_state_dict`` keeps it).
        stats: the ``RoutingStats`` of the latest forward (``None`` before the first).
    """

    stats: Optional[RoutingStats] = None

    def __init__(self, spec: BlockSpec, moe: MoELayer, hf_keys: tuple[str, ...]) -> None:
        super().__init__()
        self.spec = spec
        self.moe = moe
        self.hf_keys = hf_keys

    @classmethod
    def from_hf(cls, block: nn.Module, spec: BlockSpec, cfg: MoEConfig,
                ep_group: Optional[ProcessGroup]) -> ExpertParallelBlock:
        """Build the layer for ``cfg`` and move the HF ``block`` 's tensors in: the router, this
        rank's experts (``ep_rank * E_local`` on), the shared experts, router buffers. The tensors
        keep the block's dtype and device; the caller's RNG is left as it was.

        Raises:
            ValueError: a tensor the spec maps is missing on either side.
        """
        with torch.random.fork_rng(devices=[]):  # the random init is overwritten below
            moe = MoELayer(cfg, ep_group)
        hf_state, ours_state, weights = block.state_dict(), moe.state_dict(), spec.weights_for(cfg)
        missing = [wm.ours for wm in weights if wm.ours not in ours_state]
        if missing:
            raise ValueError(f"{spec.block}: MoELayer has no {missing} for this config; this expert_parallel lacks a "
                             "feature the spec needs (update expert_parallel, or fix the spec)")
        first = moe.first_expert
        state = {wm.ours: hf_to_ours(hf_state[wm.hf], wm, tuple(ours_state[wm.ours].shape), first if wm.sharded else 0)
                 for wm in weights}
        moe.load_state_dict(state, strict=False, assign=True)
        # tensors without an HF counterpart follow; the expert compute is chosen again for the device and dtype
        moe.to(hf_state[weights[0].hf].device)
        return cls(spec, moe, tuple(hf_state))

    def forward(self, hidden_states: Tensor) -> Union[Tensor, tuple[Tensor, Tensor]]:
        """``[B, T, D] -> [B, T, D]`` (any ``[..., D]``), or ``(that, router logits [B*T, E])``
        where the HF block returns a pair (``spec.returns_logits``); see the class docstring."""
        sink = recorded(self.spec.record_key)
        logits = (self.moe.router.logits(hidden_states.reshape(-1, hidden_states.shape[-1]))
                  if sink is not None or self.spec.returns_logits else None)
        if sink is not None:
            sink.append(logits)
        out = self.moe(hidden_states, token_mask=current_token_mask(hidden_states))
        self.stats = out.stats
        return (out.output, logits) if self.spec.returns_logits else out.output

    def hf_state_dict(self, state: Optional[dict[str, Tensor]] = None) -> dict[str, Tensor]:
        """This block's tensors under the HF block's keys, with every expert: the routed experts
        are gathered from the EP group (one all-gather per weight; every rank of the group must
        call this, blocks in the same order). Tensors may share storage with the parameters.

        Args:
            state: this rank's tensors under ``self.moe.state_dict()`` 's keys (default: the
                layer's own), e.g. from a state dict of the whole model.

        Raises:
            ValueError: ``state`` lacks a tensor the spec maps.
        """
        return dict(self.hf_items(state))

    def hf_items(self, state: Optional[dict[str, Tensor]] = None) -> Iterator[tuple[str, Tensor]]:
        """``hf_state_dict`` one tensor at a time, in the HF block's order: each routed-expert
        tensor is gathered when its turn comes (collective, as ``hf_state_dict``), so a caller that
        writes and drops each holds one gathered tensor at a time."""
        shards = expert_shards(self.moe)  # the checkpoint's logical tensors: one way to gather experts
        state = self.moe.state_dict() if state is None else state
        weights = self.spec.weights_for(self.moe.cfg)
        missing = sorted(wm.ours for wm in weights if wm.ours not in state)
        if missing:
            raise ValueError(f"the state dict of a converted {self.spec.block} lacks {missing}; pass a whole "
                             "model.state_dict() (or none) to save the block")
        for key in self.hf_keys:
            parts: dict[int, Tensor] = {}
            for wm in (wm for wm in weights if wm.hf == key):
                value = state[wm.ours].detach()
                if wm.sharded:
                    value = shards[wm.ours].gather(value)
                parts[wm.part[0]] = ours_to_hf(value, wm)
            yield key, join_parts(parts, next(wm.layout for wm in weights if wm.hf == key))

    def extra_repr(self) -> str:
        return f"converted from {self.spec.block}"
