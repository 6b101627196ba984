"""The layer's own phases, timed through ``MoELayer.register_phase_hook``: no copy of its forward.

``phase_step`` runs one forward+backward of the layer with a ``Clock`` mark at every phase event
the layer emits (``fwd/<phase>`` when a forward phase ends, ``bwd/<phase>`` once the backward has
passed back through it), plus ``fwd/output`` (statistics, loss weighting and the final cast, after
the last phase) and ``bwd/rest`` (what the backward does after the last phase event, e.g. the
router weight's gradient). The marks add up to the whole step, so the phases' total is the step's
time; the only cost over a plain step is the clock (a barrier per mark on the CPU).
"""

from __future__ import annotations

from torch import Tensor

from expert_parallel import MoELayer
from expert_parallel.layer import PHASES

from .timing import Clock

EXTRA_MARKS = ("fwd/output", "bwd/rest")
__all__ = ["EXTRA_MARKS", "PHASES", "phase_step"]


def phase_step(layer: MoELayer, x: Tensor, clock: Clock) -> Tensor:
    """One forward+backward of ``layer`` on ``x`` (loss ``output.sum() + aux_loss``, the layer
    benchmark's), marking ``clock`` at every phase event; returns the output."""
    handle = layer.register_phase_hook(clock.mark)
    try:
        out = layer(x)
        clock.mark("fwd/output")
        (out.output.sum() + out.aux_loss).backward()
        clock.mark("bwd/rest")
    finally:
        handle.remove()
    return out.output
