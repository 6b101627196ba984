"""``MoE``: a drop-in subclass of ``deepspeed.moe.layer.MoE`` running our expert-parallel layer.

Switch an existing model by changing one import::

    # from deepspeed.moe.layer import MoE
    from expert_parallel.integrations.deepspeed import MoE

The DeepSpeed engine recognises the layer (``isinstance``), creates its groups through
``set_deepspeed_parallelism``, reduces expert gradients over the expert-data-parallel group
(``allreduce=False``, ``group_name``), and saves / loads per-expert checkpoint files, all with
DeepSpeed's state-dict keys.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Optional

import deepspeed
import deepspeed.comm
import deepspeed.moe.layer
import torch
import torch.distributed as dist
from deepspeed.utils import groups
from deepspeed.utils.bwc import bwc_tensor_model_parallel_group, bwc_tensor_model_parallel_world_size
from torch import Tensor, nn
from torch.nn import functional as F

from ...comm import register
from ...config import MoEConfig
from ...layer import MoELayer
from .engine import expert_parallel_group
from .experts import (
    GenericExperts,
    add_deepspeed_keys,
    detect_expert,
    load_template,
    mark_expert_params,
    stacked_experts,
)

logger = logging.getLogger(__name__)

NOISY_GATE_POLICIES = (None, "None", "Jitter", "RSample")
JITTER_EPSILON = 0.01  # DeepSpeed's multiplicative_jitter default
EXPERT_IMPLS = ("auto", "stacked", "generic")
ROUTER_EXTRAS = ("gate_after_topk", "normalize_topk", "jitter_eps", "z_loss_weight", "importance_loss_weight",
                 "load_loss_weight")


class DeepSpeedMoELayer(MoELayer):
    """``MoELayer`` whose EP and TP groups come from DeepSpeed and whose experts are given.

    Its state dict uses DeepSpeed's names: ``gate.wg.weight`` for the router, and the experts'
    own (``experts.deepspeed_experts.<i>.<...>``). It is built unbound (``MoELayer(..., bind=False)``)
    and bound by ``bind_group`` once DeepSpeed has created its groups (after the model is built).
    ``cfg.d_ff`` is the given experts' width until then; with expert tensor parallelism they are one
    TP slice of it.
    """

    def __init__(self, cfg: MoEConfig, experts: nn.Module) -> None:
        with torch.random.fork_rng(devices=[]):  # DeepSpeed's MoE draws its gate itself (see MoE)
            super().__init__(cfg, experts=experts, bind=False)
        self.slice_d_ff = cfg.d_ff
        self.register_state_dict_post_hook(_router_to_gate)
        self.register_load_state_dict_pre_hook(_gate_to_router)

    def bind_group(self, group: Optional[dist.ProcessGroup], tp_group: Optional[dist.ProcessGroup] = None,
                   expert_tensor_parallel: bool = False) -> None:
        """Use ``group`` (DeepSpeed's EP group of this rank; ``None``: this rank alone) and
        ``tp_group`` (the mpu's tensor-parallel group; ``None``: no TP), with the experts split
        over ``tp_group`` when ``expert_tensor_parallel`` (the config follows: ``tp_size``,
        ``expert_tensor_parallel``, and ``d_ff`` the whole experts' width)."""
        tp_size = len(register(tp_group))
        expert_tensor_parallel = expert_tensor_parallel and tp_size > 1
        self.cfg = self.cfg.replace(tp_size=tp_size, expert_tensor_parallel=expert_tensor_parallel,
                                    d_ff=self.slice_d_ff * (tp_size if expert_tensor_parallel else 1))
        self.bind(group, tp_group)


def _router_to_gate(module: nn.Module, state: dict, prefix: str, local_metadata: dict) -> None:
    state[prefix + "gate.wg.weight"] = state.pop(prefix + "router.weight")


def _gate_to_router(module: nn.Module, state: dict, prefix: str, *args: object) -> None:
    if prefix + "gate.wg.weight" in state:
        state[prefix + "router.weight"] = state.pop(prefix + "gate.wg.weight")


def _fail(option: str, value: object, fix: str) -> None:
    raise ValueError(f"MoE({option}={value!r}) is not supported: {fix}")


class MoE(deepspeed.moe.layer.MoE):
    """DeepSpeed's ``MoE`` layer, computed by ``expert_parallel``. Same constructor, same output.

    Args (DeepSpeed's, same defaults and meaning):
        hidden_size: ``D``.
        expert: the expert module; a plain MLP or SwiGLU block runs as stacked batched experts,
            anything else through copies of the module (slower, but any expert works).
        num_experts, ep_size, k, capacity_factor, eval_capacity_factor, min_capacity,
        use_residual, noisy_gate_policy, drop_tokens: as in DeepSpeed.
        use_rts: random token selection (top-1); ``None`` means DeepSpeed's default (True).
        enable_expert_tensor_parallelism: with an ``mpu`` given to ``deepspeed.initialize``, split
            the experts over its tensor-parallel group (``expert`` is then one TP slice of an
            expert, as in DeepSpeed; it must be a plain MLP or SwiGLU block). With an mpu, tokens
            are split over the TP group around the all-to-alls in any case, as DeepSpeed does.
        use_tutel: must stay False (raise otherwise).
        top2_2nd_expert_sampling: Gumbel-sampled second expert (top-2); ``None``: default True.

    Keyword-only extras:
        router: ``"deepspeed"`` (default: DeepSpeed's gating, same math), or one of the core's
            token-choice routers (``"gshard"``, ``"switch"``, ``"topk"``, ``"noisy_topk"``; see
            docs/routers.md).
        second_policy, second_threshold: GShard's second-expert policy (``router="gshard"``).
        check_finite: see ``MoEConfig``.
        **router_options: further ``MoEConfig`` routing fields for the core's routers:
            ``gate_after_topk``, ``normalize_topk``, ``jitter_eps``, ``z_loss_weight``,
            ``importance_loss_weight``, ``load_loss_weight``. Weighted losses other than the
            load balance are added to ``l_aux``.
        expert_impl: ``"auto"`` (stacked when the expert is recognised), ``"stacked"`` (raise
            if it is not) or ``"generic"``.
        num_chunks, a2a, ranks_per_node: the all-to-all's chunked overlap and hierarchy (see
            ``MoEConfig``; docs/design.md).

    ``forward(hidden_states, used_token=None)`` returns ``(output, l_aux, exp_counts)``.

    Raises:
        ValueError: for an option we do not support or an invalid combination, naming the fix.
    """

    def __init__(self, hidden_size: int, expert: nn.Module, num_experts: int = 1, ep_size: int = 1,
                 k: int = 1, capacity_factor: float = 1.0, eval_capacity_factor: float = 1.0,
                 min_capacity: int = 4, use_residual: bool = False, noisy_gate_policy: Optional[str] = None,
                 drop_tokens: bool = True, use_rts: Optional[bool] = None, use_tutel: bool = False,
                 enable_expert_tensor_parallelism: bool = False,
                 top2_2nd_expert_sampling: Optional[bool] = None, *, router: str = "deepspeed",
                 second_policy: Optional[str] = None, second_threshold: float = 0.0,
                 check_finite: bool = False, expert_impl: str = "auto", num_chunks: int = 1, a2a: str = "flat",
                 ranks_per_node: Optional[int] = None, **router_options: Any) -> None:
        nn.Module.__init__(self)  # DeepSpeed's __init__ would build its own gate and experts
        for option in router_options:
            if option not in ROUTER_EXTRAS:
                _fail(option, router_options[option], f"MoE takes DeepSpeed's arguments plus {list(ROUTER_EXTRAS)}; "
                      "shared experts and non-token-choice routers need expert_parallel.MoELayer")
        if "jitter_eps" in router_options and noisy_gate_policy == "Jitter":
            _fail("jitter_eps", router_options["jitter_eps"], "noisy_gate_policy='Jitter' already sets it; "
                  "pass one of the two")
        if use_tutel:
            _fail("use_tutel", use_tutel, "our dispatch does not use Tutel kernels; remove use_tutel")
        if noisy_gate_policy not in NOISY_GATE_POLICIES:
            _fail("noisy_gate_policy", noisy_gate_policy, f"choose one of {list(NOISY_GATE_POLICIES)}")
        if expert_impl not in EXPERT_IMPLS:
            _fail("expert_impl", expert_impl, f"choose one of {list(EXPERT_IMPLS)}")
        self.use_residual = use_residual
        self.enable_expert_tensor_parallelism = enable_expert_tensor_parallelism
        self.ep_size = ep_size
        self.expert_group_name = f"ep_size_{ep_size}"
        self.num_experts = num_experts
        spec = detect_expert(expert, hidden_size) if expert_impl != "generic" else None
        if expert_impl == "stacked" and spec is None:
            _fail("expert_impl", "stacked", f"{type(expert).__name__} is not a plain Linear-activation-"
                  "Linear MLP or a bias-free SwiGLU block; use expert_impl='auto' or 'generic'")
        if enable_expert_tensor_parallelism and spec is None:
            _fail("enable_expert_tensor_parallelism", True, "tensor-parallel experts are stacked experts split "
                  f"over d_ff, and {type(expert).__name__} runs as a generic expert (not a plain Linear-activation-"
                  "Linear MLP or bias-free SwiGLU block, or expert_impl='generic'); pass such an expert or "
                  "enable_expert_tensor_parallelism=False")
        cfg = MoEConfig(
            d_model=hidden_size, d_ff=spec.d_ff if spec else hidden_size, num_experts=num_experts,
            top_k=k, capacity_factor=capacity_factor, eval_capacity_factor=eval_capacity_factor,
            min_capacity=min_capacity, drop_tokens=drop_tokens, aux_loss_weight=1.0, ep_size=ep_size,
            expert=spec.kind if spec else "ffn", activation=spec.activation if spec else "gelu",
            expert_bias=spec.bias if spec else False, check_finite=check_finite, num_chunks=num_chunks, a2a=a2a,
            ranks_per_node=ranks_per_node,
            **{"jitter_eps": JITTER_EPSILON if noisy_gate_policy == "Jitter" else 0.0, **router_options},
            **_router_options(router, k, noisy_gate_policy, use_rts, top2_2nd_expert_sampling,
                              second_policy, second_threshold),
        )
        self.num_local_experts = cfg.num_local_experts
        log_rank0(f"Creating expert_parallel MoE layer: num_experts={num_experts}, num_local_experts="
                  f"{self.num_local_experts}, ep_size={ep_size}, router={router!r}, experts="
                  f"{'stacked ' + spec.kind if spec else 'generic'}")
        self.deepspeed_moe = DeepSpeedMoELayer(cfg, self._build_experts(expert, spec, cfg))
        self._mark_experts()
        # load_state_dict(assign=True) installs new parameters: tag them again afterwards
        self.register_load_state_dict_post_hook(self._mark_experts)
        # the random draws of DeepSpeed's constructor, in its order: the gate, then the coefficient
        nn.init.kaiming_uniform_(self.deepspeed_moe.router.weight, a=math.sqrt(5))
        if use_residual:
            self.mlp = expert
            self.coefficient = nn.Linear(hidden_size, 2)

    def _build_experts(self, expert: nn.Module, spec, cfg: MoEConfig) -> nn.Module:
        if spec is None:
            return GenericExperts(expert, cfg.num_local_experts, cfg.ep_size)
        experts = stacked_experts(spec, cfg.num_local_experts, cfg.d_model)
        load_template(experts, spec, expert)
        add_deepspeed_keys(experts, spec)
        return experts

    def _mark_experts(self, *args: object) -> None:
        """(Re)tag the expert parameters for DeepSpeed (see ``mark_expert_params``)."""
        mark_expert_params(self, self.expert_group_name)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - nn.Module's signature
        # .to(), .to_empty(), .half(): parameters may come back as new objects, without tags
        module = super()._apply(fn, recurse)
        self._mark_experts()
        return module

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by the DeepSpeed engine before it reads the expert tags: create (once) and bind the
        expert groups, and tag the expert parameters."""
        self._mark_experts()
        self._create_process_groups(use_data_before_expert_parallel_=use_data_before_expert_parallel_)

    def _create_process_groups(self, use_data_before_expert_parallel_: bool = False) -> None:
        """DeepSpeed's expert / expert-data-parallel groups, from its own helpers, as its ``MoE``
        makes them: with an mpu (``deepspeed.initialize(mpu=...)``) and expert tensor parallelism,
        EP groups within the mpu's data-parallel ranks; otherwise its consecutive blocks. The TP
        group is the mpu's."""
        if not dist.is_initialized():
            if self.ep_size > 1:
                raise RuntimeError(f"MoE(ep_size={self.ep_size}) needs torch.distributed; call "
                                   "deepspeed.init_distributed() (or deepspeed.initialize) first")
            self.deepspeed_moe.bind_group(None)
            return
        if dist.get_world_size() % self.ep_size:
            raise ValueError(f"MoE(ep_size={self.ep_size}) does not divide the world size "
                             f"{dist.get_world_size()}; choose an ep_size that divides it")
        if not deepspeed.comm.is_initialized():  # torch.distributed is: wrap it, as the engine does
            deepspeed.init_distributed(dist_backend=dist.get_backend())
        group = expert_parallel_group(self.ep_size, use_data_before_expert_parallel_,
                                      with_mpu=groups.mpu is not None and self.enable_expert_tensor_parallelism)
        tp_size = bwc_tensor_model_parallel_world_size(groups.mpu)
        self.deepspeed_moe.bind_group(group, bwc_tensor_model_parallel_group(groups.mpu) if tp_size > 1 else None,
                                      self.enable_expert_tensor_parallelism)

    def forward(self, hidden_states: Tensor,
                used_token: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
        """``hidden_states [..., D] -> (output [..., D], l_aux scalar, exp_counts [E] long)``.

        ``exp_counts`` counts this rank's dispatched choices per expert before capacity, as
        DeepSpeed's does. Groups are created on first use if the engine has not done it.
        """
        if used_token is not None:
            _fail("used_token", "<tensor>", "token masks are not implemented; route only the tokens "
                  "you want (e.g. select them before the layer)")
        if self.deepspeed_moe.ep_ranks is None:
            self._create_process_groups()
        output, l_aux, stats = self.deepspeed_moe(hidden_states)
        if self.use_residual:  # Residual MoE (PR-MoE), as DeepSpeed computes it
            output_mlp = self.mlp(hidden_states)
            if isinstance(output_mlp, tuple):
                output_mlp = output_mlp[0]
            coef = F.softmax(self.coefficient(hidden_states), dim=-1)
            output = output * coef[..., 0:1] + output_mlp * coef[..., 1:]
        return output, l_aux, stats.tokens_per_expert


def _router_options(router: str, k: int, noisy_gate_policy: Optional[str], use_rts: Optional[bool],
                    sampling: Optional[bool], second_policy: Optional[str],
                    second_threshold: float) -> dict:
    """``MoEConfig`` routing fields for DeepSpeed's options, or ValueError where they conflict."""
    if router != "deepspeed":
        for option, value, ok in (("use_rts", use_rts, (None, False)),
                                  ("top2_2nd_expert_sampling", sampling, (None,)),
                                  ("noisy_gate_policy", noisy_gate_policy, (None, "None", "Jitter"))):
            if value not in ok:
                _fail(option, value, f"it configures DeepSpeed's gating, not router={router!r}; "
                      "remove it (use second_policy for GShard's second expert)")
        return {"router": router, "second_policy": second_policy or "random",
                "second_threshold": second_threshold}
    if second_policy is not None:
        _fail("second_policy", second_policy, "router='deepspeed' takes top2_2nd_expert_sampling "
              "instead; or pass router='gshard'")
    if noisy_gate_policy == "RSample" and k != 1:
        logger.warning("noisy_gate_policy='RSample' only affects top-1 gating; ignored for k=%d, as "
                       "DeepSpeed ignores it", k)
    options = {"router": "deepspeed",
               "router_gumbel": noisy_gate_policy == "RSample" and k == 1,
               "random_token_selection": (use_rts is None or use_rts) and k == 1}
    if k == 2:
        options["second_policy"] = "all" if sampling is False else "gumbel"
    return options


def log_rank0(message: str) -> None:
    """``logger.info`` on global rank 0 only (or without a process group)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        logger.info(message)
