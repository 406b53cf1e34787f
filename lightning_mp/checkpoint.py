"""Checkpoint I/O for parallelized modules, independent of the layout that wrote them.

Names never depend on the layout: model state is keyed by the FQNs of the unparallelized LightningModule
(torch's ``get_model_state_dict`` strips FSDP/checkpoint wrappers, pipeline stages keep their names),
and optimizer state is torch's *flattened* form, keyed by the same FQNs (``state.<fqn>.exp_avg``,
``param_groups.<fqn>.lr``) instead of by position in one rank's ``param_groups``. So a checkpoint written
with pipeline × tensor parallelism on 4 ranks loads into data parallelism on 2, or into one device.

Two on-disk forms, both written atomically (into a hidden sibling, renamed into place when complete, so
an interrupted save never sits where a checkpoint is expected):

- sharded: a directory written by torch.distributed.checkpoint (one file per rank + ``.metadata``), with
  Lightning's non-tensor state (loops, callbacks, LR schedulers, hparams, per-rank RNG) in ``meta.pt``;
- full: one ``torch.save`` file written by rank 0: ``state_dict`` is what a plain LightningModule's
  ``load_state_dict`` / ``load_from_checkpoint`` takes.

Loading checks the checkpoint against the model first and names missing, unexpected and mis-shaped
entries; a truncated or corrupted file is reported with its path.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor, Replicate
from torch.optim import Optimizer

META_FILE = "meta.pt"
MODEL_KEY = "state_dict"
OPTIMIZER_KEY = "optimizer_states"
RNG_KEY = "rng_states_per_rank"
# Gathered over FSDP/tensor ranks on every rank (torch's cpu_offload keeps it on global rank 0 only, but
# under a pipeline every stage's share is needed), then sent over the pipeline group.
_FULL_ON_EVERY_RANK = StateDictOptions(full_state_dict=True, cpu_offload=False, flatten_optimizer_state_dict=True)


class CheckpointMismatchError(ValueError):
    """The checkpoint does not fit the model: names the missing, unexpected or mis-shaped entries."""


# ---------------------------------------------------------------- state dicts
def model_state(model: nn.Module, full: bool, pipeline_group: dist.ProcessGroup | None = None) -> dict[str, Any]:
    """The model's state dict; ``full`` gathers every shard (collective). Under pipeline parallelism each
    rank holds other parameters: with ``pipeline_group`` a full state dict is merged over the pipeline on
    global rank 0 (the others get ``{}``)."""
    if not (full and pipeline_group is not None):
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=full, cpu_offload=full))
    return _merge_on_rank_zero(get_model_state_dict(model, options=_FULL_ON_EVERY_RANK), pipeline_group)


def optimizer_state(model: nn.Module, optimizer: Optimizer, full: bool,
                    pipeline_group: dist.ProcessGroup | None = None) -> dict[str, Any]:
    """The optimizer's state, flattened and keyed by parameter FQNs; merged like :func:`model_state`."""
    if not (full and pipeline_group is not None):
        options = StateDictOptions(full_state_dict=full, cpu_offload=full, flatten_optimizer_state_dict=True)
        return get_optimizer_state_dict(model, optimizer, options=options)
    return _merge_on_rank_zero(get_optimizer_state_dict(model, optimizer, options=_FULL_ON_EVERY_RANK),
                               pipeline_group)


def _merge_on_rank_zero(state: dict[str, Any], group: dist.ProcessGroup) -> dict[str, Any]:
    """Every pipeline rank's entries in one dict on global rank 0; ``{}`` elsewhere.

    Only the pipeline group that contains global rank 0 (the rank that writes) communicates; the others
    hold copies of the same stages (data/tensor peers) and have nothing to send.
    """
    members = dist.get_process_group_ranks(group)
    if 0 not in members:
        return {}
    state = {key: value.detach().cpu() if isinstance(value, torch.Tensor) else value for key, value in state.items()}
    parts: list[Any] | None = [None] * len(members) if dist.get_rank() == 0 else None
    dist.gather_object(state, parts, dst=0, group=group)
    return {key: value for part in parts or [] for key, value in part.items()}


# ---------------------------------------------------------------- random state
def rng_state() -> dict[str, Any]:
    """This process's random state (torch, CUDA, numpy, Python) in types ``torch.load(weights_only=True)``
    accepts, so a checkpoint stays loadable by ``LightningModule.load_from_checkpoint``."""
    state = _collect_rng_states()
    if "numpy" in state:
        name, keys, position, has_gauss, cached = state["numpy"]
        state["numpy"] = (name, torch.from_numpy(keys.astype("int64")), int(position), int(has_gauss), float(cached))
    return state


def with_rng_states(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """``checkpoint`` plus every rank's random state (dropout masks differ by rank), so a resumed run draws
    what the interrupted one would have. Collective."""
    states: list[Any] = [rng_state()]
    if dist.is_initialized():
        states = [None] * dist.get_world_size()
        dist.all_gather_object(states, rng_state())
    return {**checkpoint, RNG_KEY: states}


def restore_rng_states(rest: dict[str, Any]) -> None:
    """Take this rank's random state out of a loaded checkpoint; applied when the world size is the same
    (another layout size has other streams: nothing to continue)."""
    states = rest.pop(RNG_KEY, None)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if states is not None and len(states) == world:
        set_rng_state(states[rank])


def set_rng_state(state: dict[str, Any]) -> None:
    state = dict(state)
    if "numpy" in state:
        import numpy as np

        name, keys, position, has_gauss, cached = state["numpy"]
        state["numpy"] = (name, keys.numpy().astype(np.uint32), position, has_gauss, cached)
    _set_rng_states(state)


# ---------------------------------------------------------------- writing
def is_sharded_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / ".metadata").is_file()


def _staging(path: Path) -> Path:
    """Where a checkpoint is written before it is complete: hidden, next to its final place (same file
    system, so the rename is atomic), the same name on every rank."""
    return path.with_name(f".{path.name}.partial")


def _replace(staging: Path, path: Path) -> None:
    """Put a complete checkpoint in place. A file is replaced atomically; a directory cannot be, so the
    old one is moved aside first and deleted after (a crash in between leaves it as ``.NAME.old``)."""
    if path.is_dir() and not path.is_symlink():
        old = path.with_name(f".{path.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(path, old)
        os.replace(staging, path)
        shutil.rmtree(old)
    else:
        os.replace(staging, path)


@contextlib.contextmanager
def without_single_process_warning():
    """torch.distributed.checkpoint run by one process without a process group (convert, a plain module):
    that is what we mean there, so torch's warning that it is "assuming" so would only alarm the user."""
    if dist.is_initialized():  # a real job: leave the (process-global) warning filters alone
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed is .*assuming the intent is to")
        yield


def save_full(checkpoint: dict[str, Any], path: Path) -> None:
    """One file, written by the caller (rank 0) only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = _staging(path)
    torch.save(checkpoint, staging)
    _replace(staging, path)


def save_sharded(checkpoint: dict[str, Any], path: Path, is_rank_zero: bool, barrier: Callable[[], None]) -> None:
    """A torch.distributed.checkpoint directory; every rank calls this (collective)."""
    checkpoint = dict(checkpoint)
    tensors = {MODEL_KEY: checkpoint.pop(MODEL_KEY)}
    for index, state in enumerate(checkpoint.pop(OPTIMIZER_KEY, [])):
        tensors[f"optimizer_{index}"] = state
    staging = _staging(path)
    if is_rank_zero:
        if staging.exists():  # left by an interrupted save
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
    barrier()
    with without_single_process_warning():
        dcp.save(tensors, checkpoint_id=staging)  # returns on rank 0 once every rank's files and .metadata exist
    if is_rank_zero:
        torch.save(checkpoint, staging / META_FILE)
        _replace(staging, path)


# ---------------------------------------------------------------- reading
def read_full(path: Path, weights_only: bool | None = None) -> dict[str, Any]:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=bool(weights_only), mmap=True)
    except Exception as error:  # a truncated zip, a pickle error, ...
        raise CheckpointMismatchError(f"cannot read the checkpoint file {path}: {_last_line(error)}") from error
    if not isinstance(checkpoint, dict) or MODEL_KEY not in checkpoint:
        raise CheckpointMismatchError(f"{path} is not a Lightning checkpoint: it has no {MODEL_KEY!r} entry.")
    return checkpoint


def _last_line(error: BaseException) -> str:
    """The cause of a (possibly multi-rank, multi-line) reading error, without its tracebacks."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _require_checkpoint(path: Path) -> None:
    if is_sharded_checkpoint(path) or path.is_file():
        return
    if path.is_dir():
        raise CheckpointMismatchError(
            f"{path} is not a complete sharded checkpoint: its .metadata file is missing (an interrupted save"
            " leaves its files in a hidden '.NAME.partial' directory, never here, so this directory was not"
            " written by lightning_mp or was damaged)."
        )
    partial, old = _staging(path), path.with_name(f".{path.name}.old")
    hint = f"; {partial} is an interrupted save and cannot be used" if partial.exists() else ""
    if old.exists():
        hint += f"; {old} is the previous checkpoint, left by a crash while it was being replaced"
    raise FileNotFoundError(f"No checkpoint at {path}: neither a file nor a sharded checkpoint directory{hint}.")


def _shape(value: Any) -> tuple[int, ...] | None:
    return tuple(value.shape) if isinstance(value, (torch.Tensor, DTensor)) else None


def check_entries(path: Path, wanted: dict[str, Any], available: dict[str, tuple[int, ...] | None], what: str,
                  strict: bool, everyone_wants: set[str] | None = None) -> None:
    """Raise if ``wanted`` (this rank's entries) is not in ``available`` (the checkpoint's), if shapes
    differ, or (``strict``) if the checkpoint holds entries no rank wants."""
    missing = sorted(set(wanted) - set(available))
    shapes = [f"{key}: checkpoint {available[key]} vs model {_shape(value)}" for key, value in wanted.items()
              if key in available and available[key] is not None and _shape(value) is not None
              and tuple(available[key]) != _shape(value)]
    unexpected = sorted(set(available) - (everyone_wants if everyone_wants is not None else set(wanted)))
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} {what} entries: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    if shapes:
        problems.append(f"{len(shapes)} with other shapes: {'; '.join(shapes[:5])}")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected {what} entries: {', '.join(unexpected[:8])}"
                        f"{' ...' if len(unexpected) > 8 else ''}")
    if problems:
        raise CheckpointMismatchError(f"checkpoint {path} does not fit the model: {'; '.join(problems)}.")


def _everyone_wants(keys: set[str]) -> set[str]:
    """The union of every rank's keys (pipeline ranks own different parameters)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return keys
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, sorted(keys))
    return set().union(*map(set, parts))


def _sharded_entries(path: Path) -> dict[str, tuple[int, ...] | None]:
    try:
        metadata = dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as error:
        raise CheckpointMismatchError(f"cannot read {path / '.metadata'}: {error}") from error
    return {key: tuple(item.size) if hasattr(item, "size") else None
            for key, item in metadata.state_dict_metadata.items()}


def _under(prefix: str, entries: dict[str, Any]) -> dict[str, Any]:
    return {key[len(prefix) + 1:]: value for key, value in entries.items() if key.startswith(prefix + ".")}


def load_into(path: Path, model: nn.Module, optimizers: list[Optimizer], strict: bool,
              weights_only: bool | None = None) -> dict[str, Any]:
    """Load model (and, when ``optimizers`` are given, optimizer) state into the live, parallelized objects
    of any layout; return the rest of the checkpoint (loops, callbacks, schedulers, ...)."""
    _require_checkpoint(path)
    wanted_model = model_state(model, full=False)
    wanted_optim = [optimizer_state(model, optimizer, full=False) for optimizer in optimizers]
    everyone = _everyone_wants(set(wanted_model))
    if is_sharded_checkpoint(path):
        entries = _sharded_entries(path)
        check_entries(path, wanted_model, _under(MODEL_KEY, entries), "model", strict, everyone)
        state = {MODEL_KEY: wanted_model}
        for index, wanted in enumerate(wanted_optim):
            saved = _under(f"optimizer_{index}", entries)
            if not saved:
                raise CheckpointMismatchError(f"checkpoint {path} holds no state for optimizer {index}"
                                              " (saved with weights_only=True?); it cannot resume training.")
            check_entries(path, {k: v for k, v in wanted.items() if k.startswith("state.")}, saved,
                          f"optimizer {index}", strict=False)
            state[f"optimizer_{index}"] = wanted
        try:
            with without_single_process_warning():
                dcp.load(state, checkpoint_id=path)
            rest = torch.load(path / META_FILE, weights_only=bool(weights_only))
        except (Exception, CheckpointException) as error:  # CheckpointException is a BaseException
            raise CheckpointMismatchError(f"cannot read the sharded checkpoint {path}: {_last_line(error)}") from error
        set_model_state_dict(model, state[MODEL_KEY], options=StateDictOptions(strict=strict))
        for index, optimizer in enumerate(optimizers):
            set_optimizer_state_dict(model, optimizer, state[f"optimizer_{index}"],
                                     options=StateDictOptions(flatten_optimizer_state_dict=True))
        return rest
    checkpoint = read_full(path, weights_only)
    weights = checkpoint.pop(MODEL_KEY)
    check_entries(path, wanted_model, {k: _shape(v) for k, v in weights.items()}, "model", strict, everyone)
    # Under a pipeline this rank holds only its stages: it takes their entries.
    full = StateDictOptions(full_state_dict=True, strict=strict)
    set_model_state_dict(model, {k: v for k, v in weights.items() if k in wanted_model}, options=full)
    saved_optim = checkpoint.pop(OPTIMIZER_KEY, [])
    if optimizers and len(saved_optim) < len(optimizers):
        raise CheckpointMismatchError(f"checkpoint {path} holds state for {len(saved_optim)} optimizers, the module"
                                      f" configures {len(optimizers)} (saved with weights_only=True?).")
    for index, (optimizer, saved, wanted) in enumerate(zip(optimizers, saved_optim, wanted_optim)):
        check_entries(path, {k: v for k, v in wanted.items() if k.startswith("state.")},
                      {k: _shape(v) for k, v in saved.items()}, f"optimizer {index}", strict=False)
        # torch's full_state_dict loading does not take the flattened form, so the full tensors are cut into
        # this rank's shards here and loaded like a sharded checkpoint.
        local = {key: _like(saved[key], value) for key, value in wanted.items() if key in saved}
        set_optimizer_state_dict(model, optimizer, local, options=StateDictOptions(flatten_optimizer_state_dict=True))
    return checkpoint


def _like(full: Any, template: Any) -> Any:
    """``full`` laid out as ``template``: this rank's shard of a DTensor (local slicing, no communication)."""
    if not isinstance(template, torch.Tensor):
        return full
    full = torch.as_tensor(full).to(device=template.device, dtype=template.dtype)
    if not isinstance(template, DTensor):
        return full
    replicated = DTensor.from_local(full, template.device_mesh, [Replicate()] * template.device_mesh.ndim,
                                    run_check=False)
    return replicated.redistribute(template.device_mesh, template.placements)
