"""A small decoder-only transformer LM whose feed-forward layers alternate dense and MoE
(GShard / GLaM style: MoE in every other block)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from expert_parallel import MoEConfig, MoELayer, RoutingStats


class Block(nn.Module):
    """Pre-norm transformer block; the feed-forward is an ``MoELayer`` when ``moe`` is given."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, moe: Optional[MoEConfig]) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = MoELayer(moe) if moe is not None else nn.Sequential(
            nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))

    def forward(self, x_BTD: Tensor) -> tuple[Tensor, Optional[Tensor], Optional[RoutingStats]]:
        """``[B, T, D] -> ([B, T, D], aux loss or None, stats or None)``."""
        batch, seq, dim = x_BTD.shape
        q, k, v = self.qkv(self.norm1(x_BTD)).view(batch, seq, 3, self.n_heads, -1).unbind(2)
        attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=True)
        x_BTD = x_BTD + self.proj(attn.transpose(1, 2).reshape(batch, seq, dim))
        hidden = self.norm2(x_BTD)
        if isinstance(self.ffn, MoELayer):
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
    """

    def __init__(self, vocab_size: int, moe: MoEConfig, n_layers: int = 4, n_heads: int = 4,
                 max_seq_len: int = 256) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, moe.d_model)
        self.position = nn.Embedding(max_seq_len, moe.d_model)
        self.blocks = nn.ModuleList(
            Block(moe.d_model, n_heads, moe.d_ff, moe if i % 2 == 1 else None) for i in range(n_layers))
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
