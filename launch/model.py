"""A small decoder-only transformer LM whose feed-forward layers alternate dense and MoE
(GShard / GLaM style: MoE in every other block)."""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from expert_parallel import MoEConfig, MoELayer, MoEOutput, RoutingStats
from expert_parallel.experts import StackedExperts, plain_expert

FFNFactory = Callable[[MoEConfig], nn.Module]


class DeepSpeedMoEFFN(nn.Module):
    """The feed-forward as ``expert_parallel.integrations.deepspeed.MoE`` (what the DeepSpeed
    engine recognises as an MoE layer), returning ``MoEOutput`` like ``MoELayer``."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        from expert_parallel.integrations.deepspeed import MoE
        from expert_parallel.integrations.deepspeed.moe import ROUTER_EXTRAS

        expert = plain_expert(cfg.expert, cfg.activation, cfg.d_model, cfg.d_ff, cfg.expert_bias)
        self.moe = MoE(hidden_size=cfg.d_model, expert=expert, num_experts=cfg.num_experts, ep_size=cfg.ep_size,
                       k=cfg.num_choices, capacity_factor=cfg.capacity_factor,
                       eval_capacity_factor=cfg.eval_capacity_factor, min_capacity=cfg.min_capacity,
                       drop_tokens=cfg.drop_tokens, router=cfg.router, check_finite=cfg.check_finite,
                       second_policy=cfg.second_policy if cfg.router == "gshard" else None,
                       second_threshold=cfg.second_threshold,
                       **{name: getattr(cfg, name) for name in ROUTER_EXTRAS})
        # DeepSpeed's l_aux is the unweighted loss; this model wants the preset's weighted sum
        inner = self.moe.deepspeed_moe
        inner.cfg = inner.cfg.replace(aux_loss_weight=cfg.aux_loss_weight)

    def forward(self, x: Tensor) -> MoEOutput:
        """``[..., D] -> MoEOutput``; the inner layer's stats, which DeepSpeed's tuple drops."""
        return self.moe.deepspeed_moe(x)


def seed_routed_experts(model: nn.Module, ep_rank: int) -> None:
    """Initialise the routed experts of ``model``'s ``DeepSpeedMoEFFN`` layers by global expert id.

    DeepSpeed's ``MoE`` copies its template into every expert, so all would start alike; this
    gives each ``StackedExperts`` shard its first global expert id (``ep_rank * E_local``, for
    DeepSpeed's consecutive EP groups) and re-draws it with ``reset_parameters``, the experts'
    own per-global-expert init. Call it with the same RNG state on every rank; shared experts and
    every other weight are left as they are.
    """
    for module in model.modules():
        if isinstance(module, StackedExperts) and module.sharded:
            module.first_expert = ep_rank * module.w1.shape[0]
            module.reset_parameters()


class Block(nn.Module):
    """Pre-norm transformer block; the feed-forward is ``moe_ffn(moe)`` when ``moe`` is given."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, moe: Optional[MoEConfig],
                 moe_ffn: FFNFactory = MoELayer) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.is_moe = moe is not None
        self.ffn = moe_ffn(moe) if moe is not None else nn.Sequential(
            nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))

    def forward(self, x_BTD: Tensor) -> tuple[Tensor, Optional[Tensor], Optional[RoutingStats]]:
        """``[B, T, D] -> ([B, T, D], aux loss or None, stats or None)``."""
        batch, seq, dim = x_BTD.shape
        q, k, v = self.qkv(self.norm1(x_BTD)).view(batch, seq, 3, self.n_heads, -1).unbind(2)
        attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=True)
        x_BTD = x_BTD + self.proj(attn.transpose(1, 2).reshape(batch, seq, dim))
        hidden = self.norm2(x_BTD)
        if self.is_moe:
            y, aux_loss, stats = self.ffn(hidden)
            return x_BTD + y, aux_loss, stats  # the residual carries dropped tokens
        return x_BTD + self.ffn(hidden), None, None


class MoETransformerLM(nn.Module):
    """Character LM: embedding, ``n_layers`` blocks (MoE in odd blocks), tied output head.

    Args:
        vocab_size: number of token ids.
        moe: config of every MoE layer (``d_model`` and ``d_ff`` are taken from it).
        n_layers: transformer blocks.
        n_heads: attention heads.
        max_seq_len: longest sequence (learned positions).
        moe_ffn: builds each MoE feed-forward from ``moe`` (``MoELayer``, or ``DeepSpeedMoEFFN``
            under the DeepSpeed engine).
    """

    def __init__(self, vocab_size: int, moe: MoEConfig, n_layers: int = 4, n_heads: int = 4,
                 max_seq_len: int = 256, moe_ffn: FFNFactory = MoELayer) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, moe.d_model)
        self.position = nn.Embedding(max_seq_len, moe.d_model)
        self.blocks = nn.ModuleList(
            Block(moe.d_model, n_heads, moe.d_ff, moe if i % 2 == 1 else None, moe_ffn) for i in range(n_layers))
        self.norm = nn.LayerNorm(moe.d_model)

    def forward(self, ids_BT: Tensor) -> tuple[Tensor, Tensor, list[RoutingStats]]:
        """``ids [B, T] -> (logits [B, T, vocab], summed aux loss, stats of every MoE layer)``."""
        positions = torch.arange(ids_BT.shape[1], device=ids_BT.device)
        x = self.embed(ids_BT) + self.position(positions)
        aux_total = x.new_zeros(())
        all_stats = []
        for block in self.blocks:
            x, aux_loss, stats = block(x)
            if aux_loss is not None:
                aux_total = aux_total + aux_loss
                all_stats.append(stats)
        return self.norm(x) @ self.embed.weight.t(), aux_total, all_stats
