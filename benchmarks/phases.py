"""The layer's forward, phase by phase, from the library's public step functions.

``PhaseMirror`` repeats ``MoELayer.forward`` (route -> plan -> pack -> dispatch -> experts ->
return -> combine) with a ``Clock`` mark after each phase, and cuts the autograd graph between
phases (``detach().requires_grad_()``), so the backward can run phase by phase in reverse order
with the saved gradients and each phase's backward gets a time of its own. ``check_against_layer``
asserts the mirror's output and input gradient equal the real layer's, so the mirror cannot
drift from ``layer.py`` unnoticed.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from expert_parallel import MoELayer
from expert_parallel.comm import dispatch, lookup, undispatch
from expert_parallel.layout import assign_slots, combine, kept_weights, pack
from expert_parallel.routing import route, weighted_aux_loss
from expert_parallel.stats import routing_stats

from .timing import Clock

PHASES = ("route", "plan", "pack", "dispatch", "experts", "return", "combine")
ONES = "ones"  # the gradient of a summed loss
GradSource = Union[Tensor, str]


def _cut(tensor: Tensor) -> Tensor:
    """A new leaf with the same value: the graph stops here and its ``.grad`` collects the
    gradient the later phases send back."""
    return tensor.detach().requires_grad_(tensor.requires_grad)


class PhaseMirror:
    """One forward+backward of ``layer`` on ``x``, timed phase by phase.

    Call ``step(clock)``: marks ``fwd/<phase>`` for the forward phases, then ``bwd/<phase>``
    for the backward of every phase that has one, and returns the output ``[..., d_model]``.
    The loss is ``output.sum() + aux_loss``, the same as the layer benchmark's.
    """

    def __init__(self, layer: MoELayer, x: Tensor) -> None:
        self.layer, self.x = layer, x
        self._tape: list[tuple[str, list[Tensor], list[GradSource]]] = []

    def forward(self, clock: Optional[Clock] = None) -> Tensor:
        """The layer's forward with a mark after every phase; records what backward needs."""
        layer, x, mark = self.layer, self.x, (clock.mark if clock else lambda name: None)
        cfg, group = layer.cfg, lookup(layer.ep_ranks)
        tape = self._tape = []
        x_SD = x.reshape(-1, cfg.d_model)
        logits_SE, noise_std_SE = layer.router.gate(x_SD)
        routing = route(logits_SE, cfg, training=layer.training, noise_std_SE=noise_std_SE)
        nonfinite = (~torch.isfinite(logits_SE)).any(dim=-1).sum()
        aux_loss = weighted_aux_loss(routing.losses, cfg, routing.probs_SE)
        weight_SK, tokens_SD = _cut(routing.weight_SK), _cut(x_SD)
        tape.append(("route", [routing.weight_SK, aux_loss, x_SD], [weight_SK, ONES, tokens_SD]))
        mark("fwd/route")
        slots = assign_slots(routing.expert_SK, routing.active_SK, cfg.num_experts, routing.priority_SK)
        # the layer's own capacity rule (no collective when the capacity is fixed)
        capacity = layer._capacity(x_SD.shape[0], slots.count_E, nonfinite, group, routing.capacity)
        plan = slots.plan(capacity)
        mark("fwd/plan")

        def phase(name: str, value: Tensor) -> Tensor:
            """Record ``value`` as phase ``name``'s output and start the next phase from a cut."""
            cut = _cut(value)
            tape.append((name, [value], [cut]))
            mark(f"fwd/{name}")
            return cut

        packed = phase("pack", pack(tokens_SD, plan))
        received = phase("dispatch", dispatch(packed, cfg.ep_size, group))
        computed = phase("experts", layer.experts(received))
        returned = phase("return", undispatch(computed, cfg.ep_size, group))
        y_SD = combine(returned, plan, kept_weights(weight_SK, plan, routing.renormalize_kept))
        routing_stats(routing, plan, nonfinite)
        output = y_SD.view(x.shape).to(x.dtype)
        tape.append(("combine", [output], [ONES]))
        mark("fwd/combine")
        return output

    def backward(self, clock: Optional[Clock] = None) -> None:
        """Backward of every recorded phase, last first, each fed the gradients of its outputs."""
        for name, outputs, sources in reversed(self._tape):
            pairs = [(out, torch.ones_like(out) if isinstance(src, str) else src.grad)
                     for out, src in zip(outputs, sources) if out.requires_grad]
            pairs = [(out, grad) for out, grad in pairs if grad is not None]
            if pairs:
                torch.autograd.backward([p[0] for p in pairs], [p[1] for p in pairs])
            if clock is not None:
                clock.mark(f"bwd/{name}")
        self._tape = []

    def step(self, clock: Optional[Clock] = None) -> Tensor:
        """Forward then backward; returns the output."""
        output = self.forward(clock)
        self.backward(clock)
        return output


def check_against_layer(layer: MoELayer, x: Tensor) -> None:
    """Raise ``RuntimeError`` unless the mirror's output equals ``layer(x)`` exactly and its input
    gradient matches the layer's (the same random draws: the RNG state is replayed)."""
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        out = layer(x)
        (out.output.sum() + out.aux_loss).backward()
    expected_y, expected_grad = out.output.detach(), x.grad.clone()
    x.grad = None
    mirrored = PhaseMirror(layer, x).step()
    if not torch.equal(mirrored, expected_y):
        diff = (mirrored.float() - expected_y.float()).abs().max().item()
        raise RuntimeError(f"the phase mirror's output differs from MoELayer's by {diff:.3g}: "
                           "benchmarks/phases.py no longer follows expert_parallel/layer.py")
    tolerance = 1e-5 if x.dtype == torch.float32 else 2e-2
    if not torch.allclose(x.grad, expected_grad, rtol=tolerance, atol=tolerance):
        diff = (x.grad.float() - expected_grad.float()).abs().max().item()
        raise RuntimeError(f"the phase mirror's input gradient differs from MoELayer's by {diff:.3g}")
    x.grad = None
