"""The one activation table: name -> ``nn.Module`` class (or factory), for every expert kind.

``MoEConfig.activation`` is validated against it, stacked experts apply it, plain experts build it
and the DeepSpeed integration recognises a user's activation module by it.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

from torch import nn

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU,
    "gelu_tanh": functools.partial(nn.GELU, approximate="tanh"),
    "relu": nn.ReLU,
    "silu": nn.SiLU,
}


def activation_name(module: nn.Module) -> Optional[str]:
    """The table's name for ``module`` (same class and GELU approximation), or ``None``."""
    for name, make in ACTIVATIONS.items():
        reference = make()
        if type(module) is type(reference) and getattr(module, "approximate", None) == getattr(
                reference, "approximate", None):
            return name
    return None
