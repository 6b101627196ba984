"""Every supported Hugging Face family: one ``BlockSpec`` per sparse-MoE block, gathered from the
modules of this package (one module per group of families). ``convert`` looks a block up by its
class name (``SPECS_BY_BLOCK``); the launcher and the docs' families table read ``SPECS``."""

from __future__ import annotations

from ..specs import BlockSpec
from . import classic, experts, hybrid, sigmoid, softmax

SPECS: tuple[BlockSpec, ...] = (*classic.SPECS, *softmax.SPECS, *sigmoid.SPECS, *experts.SPECS, *hybrid.SPECS)
SPECS_BY_BLOCK: dict[str, BlockSpec] = {spec.block: spec for spec in SPECS}
SPECS_BY_NAME: dict[str, BlockSpec] = {spec.name: spec for spec in SPECS}
