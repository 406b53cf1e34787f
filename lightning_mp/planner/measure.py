"""Bytes a rank actually holds for parameters and optimizer state (local shards only)."""

from __future__ import annotations

from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer


def _local_bytes(tensor: Tensor) -> int:
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.numel() * local.element_size()


def local_state_bytes(model: nn.Module, optimizer: Optimizer | None = None) -> dict[str, int]:
    params = sum(_local_bytes(p) for p in model.parameters())
    optim = 0
    if optimizer is not None:
        for state in optimizer.state.values():
            optim += sum(_local_bytes(v) for v in state.values() if isinstance(v, Tensor) and v.dim() > 0)
    return {"parameters": params, "optimizer": optim}
