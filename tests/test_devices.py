"""Device planning for worker processes, with GPUs simulated by count."""

from __future__ import annotations

import pytest

from worker.devices import count_gpus, plan_workers


def test_auto_without_gpu_is_one_cpu_worker() -> None:
    (plan,) = plan_workers("auto", gpu_count=0, host="h")
    assert (plan.name, plan.device, plan.env) == ("cpu@h", "cpu", {"CUDA_VISIBLE_DEVICES": ""})


def test_auto_pins_one_process_per_gpu() -> None:
    plans = plan_workers("auto", gpu_count=3, host="h")
    assert [p.name for p in plans] == ["gpu0@h", "gpu1@h", "gpu2@h"]
    assert [p.env["CUDA_VISIBLE_DEVICES"] for p in plans] == ["0", "1", "2"]
    assert {p.device for p in plans} == {"cuda:0"}  # each sees only its own GPU


def test_explicit_gpu_and_errors() -> None:
    (plan,) = plan_workers("cuda:1", gpu_count=2, host="h")
    assert (plan.name, plan.env["CUDA_VISIBLE_DEVICES"]) == ("gpu1@h", "1")
    with pytest.raises(ValueError, match="only 2 GPU"):
        plan_workers("cuda:2", gpu_count=2)
    with pytest.raises(ValueError, match="cpu, cuda:N or auto"):
        plan_workers("tpu", gpu_count=0)


def test_count_gpus_honours_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,3")
    assert count_gpus() == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert count_gpus() == 0
