"""GPU power, energy, utilisation and memory, sampled in the background while a benchmark runs.

``PowerSampler`` polls NVML (the ``nvidia-ml-py`` package, the ``telemetry`` extra, imported
lazily) from a daemon thread. Without a GPU or without the package it is a no-op that logs why
once per process, and its summary says ``available: False`` with the reason::

    with PowerSampler() as sampler:
        for _ in range(steps):
            train_step()
    summary = sampler.summary(tokens=steps * tokens_per_step)   # joules_per_token, mean_power_w, ...
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch

log = logging.getLogger(__name__)
_said: set[str] = set()


def _say_once(reason: str) -> None:
    if reason not in _said:
        _said.add(reason)
        log.warning("telemetry is off: %s", reason)


@dataclass
class TelemetrySummary:
    """What a sampler saw. Energy comes from NVML's energy counter where the GPU has one (Volta
    and newer), else from integrating the power samples over time.

    Attributes:
        available: False when nothing was sampled; ``reason`` says why.
        samples: number of power readings.
        duration_s: wall time between start and stop.
        energy_j: joules the GPU used in that time.
        mean_power_w, max_power_w: board power.
        mean_util_pct: mean GPU utilisation.
        max_memory_bytes: the most device memory in use.
        joules_per_token: ``energy_j / tokens`` when ``tokens`` was given.
    """

    available: bool
    reason: str = ""
    samples: int = 0
    duration_s: float = 0.0
    energy_j: Optional[float] = None
    mean_power_w: Optional[float] = None
    max_power_w: Optional[float] = None
    mean_util_pct: Optional[float] = None
    max_memory_bytes: Optional[int] = None
    joules_per_token: Optional[float] = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return asdict(self)


def _nvml(device_index: Optional[int]) -> tuple[Any, Any]:
    """``(pynvml, handle)``; raises ``RuntimeError`` with the reason when NVML cannot be used."""
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device")
    if device_index is None:
        device_index = torch.cuda.current_device()
    try:
        import pynvml  # the nvidia-ml-py package
    except ImportError as error:
        raise RuntimeError("nvidia-ml-py is not installed (pip install 'expert_parallel[telemetry]')") \
            from error
    try:
        pynvml.nvmlInit()
        return pynvml, pynvml.nvmlDeviceGetHandleByIndex(device_index)
    except Exception as error:  # noqa: BLE001 - any NVML failure means no telemetry
        raise RuntimeError(f"NVML failed: {error}") from error


class PowerSampler:
    """Sample one GPU every ``interval_s`` seconds between ``start()`` and ``stop()``.

    Args:
        device_index: the NVML index of the GPU; default the current CUDA device.
        interval_s: the polling period.
    """

    def __init__(self, device_index: Optional[int] = None, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.reason = ""
        self._nvml = self._handle = None
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._readings: list[tuple[float, float, float, int]] = []  # time, watts, util %, bytes
        self._energy_mj: list[int] = []
        self._times = (0.0, 0.0)
        try:
            self._nvml, self._handle = _nvml(device_index)
        except RuntimeError as error:
            self.reason = str(error)
            _say_once(self.reason)

    @property
    def available(self) -> bool:
        """Whether NVML is there to sample."""
        return self._handle is not None

    def _energy(self) -> Optional[int]:
        try:
            return self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)  # mJ since load
        except Exception:  # noqa: BLE001 - older GPUs have no energy counter
            return None

    def _poll(self) -> None:
        nvml, handle = self._nvml, self._handle
        while not self._stop.is_set():
            watts = nvml.nvmlDeviceGetPowerUsage(handle) / 1e3
            util = nvml.nvmlDeviceGetUtilizationRates(handle).gpu
            used = nvml.nvmlDeviceGetMemoryInfo(handle).used
            self._readings.append((time.perf_counter(), watts, float(util), int(used)))
            self._stop.wait(self.interval_s)

    def start(self) -> PowerSampler:
        """Begin sampling (a no-op without NVML)."""
        self._readings, self._energy_mj = [], []
        self._times = (time.perf_counter(), 0.0)
        if self.available:
            self._energy_mj.append(self._energy())
            self._stop.clear()
            self._thread = threading.Thread(target=self._poll, name="power-sampler", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """End sampling."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self._energy_mj.append(self._energy())
        self._times = (self._times[0], time.perf_counter())

    def __enter__(self) -> PowerSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def summary(self, tokens: Optional[int] = None) -> TelemetrySummary:
        """What was sampled; ``tokens`` processed in that time gives ``joules_per_token``."""
        duration = max(self._times[1] - self._times[0], 0.0)
        if not self.available:
            return TelemetrySummary(False, self.reason, duration_s=duration)
        readings = self._readings
        if not readings:
            return TelemetrySummary(False, "no samples (the run was shorter than one interval)",
                                    duration_s=duration)
        watts = [r[1] for r in readings]
        energy = _integrate(readings, self._energy_mj)
        return TelemetrySummary(
            True, samples=len(readings), duration_s=duration, energy_j=energy,
            mean_power_w=sum(watts) / len(watts), max_power_w=max(watts),
            mean_util_pct=sum(r[2] for r in readings) / len(readings),
            max_memory_bytes=max(r[3] for r in readings),
            joules_per_token=energy / tokens if tokens else None)


def _integrate(readings: list[tuple[float, float, float, int]], energy_mj: list[Optional[int]]) -> float:
    """Joules: the NVML counter's difference when both ends were read, else trapezoids of power."""
    if len(energy_mj) == 2 and None not in energy_mj:
        return (energy_mj[1] - energy_mj[0]) / 1e3
    if len(readings) == 1:
        return 0.0
    return sum((b[0] - a[0]) * (a[1] + b[1]) / 2 for a, b in zip(readings, readings[1:]))
