"""Telemetry: a no-op that says so once without a GPU or NVML; energy from NVML's counter or
from power samples, against closed forms (a fake NVML stands in for the GPU)."""

from __future__ import annotations

import logging
import sys
import time
import types

import pytest

from expert_parallel import telemetry
from expert_parallel.telemetry import PowerSampler


@pytest.fixture(autouse=True)
def _fresh_notices(monkeypatch):
    monkeypatch.setattr(telemetry, "_said", set())


def test_without_a_gpu_the_sampler_is_a_no_op_that_says_so_once(monkeypatch, caplog):
    monkeypatch.setattr(telemetry.torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="expert_parallel.telemetry"):
        for _ in range(3):
            with PowerSampler() as sampler:
                pass
    summary = sampler.summary(tokens=100)
    assert not summary.available and summary.reason == "no CUDA device"
    assert summary.energy_j is None and summary.joules_per_token is None
    assert [r.getMessage() for r in caplog.records] == ["telemetry is off: no CUDA device"]


def test_without_nvidia_ml_py_the_reason_names_the_extra(monkeypatch):
    monkeypatch.setattr(telemetry.torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    summary = PowerSampler(device_index=0).start().summary()
    assert not summary.available and "expert_parallel[telemetry]" in summary.reason


def _fake_nvml(watts: float, energy_counter: bool) -> types.ModuleType:
    clock = {"mj": 1000}

    def energy(handle):
        if not energy_counter:
            raise RuntimeError("not supported")
        clock["mj"] += 5000
        return clock["mj"]

    return types.SimpleNamespace(
        nvmlInit=lambda: None, nvmlDeviceGetHandleByIndex=lambda index: f"gpu{index}",
        nvmlDeviceGetPowerUsage=lambda handle: int(watts * 1000),
        nvmlDeviceGetUtilizationRates=lambda handle: types.SimpleNamespace(gpu=50),
        nvmlDeviceGetMemoryInfo=lambda handle: types.SimpleNamespace(used=2**30),
        nvmlDeviceGetTotalEnergyConsumption=energy)


def test_energy_is_the_nvml_counter_difference_when_the_gpu_has_one(monkeypatch):
    monkeypatch.setattr(telemetry.torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml(200.0, energy_counter=True))
    with PowerSampler(device_index=0, interval_s=0.005) as sampler:
        time.sleep(0.03)
    summary = sampler.summary(tokens=10)
    assert summary.available and summary.samples >= 1
    assert summary.energy_j == pytest.approx(5.0)  # two reads, 5000 mJ apart
    assert summary.joules_per_token == pytest.approx(0.5)
    assert summary.mean_power_w == pytest.approx(200.0) and summary.max_memory_bytes == 2**30
    assert summary.mean_util_pct == pytest.approx(50.0)


def test_energy_integrates_power_without_a_counter():
    readings = [(0.0, 100.0, 0.0, 0), (1.0, 100.0, 0.0, 0), (3.0, 200.0, 0.0, 0)]
    # trapezoids: 1 s at 100 W + 2 s from 100 to 200 W = 100 + 300 J
    assert telemetry._integrate(readings, [None, None]) == pytest.approx(400.0)
    assert telemetry._integrate(readings, [1000, 4000]) == pytest.approx(3.0)
