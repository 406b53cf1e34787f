"""Checkpoint I/O for parallelized modules.

State dicts are always keyed by the FQNs of the unparallelized model (torch's
``get_model_state_dict`` strips FSDP/checkpoint wrappers and gathers DTensors), so a checkpoint does not
depend on the layout that wrote it. Two on-disk forms:

- sharded: a directory written by torch.distributed.checkpoint (one file per rank + ``.metadata``), with
  Lightning's non-tensor state (loops, callbacks, hparams) in ``meta.pt`` written by rank 0;
- full: one ``torch.save`` file on rank 0, readable by a plain single-device LightningModule.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.optim import Optimizer

META_FILE = "meta.pt"


def model_state(model: nn.Module, full: bool) -> dict[str, Any]:
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=full, cpu_offload=full))


def optimizer_state(model: nn.Module, optimizer: Optimizer, full: bool) -> dict[str, Any]:
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=full, cpu_offload=full))


def is_sharded_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / ".metadata").is_file()


def save_sharded(checkpoint: dict[str, Any], path: Path, is_rank_zero: bool) -> None:
    tensors = {"state_dict": checkpoint.pop("state_dict")}
    for index, state in enumerate(checkpoint.pop("optimizer_states", [])):
        tensors[f"optimizer_{index}"] = state
    path.mkdir(parents=True, exist_ok=True)
    dcp.save(tensors, checkpoint_id=path)
    if is_rank_zero:
        torch.save(checkpoint, path / META_FILE)


def load_into(
    path: Path, model: nn.Module, optimizers: list[Optimizer], strict: bool, weights_only: bool | None
) -> dict[str, Any]:
    """Load model (and optimizer) state into the live, parallelized objects; return the rest."""
    if is_sharded_checkpoint(path):
        state = {"state_dict": model_state(model, full=False)}
        for index, optimizer in enumerate(optimizers):
            state[f"optimizer_{index}"] = optimizer_state(model, optimizer, full=False)
        dcp.load(state, checkpoint_id=path)
        set_model_state_dict(model, state.pop("state_dict"), options=StateDictOptions(strict=strict))
        for index, optimizer in enumerate(optimizers):
            set_optimizer_state_dict(model, optimizer, state.pop(f"optimizer_{index}"))
        return torch.load(path / META_FILE, weights_only=bool(weights_only))
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path}: neither a file nor a sharded checkpoint directory.")
    checkpoint = torch.load(path, map_location="cpu", weights_only=bool(weights_only), mmap=True)
    full = StateDictOptions(full_state_dict=True, strict=strict)
    set_model_state_dict(model, checkpoint.pop("state_dict"), options=full)
    for optimizer, optim_state in zip(optimizers, checkpoint.pop("optimizer_states", [])):
        set_optimizer_state_dict(model, optimizer, optim_state, options=full)
    if dist.is_initialized():
        dist.barrier()
    return checkpoint
