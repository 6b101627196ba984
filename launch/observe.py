"""What ``launch.train`` sees of the experts each logged step, and what it does around each step.

Per MoE layer (in model order, named ``layer0``, ``layer1``, ...): the tokens per expert summed
over the EP group (one all-reduce per logged step for all layers together, ``comm.sum_over_ranks``),
the max-over-mean load (MaxVio), the load CV, the drop fraction and ``k_eff`` (both averaged over
the EP group): ``moe_metrics``. ``Observer`` adds them to every ``metrics.jsonl`` line, writes
TensorBoard event files with ``--tensorboard``, records the routing with ``--record-routing`` and
steps DeepSeek-V3's selection biases with ``--bias-update-rate``.
"""

from __future__ import annotations

import argparse
from contextlib import nullcontext
from importlib.util import find_spec
from pathlib import Path
from typing import Any, ContextManager, Optional

import torch
from torch import nn
from torch.distributed import ProcessGroup

from expert_parallel import RoutingStats, routing
from expert_parallel.comm import lookup, sum_over_ranks, update_selection_biases
from expert_parallel.routing.replay import moe_layers

TENSORBOARD_INSTALL = 'pip install -e ".[tensorboard]"'
SCALARS = ("loss", "aux_loss", "grad_norm", "tokens_per_s", "step_ms", "drop_fraction", "load_cv")
LAYER_SCALARS = ("max_over_mean", "load_cv", "drop_fraction", "k_eff")


def check_observe_flags(args: argparse.Namespace) -> None:
    """``--tensorboard`` needs the tensorboard package; ``--bias-update-rate`` must be >= 0 (a
    Hugging Face model's router must have a selection bias: ``launch.flags`` checks it)."""
    if args.tensorboard and find_spec("tensorboard") is None:
        raise ValueError(f"--tensorboard needs the tensorboard package, which is not installed; install it: "
                         f"{TENSORBOARD_INSTALL}")
    if not args.bias_update_rate >= 0:
        raise ValueError(f"--bias-update-rate {args.bias_update_rate}: must be >= 0 (0 disables the update)")


def add_observe_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of this module."""
    parser.add_argument("--tensorboard", action="store_true",
                        help="also write TensorBoard event files under OUT/tensorboard/ (loss, aux, grad norm, "
                             f"throughput, per-layer expert load); needs {TENSORBOARD_INSTALL}")
    parser.add_argument("--record-routing", action="store_true",
                        help="record every MoE layer's chosen experts (expert_parallel.routing.record) and save "
                             "those of each logged step to OUT/routing/step<N>_rank<R>.pt, for routing replay")
    parser.add_argument("--bias-update-rate", type=float, default=0.0,
                        help="DeepSeek-V3's auxiliary-loss-free balancing: the selection-bias step u, applied after "
                             "each optimizer step (models whose router has a selection bias: an --hf-model "
                             "family with one, e.g. deepseek_v3, or a topk --preset); 0: off")


@torch.no_grad()
def moe_metrics(stats: list[RoutingStats], group: Optional[ProcessGroup]) -> dict[str, dict[str, Any]]:
    """Per MoE layer ``layer<i>``: ``tokens_per_expert`` (summed over ``group``), ``max_over_mean``
    (the fullest expert's load over the mean load), ``load_cv`` (std / mean of that load),
    ``drop_fraction`` and ``k_eff`` (means over ``group``). One all-reduce for every layer; reads
    the result to the host once. Empty without MoE layers."""
    if not stats:
        return {}
    rows = [torch.cat([s.tokens_per_expert.float(), s.dropped_fraction.float().view(1), s.k_eff.float().view(1)])
            for s in stats]
    sizes = [row.numel() for row in rows]
    ranks = torch.distributed.get_world_size(group) if torch.distributed.is_initialized() else 1
    summed = sum_over_ranks(torch.cat(rows), group).cpu().split(sizes)
    metrics = {}
    for index, row in enumerate(summed):
        load_E = row[:-2]
        mean = load_E.mean().clamp_min(1e-9)
        metrics[f"layer{index}"] = {
            "tokens_per_expert": [int(v) for v in load_E.tolist()],
            "max_over_mean": float(load_E.max() / mean),
            "load_cv": float(load_E.std(correction=0) / mean),
            "drop_fraction": float(row[-2] / ranks),
            "k_eff": float(row[-1] / ranks),
        }
    return metrics


class Observer:
    """``launch.train``'s hooks around each step: routing record, selection-bias update, per-layer
    expert metrics and TensorBoard.

    Args:
        args: the parsed flags (``tensorboard``, ``record_routing``, ``bias_update_rate``, ``out``).
        model: the trained module (the engine under DeepSpeed); its MoE layers are found by their router.
        rank: this rank (rank 0 writes TensorBoard).
    """

    def __init__(self, args: argparse.Namespace, model: nn.Module, rank: int) -> None:
        self.model, self.rank, self.out = model, rank, Path(args.out)
        self.record_routing, self.bias_update = args.record_routing, args.bias_update_rate > 0
        layers = moe_layers(model)
        ep_ranks = getattr(layers[0][1], "ep_ranks", None) if layers else None
        self.group = lookup(ep_ranks) if ep_ranks else None
        self.writer = None
        if args.tensorboard and rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out / "tensorboard"))
        self._record: Optional[routing.RoutingRecord] = None

    def step(self) -> ContextManager:
        """Wrap one training step: with ``--record-routing`` every MoE layer's choices are recorded."""
        if not self.record_routing:
            return nullcontext()
        return _Recording(self, routing.record(self.model))

    def after_step(self) -> None:
        """After the optimizer step: DeepSeek-V3's selection-bias update (one all-reduce over the world)."""
        if self.bias_update:
            update_selection_biases(self.model)

    def log(self, step: int, record: dict[str, Any], stats: list[RoutingStats]) -> dict[str, Any]:
        """Add the per-layer metrics to ``record`` (collective: every rank calls it), write them to
        TensorBoard (rank 0) and save the step's routing record (every rank its own)."""
        record = {**record, "moe": moe_metrics(stats, self.group)}
        if self.writer is not None:
            self._write(step, record)
        if self._record is not None:
            where = self.out / "routing"
            where.mkdir(parents=True, exist_ok=True)
            torch.save(self._record.calls, where / f"step{step:06d}_rank{self.rank}.pt")
        return record

    def _write(self, step: int, record: dict[str, Any]) -> None:
        for name in SCALARS:
            if name in record:
                self.writer.add_scalar(f"train/{name}", record[name], step)
        for layer, values in record["moe"].items():
            for name in LAYER_SCALARS:
                self.writer.add_scalar(f"moe/{layer}/{name}", values[name], step)
            load = values["tokens_per_expert"]
            total = sum(load)
            if total:
                self.writer.add_histogram_raw(
                    f"moe/{layer}/expert_load", min=0, max=len(load) - 1, num=total,
                    sum=sum(e * n for e, n in enumerate(load)), sum_squares=sum(e * e * n for e, n in enumerate(load)),
                    bucket_limits=[e + 0.5 for e in range(len(load))], bucket_counts=load, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class _Recording:
    """One step inside ``routing.record``; the record is kept for ``Observer.log``."""

    def __init__(self, observer: Observer, context: ContextManager) -> None:
        self.observer, self.context = observer, context

    def __enter__(self) -> None:
        self.observer._record = self.context.__enter__()

    def __exit__(self, *exc: object) -> None:
        self.context.__exit__(*exc)
