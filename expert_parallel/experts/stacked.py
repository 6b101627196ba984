"""Experts with stacked weights, run as one batched matmul per weight."""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..activations import ACTIVATIONS
from .base import Experts

# sums the partial outputs of TP-split experts over their TP group (the layer passes comm's)
Reduce = Callable[[Tensor], Tensor]


class StackedExperts(Experts):
    """``num_experts`` independent FFN (or SwiGLU) experts held as stacked tensors.

    Weights: ``w1 [E, D, F]``, ``w2 [E, F, D]``, ``w3 [E, D, F]`` (SwiGLU only), optional
    biases ``b1 [E, F]``, ``b2 [E, D]`` and ``b3 [E, F]`` (on ``x w3``; GPT-OSS). ``sharded``
    experts (routed experts, split over the EP group) are reduced over the expert-data-parallel
    group only; unsharded ones (shared experts, replicated on every rank) over the data-parallel
    group like any dense weight: the whole world without tensor parallelism, the ranks of one TP
    rank with it (``comm.reduce_gradients``).

    Args:
        num_experts: experts held here (``E_local`` inside a layer).
        d_model: ``D``.
        d_ff: ``F``.
        gated: SwiGLU (``silu(x w1) * (x w3)``) instead of ``act(x w1)``.
        activation: name in ``activations.ACTIVATIONS`` (ignored when ``gated``).
        bias: add ``b1`` and ``b2``.
        up_bias: add ``b3`` to ``x w3`` (``gated`` only).
        glu: ``gated`` only: the module mapping ``(x w1 + b1, x w3 + b3)`` to the hidden
            activation instead of ``silu(gate) * up`` (``activations.ClampedSwiGLU``, GPT-OSS).
        recompute: keep only the inputs for the backward and recompute the hidden activations
            there (``MoEConfig.recompute="experts"``, ``torch.utils.checkpoint``).
        sharded: this rank's shard of the EP group's experts (see ``experts.base.Experts``).
        first_expert: the global id of local expert 0 (``ep_rank * E_local`` in a layer); it seeds
            the init (see ``reset_parameters``; ``place`` sets it once the layer is bound).
        tp_rank, tp_size: expert tensor parallelism: these experts are slice ``tp_rank`` of
            ``tp_size`` equal slices of ``d_ff`` (columns of ``w1`` / ``w3`` / ``b1``, rows of
            ``w2``; ``b2`` whole), and ``d_ff`` is the slice's width. Their outputs are partial
            sums: pass ``reduce`` to ``forward`` / ``grouped`` to sum them before ``b2``.
    """

    # the dimension of d_ff in each expert's parameter, which expert TP splits; b2 has none (whole)
    TP_SPLIT = {"w1": 1, "w3": 1, "b1": 0, "b3": 0, "w2": 0}

    def __init__(self, num_experts: int, d_model: int, d_ff: int, *, gated: bool = False,
                 activation: str = "gelu", bias: bool = False, sharded: bool = True,
                 first_expert: int = 0, tp_rank: int = 0, tp_size: int = 1, up_bias: bool = False,
                 glu: Optional[nn.Module] = None, recompute: bool = False) -> None:
        super().__init__(sharded)
        self.first_expert, self.tp_rank, self.tp_size = first_expert, tp_rank, tp_size
        self.recompute = recompute
        self.activation = "silu" if gated else activation
        self.act = ACTIVATIONS[self.activation]()
        self.glu = glu
        self.w1 = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.w2 = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.w3 = nn.Parameter(torch.empty(num_experts, d_model, d_ff)) if gated else None
        self.b1 = nn.Parameter(torch.empty(num_experts, d_ff)) if bias else None
        self.b2 = nn.Parameter(torch.empty(num_experts, d_model)) if bias else None
        self.b3 = nn.Parameter(torch.empty(num_experts, d_ff)) if up_bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s default init, expert by expert: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``.

        One seed is drawn from the global RNG (kept as ``init_seed``); global expert ``g`` draws its
        weights from a generator seeded with ``seed + g``. So ranks that share a seed (the usual data-parallel
        set-up) still start with different experts, and a seed gives every global expert the same
        weights at any EP size. A TP slice (``tp_size > 1``) draws the whole expert and keeps its
        slice, so it equals that slice of the unsplit expert. Meta tensors are left alone.
        """
        self.init_seed = int(torch.empty((), dtype=torch.int64, device="cpu").random_(0, 2 ** 62))
        self._draw_init()

    def place(self, first_expert: int, tp_rank: int = 0) -> None:
        """Make these the global experts ``first_expert ..`` (and TP slice ``tp_rank``): a layer calls
        it when it binds to its groups. Their init is drawn again from ``init_seed`` if the place
        changed, so they hold what ``reset_parameters`` gives those experts; no global RNG draw."""
        if (first_expert, tp_rank) != (self.first_expert, self.tp_rank):
            self.first_expert, self.tp_rank = first_expert, tp_rank
            self._draw_init()

    def _draw_init(self) -> None:
        """Every expert's weights from a generator seeded with ``init_seed + global id`` (TP: the slice)."""
        if self.w1.is_meta:
            return
        seed = self.init_seed
        d_model, d_ff = self.w1.shape[1], self.w1.shape[2] * self.tp_size
        fan_in = {"w1": d_model, "w3": d_model, "b1": d_model, "b3": d_model, "w2": d_ff, "b2": d_ff}
        split = self.TP_SPLIT
        with torch.no_grad():
            for local in range(self.w1.shape[0]):
                generator = torch.Generator(self.w1.device).manual_seed(seed + self.first_expert + local)
                for name, param in self.named_parameters():
                    bound = 1.0 / math.sqrt(fan_in[name])
                    shape = list(param.shape[1:])
                    if name in split:
                        shape[split[name]] *= self.tp_size
                    full = torch.empty(shape, device=param.device, dtype=param.dtype)
                    full.uniform_(-bound, bound, generator=generator)
                    if name in split:
                        width = shape[split[name]] // self.tp_size
                        full = full.narrow(split[name], self.tp_rank * width, width)
                    param[local].copy_(full)

    def forward(self, x_EMD: Tensor, reduce: Optional[Reduce] = None) -> Tensor:
        """Apply expert ``e`` to row block ``e``: ``[E, M, D] -> [E, M, D]`` (batched matmuls).
        ``reduce`` (TP slices) sums the partial outputs ``[E, M, D]`` over the slices before ``b2``."""
        b1, b2, b3 = (None if b is None else b.unsqueeze(1) for b in (self.b1, self.b2, self.b3))
        return self._ffn(x_EMD, self.w1, self.w3, self.w2, b1, b2, reduce=reduce, b3=b3)

    def grouped(self, x_MD: Tensor, offsets_L: Tensor, expert_M: Optional[Tensor] = None,
                reduce: Optional[Reduce] = None) -> Tensor:
        """Only the filled rows: ``[M, D] -> [M, D]``, rows ``offsets_L[l-1]:offsets_L[l]`` through
        expert ``l`` (``torch._grouped_mm``, forward and backward); rows from ``offsets_L[-1]`` on
        are not computed (their output is unspecified). No host sync.

        Args:
            x_MD: expert rows, grouped by expert (``layout.ExpertRows.gather``).
            offsets_L: cumulative row ends per expert, ``int32`` on the device.
            expert_M: the expert of every row, ``E`` for rows past the last offset (needed only
                with biases: those rows get a zero bias, so no gradient of theirs reaches one).
            reduce: sums the partial outputs ``[M, D]`` of TP slices before ``b2`` (see ``forward``).
        """
        dtype = x_MD.dtype
        if torch.is_autocast_enabled(x_MD.device.type):
            # autocast does not cover the grouped GEMM on every device: cast as it would, where the
            # kernel's 16-byte row rule holds for the autocast dtype
            low = torch.get_autocast_dtype(x_MD.device.type)
            dtype = low if _rows_aligned(low, self.w1.shape[1], self.w1.shape[2]) else dtype

        traced = torch.compiler.is_compiling() and not grouped_gemm_traceable(dtype)
        grouped_mm = _grouped_mm_eager() if traced else _grouped_mm

        def gmm(a: Tensor, w: Tensor) -> Tensor:
            return grouped_mm(a, w.to(dtype), offsets_L)

        def bias(b: Optional[Tensor]) -> Optional[Tensor]:  # per row; a zero row past the last offset
            return None if b is None else F.pad(b.to(dtype), (0, 0, 0, 1))[expert_M]

        return self._ffn(x_MD.to(dtype), self.w1, self.w3, self.w2, bias(self.b1), bias(self.b2), matmul=gmm,
                         reduce=reduce, b3=bias(self.b3))

    def dense(self, x_SD: Tensor) -> Tensor:
        """Every token through every expert, summed: ``[S, D] -> [S, D]``, ``sum_e expert_e(x)``.

        Computed as one wide FFN of hidden width ``E * F`` (the activation is element-wise, so
        ``sum_e act(x w1_e) w2_e = act(x [w1_0 .. w1_E]) [w2_0; ..; w2_E]``): two or three plain
        matmuls, no ``[E, S, D]`` intermediate. This is how shared experts run.
        """
        num_experts, d_model, d_ff = self.w1.shape
        w1_DH = self.w1.transpose(0, 1).reshape(d_model, num_experts * d_ff)
        w3_DH = None if self.w3 is None else self.w3.transpose(0, 1).reshape(d_model, num_experts * d_ff)
        b1 = None if self.b1 is None else self.b1.reshape(-1)
        b2 = None if self.b2 is None else self.b2.sum(dim=0)
        b3 = None if self.b3 is None else self.b3.reshape(-1)
        return self._ffn(x_SD, w1_DH, w3_DH, self.w2.reshape(num_experts * d_ff, d_model), b1, b2, b3=b3)

    def _ffn(self, x: Tensor, w1: Tensor, w3: Optional[Tensor], w2: Tensor, b1: Optional[Tensor],
             b2: Optional[Tensor], matmul: Callable[[Tensor, Tensor], Tensor] = torch.matmul,
             reduce: Optional[Reduce] = None, b3: Optional[Tensor] = None) -> Tensor:
        """``reduce(act(x @ w1 + b1) [* (x @ w3 + b3)] @ w2) + b2`` for matching (batched, plain or,
        with the grouped ``matmul``, grouped) shapes (``glu(x @ w1 + b1, x @ w3 + b3)`` in place of
        the gated product with a ``glu``); no ``reduce`` is the identity. With ``recompute`` (and
        autograd recording) the part before ``reduce`` is recomputed in the backward."""
        if self.recompute and torch.is_grad_enabled():
            out = checkpoint(self._project, x, w1, w3, w2, b1, b3, matmul, use_reentrant=False)
        else:
            out = self._project(x, w1, w3, w2, b1, b3, matmul)
        if reduce is not None:
            out = reduce(out)
        if b2 is not None:
            out = out + b2
        return out

    def _project(self, x: Tensor, w1: Tensor, w3: Optional[Tensor], w2: Tensor, b1: Optional[Tensor],
                 b3: Optional[Tensor], matmul: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        """``act(x @ w1 + b1) [* (x @ w3 + b3)] @ w2``: the experts' hidden activations live only here."""
        hidden = matmul(x, w1)
        if b1 is not None:
            hidden = hidden + b1
        if w3 is None:
            return matmul(self.act(hidden), w2)
        up = matmul(x, w3) if b3 is None else matmul(x, w3) + b3
        # gated: SwiGLU (silu, keeping 2 tensors for its backward) or the expert's own glu (clamped SwiGLU)
        return matmul(_SwiGLU.apply(hidden, up) if self.glu is None else self.glu(hidden, up), w2)


_GROUPED_SUPPORT: dict[tuple[str, torch.dtype], bool] = {}


class _SwiGLU(torch.autograd.Function):
    """``silu(gate) * up``, keeping only ``gate`` and ``up`` for the backward (autograd would keep
    ``silu(gate)`` as well: one ``[rows, F]`` tensor more); the backward recomputes ``silu(gate)``."""

    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        gate, up = ctx.saved_tensors
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        grad_up = grad * F.silu(gate) if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up


class _DenseGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient dense: the grouped GEMM's backward rejects the
    stride-0 gradients that e.g. ``.sum()`` produces."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return grad.contiguous()


def _grouped_mm(a_MD: Tensor, w_EDF: Tensor, offsets_L: Tensor) -> Tensor:
    return _DenseGrad.apply(torch._grouped_mm(a_MD, w_EDF, offs=offsets_L))


@functools.cache
def _grouped_mm_eager() -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """``_grouped_mm`` kept out of ``torch.compile`` 's graph: it traces grouped GEMM with a
    bf16-only shape function, while the eager kernels also run fp32 and fp16, so outside bf16 the
    call stays eager (a graph break around it). Built on first use while compiling:
    ``torch.compiler.disable`` imports ``torch._dynamo``, 2 s of every process's start-up."""
    return torch.compiler.disable(_grouped_mm)


def _rows_aligned(dtype: torch.dtype, *widths: int) -> bool:
    """The grouped GEMM kernels need row strides that are multiples of 16 bytes."""
    return all(width * dtype.itemsize % 16 == 0 for width in widths)


def grouped_gemm_traceable(dtype: torch.dtype) -> bool:
    """Whether ``torch.compile`` traces the grouped GEMM for ``dtype`` (its shape function takes
    bf16 only; other dtypes run it eagerly, a graph break)."""
    return dtype == torch.bfloat16


def grouped_gemm_supported(device: torch.device, dtype: torch.dtype, *widths: int) -> bool:
    """Whether ``torch._grouped_mm`` runs forward and backward for ``device`` 's type and ``dtype``
    with rows of the given ``widths`` (``d_model``, ``d_ff``): a tiny probe, once per pair, and the
    kernel's rule that row strides are multiples of 16 bytes. The meta device reports True (meta
    tensors run nothing)."""
    if not _rows_aligned(dtype, *widths):
        return False
    key = (device.type, dtype)
    if device.type == "meta":
        return True
    if key not in _GROUPED_SUPPORT:
        try:
            with torch.enable_grad():
                a = torch.zeros(8, 16, device=device, dtype=dtype, requires_grad=True)
                w = torch.zeros(2, 16, 16, device=device, dtype=dtype, requires_grad=True)
                offsets = torch.tensor([8, 8], dtype=torch.int32, device=device)
                out = torch._grouped_mm(a, w, offs=offsets)
                out.backward(torch.ones_like(out))
            _GROUPED_SUPPORT[key] = True
        except (RuntimeError, NotImplementedError, AttributeError, TypeError):
            _GROUPED_SUPPORT[key] = False
    return _GROUPED_SUPPORT[key]
