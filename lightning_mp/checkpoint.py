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


def model_state(model: nn.Module, full: bool, pipeline_group: dist.ProcessGroup | None = None) -> dict[str, Any]:
    """The model's state dict; ``full`` gathers every shard (collective). Under pipeline parallelism each
    rank holds other parameters: with ``pipeline_group`` a full state dict is merged over the pipeline on
    its first rank (the others get ``{}``)."""
    if not (full and pipeline_group is not None):
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=full, cpu_offload=full))
    parts = _gather_on_first(get_model_state_dict(model, options=_FULL_ON_EVERY_RANK), pipeline_group)
    return {key: value for part in parts for key, value in part.items()}


def optimizer_state(model: nn.Module, optimizer: Optimizer, full: bool,
                    pipeline_group: dist.ProcessGroup | None = None) -> dict[str, Any]:
    """Like :func:`model_state`: keyed by parameter FQNs; pipeline parts merged group by group."""
    if not (full and pipeline_group is not None):
        return get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=full, cpu_offload=full))
    parts = _gather_on_first(get_optimizer_state_dict(model, optimizer, options=_FULL_ON_EVERY_RANK), pipeline_group)
    if not parts:
        return {}
    return {"state": {k: v for part in parts for k, v in part["state"].items()},
            "param_groups": [dict(group, params=[p for part in parts for p in part["param_groups"][i]["params"]])
                             for i, group in enumerate(parts[0]["param_groups"])]}


# Gathered over FSDP/tensor ranks on every rank (torch's cpu_offload keeps it on global rank 0 only, but
# under a pipeline every stage's share is needed), then sent over the pipeline group.
_FULL_ON_EVERY_RANK = StateDictOptions(full_state_dict=True, cpu_offload=False)


def _gather_on_first(state: Any, group: dist.ProcessGroup) -> list[Any]:
    """Every pipeline rank's ``state`` (moved to CPU) on global rank 0, in stage order; ``[]`` elsewhere.

    Only the pipeline group that contains global rank 0 (the rank that writes) communicates; the
    others hold identical copies of the same stages (data/tensor peers) and have nothing to send.
    """
    members = dist.get_process_group_ranks(group)
    if 0 not in members:
        return []
    state = _to_cpu(state)
    parts: list[Any] | None = [None] * len(members) if dist.get_rank() == 0 else None
    dist.gather_object(state, parts, dst=0, group=group)
    return parts or []


def _to_cpu(tree: Any) -> Any:
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu()
    if isinstance(tree, dict):
        return {k: _to_cpu(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_to_cpu(v) for v in tree]
    return tree


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
    path: Path, model: nn.Module, optimizers: list[Optimizer], strict: bool, weights_only: bool | None,
    pipelined: bool = False,
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
    weights = checkpoint.pop("state_dict")
    if pipelined:  # this rank holds only its stages: take their entries (strict still checks those)
        owned = set(model.state_dict())
        weights = {key: value for key, value in weights.items() if key in owned}
    set_model_state_dict(model, weights, options=full)
    for optimizer, optim_state in zip(optimizers, checkpoint.pop("optimizer_states", [])):
        set_optimizer_state_dict(model, optimizer, optim_state, options=full)
    if dist.is_initialized():
        dist.barrier()
    return checkpoint
