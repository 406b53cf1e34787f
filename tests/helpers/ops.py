"""Counting the aten ops a backward runs: evidence of what activation checkpointing recomputes."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

MATMULS = {"mm", "addmm", "bmm", "baddbmm"}


class CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))

    def total(self, names: set[str] | None = None) -> int:
        return sum(n for name, n in self.counts.items() if names is None or name in names)


def backward_ops(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[CountOps, dict[str, torch.Tensor]]:
    loss = model(**batch).loss
    with CountOps() as counted:
        loss.backward()
    return counted, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
