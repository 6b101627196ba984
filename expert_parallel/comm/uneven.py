"""Ranks that run out of data: ``UnevenInputs``, a joinable for ``torch.distributed.algorithms.Join``
that shadows the MoE layers' collectives for the ranks that have joined."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.join import Join, Joinable, JoinHook

from ..config import MoEConfig
from .agreement import device_for_backend


def moe_layers(model: nn.Module) -> list[nn.Module]:
    """Every MoE layer of ``model`` in module order, found by structure (a module holding an
    ``MoEConfig`` as ``cfg`` and its EP ranks as ``ep_ranks``; converted Hugging Face blocks hold
    theirs as ``block.moe``), so comm/ does not import the layer."""
    return [m for m in model.modules() if isinstance(getattr(m, "cfg", None), MoEConfig) and hasattr(m, "ep_ranks")]


class _Shadow(JoinHook):
    def __init__(self, uneven: UnevenInputs) -> None:
        self.uneven = uneven

    def main_hook(self) -> None:
        """One iteration of a joined rank: every MoE layer, in module order, on an empty input,
        chained so that the backward runs through them in reverse (as on the active ranks)."""
        uneven, link = self.uneven, None
        for layer in uneven.layers:
            weight = next(layer.parameters())
            x = torch.zeros(0, layer.cfg.d_model, device=weight.device, dtype=weight.dtype,
                            requires_grad=uneven.backward)
            x = x if link is None else x + link
            out = layer(x)
            link = out.output.sum() + out.aux_loss
        if uneven.backward and link is not None:
            link.backward()


class UnevenInputs(Joinable):
    """Lets ranks with fewer batches serve their peers' MoE all-to-alls: use it as
    ``with Join([UnevenInputs(model)]):`` (after DDP's own joinable: ``Join([ddp_model,
    UnevenInputs(model)])``), as DDP does for uneven inputs.

    Contract: each iteration calls ``model`` once (a forward pre-hook notifies the join context),
    every MoE layer once, in module order, and with ``backward=True`` one backward through all of
    them (training), with every MoE layer's input requiring grad (as behind any trained layer:
    the all-to-alls' backwards must match on every rank); ``backward=False`` for forward-only
    loops (evaluation, generation). A rank
    that has joined runs every MoE layer on an empty ``[0, d_model]`` input per iteration (and
    the backward), so its experts still compute, and receive the gradients of, its peers' tokens.

    Args:
        model: the model holding the MoE layers (``moe_layers``).
        backward: whether the active ranks run a backward each iteration.
    """

    def __init__(self, model: nn.Module, backward: bool = True) -> None:
        super().__init__()
        self.model, self.backward = model, backward
        self.layers = moe_layers(model)
        if not self.layers:
            raise ValueError(f"UnevenInputs found no MoE layer in {type(model).__name__}; pass the model "
                             "that holds the MoELayer modules")
        model.register_forward_pre_hook(self._notify)

    def _notify(self, module: nn.Module, args: tuple) -> None:
        """Each model call on an active rank: tell the join context (its all-reduce, if this is
        the first joinable); returns ``None`` so the model's input stays as it is."""
        Join.notify_join_context(self)

    def join_hook(self, **kwargs: object) -> JoinHook:
        """The hook that shadows the MoE layers on a joined rank."""
        return _Shadow(self)

    @property
    def join_device(self) -> torch.device:
        device = next(self.layers[0].parameters()).device
        return device_for_backend(str(dist.get_backend(self.join_process_group)), device)

    @property
    def join_process_group(self) -> dist.ProcessGroup:
        return dist.group.WORLD
