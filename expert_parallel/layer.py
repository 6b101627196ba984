"""MoELayer: route -> plan -> pack -> all-to-all -> experts -> all-to-all -> combine.

Shapes (one legend for the whole package; tensors that cross a function boundary carry their
shape as a suffix, e.g. ``x_SD``, ``buffer_ECD``):

    S        tokens on this rank (the input flattened to ``[S, D]``)
    E        routed experts of the layer, all EP ranks together
    E_local  experts held by one EP rank, ``E / R``
    L        the same ``E_local`` as one letter inside a suffix (``received_RLCD``, ``fill_RL``)
    R        ranks of the EP group (``ep_size``)
    K        choices per token (``MoEConfig.num_choices``; ``E`` for ``soft`` and ``expert_choice``)
    J        a router's top candidates before the K are kept (``K + 1`` for noisy top-k's threshold;
             the ``topk_group`` groups kept by group-limited routing)
    G        expert groups of group-limited routing (``n_group``)
    A        (token, choice) assignments, ``K * S``, choice-major
    C        capacity: slots per expert in the static buffers
    C_tp     the slots of each expert one TP rank sends, ``C / tp_size``
    N        slots of a flattened buffer, ``E * C`` (only this)
    M        expert rows: ``R * C`` per local expert (``[E_local, M, D]``, padded compute), or the
             compacted rows of all local experts one after another (``[M, D]``, filled compute)
    P, Q     ranks per node and nodes of a hierarchical EP group, ``R = Q * P``
    D        d_model
    F        d_ff (hidden width of an expert)
    H        hidden width of several experts side by side (``E * F``, shared experts run dense)
    X        whatever trailing dimensions a helper does not look at (``prob_SX``, ``x_RX``)
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from functools import partial
from typing import Callable, Iterator, NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import ProcessGroup
from torch.utils.hooks import RemovableHandle

from .activations import ClampedSwiGLU
from .comm import (
    A2AGroup,
    Agreement,
    NodeRanks,
    agree,
    by_expert,
    by_source,
    exchange_back_start,
    exchange_fill,
    exchange_start,
    expert_groups,
    lookup,
    rank,
    register,
    resolve_ranks_per_node,
    tp_copy,
    tp_drop,
    tp_gather,
    tp_reduce,
)
from .config import MoEConfig
from .experts import StackedExperts, grouped_gemm_supported, grouped_gemm_traceable
from .layout import (
    Workspace,
    assign_slots,
    capacity_input,
    chunk_bounds,
    combine,
    expert_rows,
    fill_within,
    kept_weights,
    layer_capacity,
    pack,
)
from .routing import Router, route, weighted_aux_loss
from .stats import RoutingStats, routing_stats
from .tokens import mask_error, place_tokens, scoped_routing, select_tokens

# the phases of one forward, in order ("shared" only with shared experts)
PHASES = ("route", "plan", "pack", "dispatch", "experts", "return", "combine", "shared")
PhaseHook = Callable[[str], None]


class MoEOutput(NamedTuple):
    """What ``MoELayer`` returns; unpacks as ``y, aux_loss, stats``.

    Attributes:
        output: ``[..., d_model]``, the input's shape and dtype; dropped tokens give 0.
        aux_loss: scalar, the router's losses weighted by the config (``aux_loss_weight`` times
            the load-balancing loss, ``z_loss_weight`` times the z-loss, ...); differentiable.
        stats: ``RoutingStats`` of this batch (detached).
    """

    output: Tensor
    aux_loss: Tensor
    stats: RoutingStats


def _resolve_ranks(cfg: MoEConfig, group: Optional[ProcessGroup], kind: str) -> tuple[int, ...]:
    """Global ranks of the EP (``kind="ep"``) or TP (``"tp"``) group: the one passed in, else built
    from ``cfg`` (``comm.expert_groups``; a TP group of one rank needs none)."""
    size = getattr(cfg, f"{kind}_size")
    if group is None:
        if kind == "tp" and size == 1:
            return register(None)
        built = expert_groups(cfg.ep_size, cfg.tp_size, cfg.expert_tensor_parallel)
        return built.ep_ranks if kind == "ep" else built.tp_ranks
    if not dist.is_initialized():
        raise RuntimeError(f"{kind}_group was given with {kind}_size={size} but torch.distributed "
                           "is not initialised; call init_process_group first")
    group_size = dist.get_world_size(group)
    if group_size != size:
        raise ValueError(f"MoEConfig.{kind}_size={size} does not match the size {group_size} of "
                         f"{kind}_group; set {kind}_size={group_size} or pass a group of {size} ranks")
    return register(group)


def _expert_kind(cfg: MoEConfig) -> dict:
    """``StackedExperts`` keyword arguments for ``cfg.expert`` (and its activation and biases)."""
    glu = ClampedSwiGLU(cfg.swiglu_alpha, cfg.swiglu_limit) if cfg.expert == "clamped_swiglu" else None
    return dict(gated=cfg.expert != "ffn", activation=cfg.activation, bias=cfg.expert_bias,
                up_bias=cfg.expert_up_bias, glu=glu)


class _Phase:
    """One phase of a forward: a profiler range, and the layer's phase events (see
    ``MoELayer.register_phase_hook``)."""

    def __init__(self, layer: MoELayer, name: str) -> None:
        self.layer, self.name = layer, name

    def input(self, tensor: Tensor) -> Tensor:
        """``tensor``, or a view of it whose gradient fires ``bwd/<phase>`` once the backward has
        passed back through this phase (only while phase hooks are registered)."""
        if not self.layer._phase_hooks or not tensor.requires_grad:
            return tensor
        view = tensor.view_as(tensor)
        view.register_hook(lambda grad: self.layer._emit(f"bwd/{self.name}"))
        return view


class MoELayer(nn.Module):
    """Mixture-of-Experts layer with experts sharded over an expert-parallel group.

    Global expert ``e`` is local expert ``e % E_local`` on EP rank ``e // E_local``. Call it with
    ``x [..., d_model]``; it returns ``MoEOutput``. The output of dropped tokens is 0, so wrap it
    in a residual connection. Shared experts (``num_shared_experts``) are replicated on every rank
    and see every token; their sum is added to the routed output.

    The forward syncs the host once, for the per-batch agreement (one small all-reduce), unless
    ``cfg.capacity`` or ``cfg.max_tokens_per_rank`` fixes the buffers and ``cfg.check_finite`` is
    off: then it syncs nothing. Any rank may pass any number of tokens, 0 included (``[0, D]``,
    ``[0, T, D]``), in every capacity mode; with ``max_tokens_per_rank`` more tokens than the bound
    are invalid input. The experts compute the filled slots only (grouped GEMM) or every slot
    (batched matmuls), as ``cfg.expert_compute`` says; ``filled_compute`` tells which was chosen.
    With ``bias_update_rate > 0`` each training forward adds its tokens per expert to
    ``router.selection_load`` (on the device, no sync) for ``comm.update_selection_biases``.

    Attributes:
        router: ``Router`` (``router.weight [E, D]``; ``router.bias [E]`` with ``router_bias``;
            ``router.noise_weight`` for noisy top-k; ``router.selection_bias [E]`` and the training
            counts ``router.selection_load [E]`` for DeepSeek-V3's bias balancing).
        experts: this rank's routed experts, ``StackedExperts`` with ``E_local`` experts.
        shared_experts: ``StackedExperts`` ``[num_shared_experts, D, d_ff_shared]`` or ``None``.
        shared_gate: ``nn.Linear(D, 1, bias=False)`` scaling the shared experts' output by
            ``sigmoid(x @ shared_gate.weight.T)`` (``shared_expert_gate``, Qwen2-MoE), or ``None``.

    With ``cfg.tp_size > 1`` the ranks of a TP group hold the same tokens and route them alike;
    each sends its ``1/tp_size`` of every expert's slots and the TP group gathers the returned
    slots before the combine. With ``cfg.expert_tensor_parallel`` the experts are also split over
    the TP group (``experts`` holds this TP rank's slice of ``d_ff``; see ``MoEConfig``).

    Build, then bind: the constructor builds the modules from ``cfg`` alone; ``bind`` ties the layer
    to its EP and TP groups (and places its experts: which global experts, which TP slice). The
    constructor binds at once by default; ``bind=False`` leaves that to a later ``layer.bind(...)``
    (DeepSpeed's engine makes its groups after the model is built: the drop-in binds then).

    Args:
        cfg: the validated configuration.
        ep_group, tp_group: passed to ``bind`` (see there).
        experts: the routed experts to hold (any ``experts.Experts`` module with ``E_local`` experts
            taking ``[E_local, N, D]``); ``None`` builds ``StackedExperts`` from ``cfg``.
        bind: bind to the groups now (the default); ``False``: call ``bind`` before the first forward.

    Raises:
        ValueError, RuntimeError: as ``bind``.
    """

    # the sub-groups of a2a="hierarchical" (ranks, not groups: the module stays picklable); None: flat
    node_ranks: Optional[NodeRanks] = None
    # set by routing.record / routing.replay for the duration of their block
    routing_tape: Optional[Callable] = None

    # the EP and TP groups' global ranks once bound (ranks, not the groups: the module stays
    # deep-copyable and picklable); None: not bound yet
    ep_ranks: Optional[tuple[int, ...]] = None
    tp_ranks: Optional[tuple[int, ...]] = None

    def __init__(self, cfg: MoEConfig, ep_group: Optional[ProcessGroup] = None,
                 tp_group: Optional[ProcessGroup] = None, *, experts: Optional[nn.Module] = None,
                 bind: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.router = Router.from_config(cfg)
        self._places_experts = experts is None  # the layer draws the init of the experts it builds
        self.experts = experts if experts is not None else StackedExperts(
            cfg.num_local_experts, cfg.d_model, cfg.d_ff // cfg.expert_tp_size, **_expert_kind(cfg),
            tp_size=cfg.expert_tp_size, recompute=cfg.recompute == "experts")
        self.shared_experts = StackedExperts(
            cfg.num_shared_experts, cfg.d_model, cfg.shared_d_ff, **_expert_kind(cfg), sharded=False,
        ) if cfg.num_shared_experts else None
        self.shared_gate = nn.Linear(cfg.d_model, 1, bias=False) if cfg.shared_expert_gate else None
        self._phase_hooks: OrderedDict[int, PhaseHook] = OrderedDict()  # weak-referenceable, for handles
        self.workspace = Workspace()  # the static-shape scratch buffers, reused step after step (layout/workspace.py)
        self.filled_compute = self._choose_expert_compute()
        if bind:
            self.bind(ep_group, tp_group)

    def bind(self, ep_group: Optional[ProcessGroup] = None, tp_group: Optional[ProcessGroup] = None) -> None:
        """Tie the layer to its process groups (collective: every rank calls it, in the same order).

        Remembers the groups' ranks; with ``a2a="hierarchical"`` builds the node sub-groups of the
        EP group; places the experts the layer built (``StackedExperts.place``: this rank's global
        experts and TP slice, their init drawn from the seed of their construction, so a seed gives
        every global expert the same weights at any EP size). Bind before loading weights.

        Args:
            ep_group: the EP process group; ``None`` builds it from ``cfg.ep_size`` and
                ``cfg.tp_size`` (``comm.expert_groups``: consecutive rank blocks without TP, or the
                local rank alone when ``ep_size == 1``).
            tp_group: the TP process group of the rest of the model (its ranks hold the same
                tokens); ``None`` builds it from ``cfg.tp_size`` (blocks of consecutive ranks).

        Raises:
            ValueError: a group's size differs from ``cfg.ep_size`` / ``cfg.tp_size``, or the world
                size is not a multiple of ``ep_size * tp_size``.
            RuntimeError: ``ep_size`` or ``tp_size > 1`` without an initialised process group.
        """
        cfg = self.cfg
        self.ep_ranks = _resolve_ranks(cfg, ep_group, "ep")
        self.tp_ranks = _resolve_ranks(cfg, tp_group, "tp")
        self.node_ranks = None
        if cfg.a2a == "hierarchical" and cfg.ep_size > 1:  # collective: every rank builds them in one order
            self.node_ranks = NodeRanks.build(self.ep_ranks, resolve_ranks_per_node(cfg.ranks_per_node, cfg.ep_size))
        if self._places_experts:
            self.experts.place(self.first_expert, self.tp_ranks.index(rank()) if cfg.expert_tensor_parallel else 0)

    @property
    def first_expert(self) -> int:
        """Global id of this rank's local expert 0, ``ep_rank * E_local``: this rank's experts are rows
        ``first_expert : first_expert + E_local`` of the layer's logical ``[E, ...]`` expert tensors (the
        one definition that checkpoints and the Hugging Face conversion slice and gather by)."""
        if self.ep_ranks is None:  # built with bind=False (the DeepSpeed drop-in before the engine made its groups)
            if self.cfg.ep_size == 1:
                return 0
            raise RuntimeError("the layer has no EP group yet (DeepSpeed creates it in deepspeed.initialize); "
                               "initialise the engine, or call forward once, first (or layer.bind(...) for a "
                               "layer built with bind=False)")
        return self.ep_ranks.index(rank()) * self.cfg.num_local_experts

    def forward(self, x: Tensor, token_mask: Optional[Tensor] = None) -> MoEOutput:
        """``x [..., d_model] -> MoEOutput`` (see the class docstring).

        ``token_mask``: bool, ``x``'s leading shape; False marks a token (padding) that is not
        routed: it takes no slot, outputs 0 and counts in no loss or statistic, so the kept
        tokens' output equals ``layer(x[token_mask])`` (finding them syncs the host once).
        """
        cfg, group = self.cfg, lookup(self.ep_ranks)
        self._check_input(x, group, token_mask)
        x_SD, tokens = select_tokens(x, token_mask)
        with self._phase("route") as phase:
            logits_SE, noise_std_SE = self.router(phase.input(x_SD))
            routing = route(logits_SE, cfg, training=self.training, noise_std_SE=noise_std_SE,
                            selection_bias_E=self.router.selection_bias)
            if self.routing_tape is not None:  # inside routing.record / routing.replay
                routing = self.routing_tape(routing, logits_SE, cfg)
            routing = scoped_routing(routing, cfg, tokens)  # aux_loss_scope
            nonfinite = (~torch.isfinite(logits_SE)).any(dim=-1).sum()
        with self._phase("plan"):
            slots = assign_slots(routing.expert_SK, routing.active_SK, cfg.num_experts, routing.priority_SK)
            if self.training:
                self.router.count_selection(slots.count_E)  # DeepSeek-V3's bias update reads these
            local = Agreement(capacity_input(cfg, x_SD.shape[0], slots.count_E, routing.capacity),
                              nonfinite if cfg.check_finite else 0)
            agreed = self._agree(local, group, x.device)  # the one collective (none when nothing varies)
            capacity = layer_capacity(cfg, agreed.capacity_input, self.training, routing.capacity is not None)
            plan = slots.plan(capacity)
        tp_group = lookup(self.tp_ranks)
        with self._phase("pack") as phase:
            # scale_expert_input (Llama 4): the weights scale the experts' input, their outputs add unweighted
            scale_SK = routing.weight_SK if cfg.scale_expert_input else None
            buffer_ECD = tp_drop(pack(phase.input(x_SD), plan, scale_SK), 1, tp_group)  # TP: this rank's [E, C_tp, D]
        buffer_ECD = self._routed_experts(buffer_ECD, self._sent_fill(plan.fill_E, capacity), group)
        with self._phase("combine") as phase:
            buffer_ECD = tp_gather(phase.input(buffer_ECD), 1, tp_group)  # TP: every rank's slots, [E, C, D]
            weight_SK = kept_weights(routing.weight_SK if scale_SK is None else torch.ones_like(scale_SK), plan,
                                     routing.renormalize_kept)
            y_SD = combine(buffer_ECD, plan, weight_SK, self.workspace)  # fp32
        if self.shared_experts is not None:
            with self._phase("shared") as phase:
                y_SD = y_SD + self._shared(phase.input(x_SD))
        stats = routing_stats(routing, plan, nonfinite, cfg.ep_size, self.first_expert // cfg.num_local_experts,
                              x_SD.shape[1] * x_SD.element_size(), cfg.tp_size,
                              self.tp_ranks.index(dist.get_rank()) if cfg.tp_size > 1 else 0)
        aux_loss = weighted_aux_loss(routing.losses, cfg, routing.probs_SE)
        return MoEOutput(place_tokens(y_SD, tokens).reshape(x.shape).to(x.dtype), aux_loss, stats)

    def _shared(self, x_SD: Tensor) -> Tensor:
        """The shared experts' output ``[S, D]``, times ``sigmoid(shared_gate(x))`` with
        ``shared_expert_gate`` (Qwen2-MoE), times ``shared_expert_scale`` (Cohere 2 MoE)."""
        y_SD = self.shared_experts.dense(x_SD)
        if self.shared_gate is not None:
            y_SD = torch.sigmoid(self.shared_gate(x_SD)) * y_SD
        if self.cfg.shared_expert_scale != 1.0:
            y_SD = y_SD * self.cfg.shared_expert_scale
        return y_SD

    def _routed_experts(self, buffer_ECD: Tensor, fill_E: Tensor, group: Optional[ProcessGroup]) -> Tensor:
        """Dispatch, experts, return: ``[E, C, D] -> [E, C, D]``, chunk by chunk (``num_chunks``).

        The capacity splits into ``chunk_bounds(C, num_chunks)``; with more than one chunk every
        all-to-all is started asynchronously: chunk ``i+1``'s dispatch and chunk ``i``'s return are
        in flight while the experts compute chunk ``i``, and the backward mirrors it (``comm.
        PendingAllToAll``). Each chunk fires ``dispatch`` (its exchange received, the next one
        started), ``experts`` and ``return`` (its return started; the last waits for every return).
        Filled compute also exchanges the filled counts once (a tiny all-to-all); a chunk's counts
        are ``clamp(fill - first slot, 0, chunk size)``, on the device. Every shape is static; with
        filled compute the empty slots come back unspecified and combine never reads them.
        """
        cfg, exchange_group = self.cfg, self._exchange_group(group)
        filled = self._filled_now()
        bounds = chunk_bounds(buffer_ECD.shape[1], cfg.num_chunks)
        overlap = len(bounds) > 1
        chunks = buffer_ECD.split([size for _, size in bounds], dim=1)
        sent, returned = [], []
        for index, (first, size) in enumerate(bounds):
            with self._phase("dispatch") as phase:
                if index == 0:
                    fill_RL = exchange_fill(fill_E, cfg.ep_size, exchange_group) if filled else None
                    sent.append(exchange_start(phase.input(chunks[0]), cfg.ep_size, exchange_group, overlap))
                received_RLCD = sent[index].wait()
                if index + 1 < len(bounds):
                    sent.append(exchange_start(phase.input(chunks[index + 1]), cfg.ep_size, exchange_group))
            with self._phase("experts") as phase:
                # one chunk: every count as it is (with expert TP they count the TP group's gathered slots)
                chunk_fill_RL = fill_within(fill_RL, first, size) if overlap and fill_RL is not None else fill_RL
                out_RLCD = self._compute(phase.input(received_RLCD), chunk_fill_RL)
            with self._phase("return") as phase:
                returned.append(exchange_back_start(phase.input(out_RLCD), exchange_group, overlap))
                if index + 1 == len(bounds):  # one chunk: no concatenation copy
                    out_RLCD = torch.cat([pending.wait() for pending in returned], dim=2) if overlap else (
                        returned[0].wait())
        return out_RLCD.view(buffer_ECD.shape)

    def _compute(self, received_RLCD: Tensor, fill_RL: Optional[Tensor]) -> Tensor:
        """The local experts on the received slots ``[R, E_local, C, D] -> [R, E_local, C, D]``:
        with ``fill_RL`` (filled slots per block) only the filled ones (compacted, grouped GEMM
        with device offsets), else every slot (one batched matmul per weight over ``[E_local,
        R*C, D]``). With expert TP the TP group's slots are gathered first and the partial outputs
        summed (``_expert_tp``); this rank's share goes back."""
        etp, reduce = self._expert_tp()  # expert TP: every TP rank's slots through this d_ff slice
        received_RLCD = tp_copy(tp_gather(received_RLCD, 2, etp), etp)
        if fill_RL is None:
            out_RLCD = by_source(self.experts(by_expert(received_RLCD), **reduce), received_RLCD.shape[0])
        else:
            rows = expert_rows(fill_RL, received_RLCD.shape[2])
            rows_MD = rows.gather(received_RLCD, self.workspace)
            out_MD = self.experts.grouped(rows_MD, rows.offsets_L, rows.expert_M, **reduce)
            out_RLCD = rows.scatter(out_MD, received_RLCD, self.workspace)
        return tp_drop(out_RLCD, 2, etp)

    def _filled_now(self) -> bool:
        """Filled compute in this call: ``filled_compute``, except while ``torch.compile`` traces a
        dtype whose grouped GEMM it cannot trace (fp32, fp16): padded compute then, the same result
        in one graph (``fullgraph=True`` works)."""
        if not self.filled_compute or not torch.compiler.is_compiling():
            return self.filled_compute
        return grouped_gemm_traceable(next(self.experts.parameters()).dtype)

    def _exchange_group(self, group: Optional[ProcessGroup]) -> A2AGroup:
        """What the all-to-alls run over: the EP group, or its hierarchy (``a2a="hierarchical"``)."""
        return group if self.node_ranks is None or group is None else self.node_ranks.groups()

    def _expert_tp(self) -> tuple[Optional[ProcessGroup], dict]:
        """The TP group the experts are split over (``None`` without expert TP) and the experts'
        keyword arguments: ``reduce``, the sum of their partial outputs over it."""
        if not self.cfg.expert_tensor_parallel:
            return None, {}
        group = lookup(self.tp_ranks)
        return group, {"reduce": partial(tp_reduce, group=group)}

    def _sent_fill(self, fill_E: Tensor, capacity: int) -> Tensor:
        """Filled slots per expert ``[E]`` among those the experts receive from this rank: its TP
        share ``[t*C_tp, (t+1)*C_tp)`` of every expert's slots with TP, all of them without TP or
        with expert TP (the TP group gathers every share before the experts). No host sync."""
        if self.cfg.tp_size == 1 or self.cfg.expert_tensor_parallel:
            return fill_E
        share = capacity // self.cfg.tp_size
        start = self.tp_ranks.index(rank()) * share
        return fill_within(fill_E, start, share)

    def _choose_expert_compute(self) -> bool:
        """Filled (grouped GEMM) or padded expert compute, from ``cfg.expert_compute`` and what
        the experts' device and dtype support; ``ValueError`` for an explicit ``"filled"`` that
        cannot run there."""
        mode = self.cfg.expert_compute
        if mode == "padded":
            return False
        weight = next(self.experts.parameters())
        widths = (self.cfg.d_model, weight.shape[-1])
        supported = isinstance(self.experts, StackedExperts) and grouped_gemm_supported(weight.device, weight.dtype,
                                                                                        *widths)
        if mode == "filled" and not supported:
            what = type(self.experts).__name__ if not isinstance(self.experts, StackedExperts) else (
                f"{weight.dtype} on {weight.device.type}, d_model and d_ff {widths}: rows must be multiples of "
                "16 bytes")
            raise ValueError(f"MoEConfig.expert_compute='filled' needs grouped GEMM (torch._grouped_mm), which "
                             f"this torch does not run for the experts ({what}); use expert_compute='auto' "
                             "(padded here) or 'padded', or move the layer to a supported device/dtype")
        return supported

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - nn.Module's signature
        # .to(device/dtype) can change what grouped GEMM supports: choose again, once per move
        module = super()._apply(fn, recurse)
        self.filled_compute = self._choose_expert_compute()
        return module

    def register_phase_hook(self, hook: PhaseHook) -> RemovableHandle:
        """Call ``hook(event)`` at every phase boundary of this layer's forward and backward.

        Events: ``"fwd/<phase>"`` when a forward phase ends, and ``"bwd/<phase>"`` when the
        backward has passed back through it (phases in ``PHASES``; ``plan`` has no backward).
        This is how the benchmarks time the layer's own phases (e.g. ``hook = clock.mark``); each
        phase is also a ``torch.profiler.record_function`` range ``moe/<phase>``.

        Returns:
            A handle whose ``remove()`` unregisters the hook.
        """
        handle = RemovableHandle(self._phase_hooks)
        self._phase_hooks[handle.id] = hook
        return handle

    @contextmanager
    def _phase(self, name: str) -> Iterator[_Phase]:
        with torch.profiler.record_function(f"moe/{name}"):
            yield _Phase(self, name)
        self._emit(f"fwd/{name}")

    def _emit(self, event: str) -> None:
        for hook in list(self._phase_hooks.values()):
            hook(event)

    def _needs_agreement(self) -> bool:
        """Is there a per-batch all-reduce? Not with fixed buffers (``capacity`` or
        ``max_tokens_per_rank``) and ``check_finite`` off."""
        fixed = self.cfg.capacity is not None or self.cfg.max_tokens_per_rank is not None
        return not fixed or self.cfg.check_finite

    def _agree(self, local: Agreement, group: Optional[ProcessGroup], device: torch.device) -> Agreement:
        """The EP group's maxima of ``local`` (one all-reduce), raising on every rank together if
        any rank got invalid input or, with ``check_finite``, non-finite router logits."""
        if not self._needs_agreement():
            return Agreement()
        agreed = agree(local, group, device)
        if agreed.invalid_input:
            raise ValueError("another rank of this EP group got invalid MoELayer input (its own error names "
                             "the problem); every rank stops instead of waiting for it in the all-to-all")
        if self.cfg.check_finite and agreed.nonfinite_tokens:
            raise ValueError(
                f"router logits hold NaN or inf for {agreed.nonfinite_tokens} token(s) on a rank of this EP "
                "group (check_finite=True); check the input and the learning rate, or set "
                "check_finite=False to count them in RoutingStats.nonfinite_tokens instead"
            )
        return agreed

    def _check_input(self, x: Tensor, group: Optional[ProcessGroup], token_mask: Optional[Tensor] = None) -> None:
        """Raise ``ValueError`` if the layer cannot route ``x`` (with ``token_mask``); first tell the EP
        peers through the per-batch all-reduce they are about to enter, so they raise too instead of hanging."""
        error = self._input_error(x) or (mask_error(x, token_mask) if isinstance(x, Tensor) else None)
        if error is None:
            return
        if self._needs_agreement() and group is not None:
            device = x.device if isinstance(x, Tensor) else self.router.weight.device
            agree(Agreement(invalid_input=1), group, device)
        raise ValueError(error)

    def _input_error(self, x: Tensor) -> Optional[str]:
        """Why the layer cannot route ``x`` (a message naming the fix), or ``None``."""
        if not isinstance(x, Tensor) or not x.is_floating_point():
            kind = x.dtype if isinstance(x, Tensor) else type(x).__name__
            return (f"MoELayer input must be a floating-point tensor, got {kind}; pass activations of "
                    "shape [..., d_model]")
        if x.dim() == 0 or x.shape[-1] != self.cfg.d_model:
            return (f"MoELayer input has shape {tuple(x.shape)}, but its last dimension must be "
                    f"d_model={self.cfg.d_model}; reshape the input or fix MoEConfig.d_model")
        bound, num_tokens = self.cfg.max_tokens_per_rank, x.numel() // self.cfg.d_model
        if bound is not None and num_tokens > bound:
            return (f"MoELayer input has {num_tokens} tokens (shape {tuple(x.shape)}), more than "
                    f"MoEConfig.max_tokens_per_rank={bound}; pass at most {bound} tokens per call, or raise "
                    "max_tokens_per_rank (or set it to None to agree on the token count per batch)")
        weight_dtype = next(self.experts.parameters()).dtype
        if x.dtype != weight_dtype and not torch.is_autocast_enabled(x.device.type):
            return (f"MoELayer input dtype {x.dtype} differs from the expert weights' {weight_dtype}; "
                    f"cast the layer (layer.to({x.dtype})) or use autocast")
        return None
