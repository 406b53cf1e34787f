"""TokensPerSecond times finished work: host clock on CPU, CUDA events on CUDA (read one step later, so
timing never stalls the device). The CUDA path is checked with a stand-in for torch.cuda.Event."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from lightning_mp.tasks.callbacks import TokensPerSecond


class FakeEvent:
    clock = 0.0
    log: list = []

    def __init__(self, enable_timing: bool = False) -> None:
        assert enable_timing
        self.at = None
        self.synchronized = False

    def record(self) -> None:
        self.at = FakeEvent.clock

    def synchronize(self) -> None:
        self.synchronized = True

    def elapsed_time(self, end: "FakeEvent") -> float:
        assert end.synchronized, "read before the end event was waited for"
        return (end.at - self.at) * 1000.0  # milliseconds, like CUDA


def fake_module(device_type: str, logged: list) -> SimpleNamespace:
    return SimpleNamespace(device=torch.device(device_type),
                           log=lambda name, value, **kwargs: logged.append((name, float(value))))


TRAINER = SimpleNamespace(world_size=1, strategy=None)


def batch(tokens: int) -> dict:
    return {"attention_mask": torch.ones(1, tokens)}


def test_cuda_steps_are_timed_with_events_and_reported_one_step_later(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    logged: list = []
    module, callback = fake_module("cuda", logged), TokensPerSecond()
    for step, (tokens, seconds) in enumerate([(100, 2.0), (300, 3.0), (50, 1.0)]):
        callback.on_train_batch_start(TRAINER, module, batch(tokens), step)
        FakeEvent.clock += seconds  # the device works this long; the host returns at once
        callback.on_train_batch_end(TRAINER, module, None, batch(tokens), step)
    assert logged == [("tokens_per_s", 50.0), ("tokens_per_s", 100.0)]  # steps 0 and 1, logged at 1 and 2


def test_cpu_steps_use_the_host_clock(monkeypatch):
    def no_events(*args, **kwargs):
        raise AssertionError("CUDA events on a CPU module")

    monkeypatch.setattr(torch.cuda, "Event", no_events)
    logged: list = []
    module, callback = fake_module("cpu", logged), TokensPerSecond()
    callback.on_train_batch_start(TRAINER, module, batch(10), 0)
    callback.on_train_batch_end(TRAINER, module, None, batch(10), 0)
    assert len(logged) == 1 and logged[0][0] == "tokens_per_s" and logged[0][1] > 0
