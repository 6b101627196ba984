"""Small builders shared by the layer tests (not tests themselves)."""

from __future__ import annotations

import torch

from expert_parallel import MoEConfig, MoELayer

D_MODEL, D_FF, NUM_EXPERTS = 8, 12, 4


def make_layer(seed: int = 0, **overrides) -> MoELayer:
    """A small layer with a decisive router (weights scaled up so top-2 is never a near tie)."""
    fields = dict(d_model=D_MODEL, d_ff=D_FF, num_experts=NUM_EXPERTS)
    fields.update(overrides)
    torch.manual_seed(seed)
    layer = MoELayer(MoEConfig(**fields))
    with torch.no_grad():
        layer.router.weight.mul_(3.0)
        for name in ("b1", "b2"):
            bias = getattr(layer.experts, name)
            if bias is not None:
                bias.normal_()  # clearly non-zero, so a missing bias is visible
    return layer


def make_input(num_tokens: int, seed: int = 1, d_model: int = D_MODEL) -> torch.Tensor:
    return torch.randn(num_tokens, d_model, generator=torch.Generator().manual_seed(seed))


def uniforms(num_tokens: int, seed: int = 2) -> torch.Tensor:
    return torch.rand(num_tokens, generator=torch.Generator().manual_seed(seed))


def inject_uniforms(monkeypatch, uniform_S: torch.Tensor) -> None:
    """Make the layer's GShard ``random`` policy draw exactly ``uniform_S``."""

    def fake_rand(*size, **kwargs):
        shape = tuple(size[0]) if len(size) == 1 and not isinstance(size[0], int) else tuple(size)
        assert shape == tuple(uniform_S.shape), f"unexpected draw of shape {shape}"
        return uniform_S.clone()

    monkeypatch.setattr(torch, "rand", fake_rand)
