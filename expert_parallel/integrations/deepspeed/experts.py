"""The user's DeepSpeed ``expert`` module, as our stacked experts or as a generic fallback.

A plain MLP (``Linear -> activation -> Linear``, with or without biases) or a SwiGLU block
(three bias-free ``Linear`` s: ``down(silu(gate(x)) * up(x))``) becomes ``StackedExperts``: one
batched matmul per weight. The structure is recognised from the module's children and then
*verified numerically* on a probe input, so a module whose ``forward`` does something else falls
back to ``GenericExperts``, which applies deep copies of the module one expert at a time, exactly as
DeepSpeed's ``Experts`` does.

Both present DeepSpeed's state-dict keys (``deepspeed_experts.<i>.<name>``): the generic path
natively, the stacked path through state-dict hooks that slice / stack the weights.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from ...activations import activation_name
from ...experts import Experts, StackedExperts, sharded_expert_parameters

_PREFIX = "deepspeed_experts"


@dataclass(frozen=True)
class ExpertSpec:
    """How a template expert maps onto ``StackedExperts``.

    Attributes:
        kind: ``"ffn"`` or ``"swiglu"`` (``MoEConfig.expert``).
        activation: ``MoEConfig.activation`` of an ffn expert (``"silu"`` for SwiGLU).
        d_ff: hidden width ``F``.
        bias: the linears carry biases (ffn only).
        keys: ``(stacked name, template key, transposed)`` triples, e.g.
            ``("w1", "0.weight", True)``: ``w1[i] = expert_i["0.weight"].T``.
    """

    kind: str
    activation: str
    d_ff: int
    bias: bool
    keys: tuple[tuple[str, str, bool], ...]


def _candidates(expert: nn.Module, d_model: int) -> list[ExpertSpec]:
    """Stacked layouts the children of ``expert`` allow (to be verified numerically)."""
    if any(True for _ in expert.named_parameters(recurse=False)) or any(True for _ in expert.buffers()):
        return []
    linears, activations = [], []
    for name, child in expert.named_children():
        if type(child) is nn.Linear:
            linears.append((name, child))
        elif activation_name(child) is not None:
            activations.append(activation_name(child))
        else:
            return []  # dropout, norms, nested blocks: not a plain MLP
    if len(linears) == 2 and len(activations) == 1:
        return [spec for up, down in itertools.permutations(linears)
                if (spec := _ffn_spec(up, down, activations[0], d_model)) is not None]
    if len(linears) == 3 and activations in ([], ["silu"]):
        return [spec for gate, up, down in itertools.permutations(linears)
                if (spec := _swiglu_spec(gate, up, down, d_model)) is not None]
    return []


def _ffn_spec(up: tuple[str, nn.Linear], down: tuple[str, nn.Linear], activation: str,
              d_model: int) -> Optional[ExpertSpec]:
    (up_name, up_lin), (down_name, down_lin) = up, down
    if (up_lin.in_features, down_lin.out_features) != (d_model, d_model) \
            or up_lin.out_features != down_lin.in_features \
            or (up_lin.bias is None) != (down_lin.bias is None):
        return None
    keys = [("w1", f"{up_name}.weight", True), ("w2", f"{down_name}.weight", True)]
    if up_lin.bias is not None:
        keys += [("b1", f"{up_name}.bias", False), ("b2", f"{down_name}.bias", False)]
    return ExpertSpec("ffn", activation, up_lin.out_features, up_lin.bias is not None, tuple(keys))


def _swiglu_spec(gate: tuple[str, nn.Linear], up: tuple[str, nn.Linear], down: tuple[str, nn.Linear],
                 d_model: int) -> Optional[ExpertSpec]:
    lins = (gate[1], up[1], down[1])
    if any(lin.bias is not None for lin in lins) or gate[1].in_features != d_model \
            or up[1].in_features != d_model or down[1].out_features != d_model \
            or not gate[1].out_features == up[1].out_features == down[1].in_features:
        return None
    keys = (("w1", f"{gate[0]}.weight", True), ("w3", f"{up[0]}.weight", True),
            ("w2", f"{down[0]}.weight", True))
    return ExpertSpec("swiglu", "silu", gate[1].out_features, False, keys)


def stacked_experts(spec: ExpertSpec, num_local_experts: int, d_model: int) -> StackedExperts:
    """Empty ``StackedExperts`` for ``spec`` (built without touching the global RNG)."""
    with torch.random.fork_rng(devices=[]):
        return StackedExperts(num_local_experts, d_model, spec.d_ff, gated=spec.kind == "swiglu",
                              activation=spec.activation, bias=spec.bias)


@torch.no_grad()
def load_template(experts: StackedExperts, spec: ExpertSpec, template: nn.Module) -> None:
    """Copy ``template`` 's weights into every local expert of ``experts``."""
    state = template.state_dict()
    for name, key, transposed in spec.keys:
        value = state[key].t() if transposed else state[key]
        getattr(experts, name).copy_(value.unsqueeze(0).expand_as(getattr(experts, name)))


@torch.no_grad()
def detect_expert(expert: nn.Module, d_model: int) -> Optional[ExpertSpec]:
    """The ``ExpertSpec`` of ``expert`` if it is a plain MLP or SwiGLU block, else ``None``.

    The candidate layout must reproduce ``expert(x)`` on a probe input (fp32, fixed seed, the
    global RNG untouched), so custom ``forward`` s are never converted by mistake.
    """
    candidates = _candidates(expert, d_model)
    if not candidates:
        return None
    probe = copy.deepcopy(expert).float().cpu()
    x_MD = torch.randn(16, d_model, generator=torch.Generator().manual_seed(0))
    with torch.random.fork_rng(devices=[]):
        want = probe(x_MD)
    if not isinstance(want, Tensor) or want.shape != x_MD.shape:
        return None
    for spec in candidates:
        stacked = stacked_experts(spec, 1, d_model)
        load_template(stacked, spec, probe)
        got = stacked(x_MD.unsqueeze(0))[0]
        if torch.allclose(got, want, rtol=1e-4, atol=1e-5):
            return spec
    return None


def mark_expert_params(module: nn.Module, group_name: str) -> None:
    """Tag the sharded expert parameters of ``module`` (found by structure) as DeepSpeed expects
    of expert weights: ``allreduce=False``, ``group_name``. DeepSpeed reads these tags, and
    rebuilding a parameter (meta init + ``to_empty``, ``load_state_dict(assign=True)``) drops
    them, so ``MoE`` calls this again after each of those and when the engine sets it up."""
    for param in sharded_expert_parameters(module):
        param.allreduce = False
        param.group_name = group_name


class GenericExperts(Experts):
    """DeepSpeed's ``Experts``: deep copies of any module, applied one local expert at a time.

    The slow path for experts we cannot stack. Each expert sees ``[ep_size, 1, C, D]``, the shape
    DeepSpeed gives it; a tuple output contributes its first element (Megatron's ``(out, bias)``).

    Args:
        expert: the template module.
        num_local_experts: ``E_local``.
        ep_size: EP group size (the rows of each expert's input are ``ep_size`` blocks of ``C``).
    """

    def __init__(self, expert: nn.Module, num_local_experts: int, ep_size: int) -> None:
        super().__init__(sharded=True)
        self.ep_size = ep_size
        self.deepspeed_experts = nn.ModuleList(copy.deepcopy(expert) for _ in range(num_local_experts))

    def forward(self, x_EMD: Tensor) -> Tensor:
        """``[E_local, ep_size * C, D] -> [E_local, ep_size * C, D]``."""
        num_local, rows, dim = x_EMD.shape
        outputs = []
        for x_MD, expert in zip(x_EMD.unbind(0), self.deepspeed_experts):
            out = expert(x_MD.reshape(self.ep_size, 1, rows // self.ep_size, dim))
            outputs.append((out[0] if isinstance(out, tuple) else out).reshape(rows, dim))
        return torch.stack(outputs)


def add_deepspeed_keys(experts: StackedExperts, spec: ExpertSpec) -> None:
    """Make ``experts`` save and load DeepSpeed's per-expert keys instead of stacked tensors.

    ``state_dict()`` yields ``deepspeed_experts.<i>.<template key>`` (detached views, no copies);
    ``load_state_dict`` takes those keys (or our stacked ones) and stacks them.
    """
    num_local = experts.w1.shape[0]

    def save_hook(module: nn.Module, state: dict, prefix: str, local_metadata: dict) -> None:
        for name, key, transposed in spec.keys:
            stacked = state.pop(prefix + name).detach()
            for i in range(num_local):
                state[f"{prefix}{_PREFIX}.{i}.{key}"] = stacked[i].t() if transposed else stacked[i]

    def load_hook(module: nn.Module, state: dict, prefix: str, *args: object) -> None:
        for name, key, transposed in spec.keys:
            per_expert = [f"{prefix}{_PREFIX}.{i}.{key}" for i in range(num_local)]
            if all(k in state for k in per_expert):
                slices = [state.pop(k) for k in per_expert]
                state[prefix + name] = torch.stack([s.t() if transposed else s for s in slices])

    experts.register_state_dict_post_hook(save_hook)
    experts.register_load_state_dict_pre_hook(load_hook)
