"""What a checkpoint holds, independent of the layout that wrote it, and loading it into any layout.

Names never depend on the layout: model state is keyed by the FQNs of the unparallelized LightningModule
(torch's ``get_model_state_dict`` strips FSDP/checkpoint wrappers, pipeline stages keep their names),
and optimizer state is torch's *flattened* form, keyed by the same FQNs (``state.<fqn>.exp_avg``,
``param_groups.<fqn>.lr``) instead of by position in one rank's ``param_groups``. So a checkpoint written
with pipeline × tensor parallelism on 4 ranks loads into data parallelism on 2, or into one device.

Tied parameters are stored once (``tied.py``): with ``tied`` given, saving leaves out the entries of tied
copies and loading reads every copy from the kept entry.

Loading checks the checkpoint against the model first and names missing, unexpected and mis-shaped
entries; a truncated or corrupted file is reported with its path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
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

from lightning_mp.checkpoint.io import (
    META_FILE,
    MODEL_KEY,
    OPTIMIZER_KEY,
    CheckpointMismatchError,
    check_entries,
    is_sharded_checkpoint,
    read_full,
    require_checkpoint,
    safe_loading,
    shape_of,
    sharded_entries,
    unsafe_hint,
    without_single_process_warning,
)
from lightning_mp.checkpoint.tied import TiedNames, as_stored, stored_key, without_copies

# Under a pipeline the full state is assembled from the sharded one entry by entry (see _merge_on_rank_zero).
_SHARDED = StateDictOptions(full_state_dict=False, cpu_offload=False, flatten_optimizer_state_dict=True)


def model_state(model: nn.Module, full: bool, pipeline_group: dist.ProcessGroup | None = None,
                tied: TiedNames | None = None) -> dict[str, Any]:
    """The model's state dict; ``full`` gathers every shard (collective). Under pipeline parallelism each
    rank holds other parameters: with ``pipeline_group`` a full state dict is merged over the pipeline on
    global rank 0 (the others get ``{}``). With ``tied``, tied copies are left out (a checkpoint's form)."""
    tied = tied or {}
    if not (full and pipeline_group is not None):
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=full, cpu_offload=full))
        return without_copies(state, tied)
    return _merge_on_rank_zero(without_copies(get_model_state_dict(model, options=_SHARDED), tied), pipeline_group)


def optimizer_state(model: nn.Module, optimizer: Optimizer, full: bool,
                    pipeline_group: dist.ProcessGroup | None = None, tied: TiedNames | None = None) -> dict[str, Any]:
    """The optimizer's state, flattened and keyed by parameter FQNs; merged like :func:`model_state`. A tied
    copy's state (the last stage's, equal to the first stage's) is left out with ``tied``."""
    tied = tied or {}
    if not (full and pipeline_group is not None):
        options = StateDictOptions(full_state_dict=full, cpu_offload=full, flatten_optimizer_state_dict=True)
        return without_copies(get_optimizer_state_dict(model, optimizer, options=options), tied, optimizer=True)
    state = without_copies(get_optimizer_state_dict(model, optimizer, options=_SHARDED), tied, optimizer=True)
    return _merge_on_rank_zero(state, pipeline_group)


_HOST = torch.device("cpu")  # host memory: where a full checkpoint is assembled, whatever the compute device


def _merge_on_rank_zero(state: dict[str, Any], group: dist.ProcessGroup) -> dict[str, Any]:
    """Every pipeline rank's entries, unsharded, in one dict in global rank 0's host memory; ``{}`` elsewhere.

    Memory: entries are unsharded one at a time (every rank of a stage joins each all-gather, in the same
    order: same keys), and only the ranks that must send keep them, in host memory: the members of the
    pipeline group holding global rank 0, one copy of every stage. The others (data/tensor peers holding
    copies of the same stages) drop each entry at once. Senders then stream their entries to rank 0 one
    tensor at a time through the device (what the process group's backend needs), so no device holds more
    than one extra tensor, and nothing is pickled but names, shapes and dtypes.
    """
    members = dist.get_process_group_ranks(group)
    sends = 0 in members
    device = collective_device(group)
    kept: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, DTensor):
            value = value.full_tensor()  # collective over the stage's data/tensor ranks
        if sends:
            kept[key] = value.detach().to(_HOST) if isinstance(value, torch.Tensor) else value
    if not sends:
        return {}
    described = {k: (tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else v for k, v in kept.items()}
    parts: list[Any] | None = [None] * len(members) if dist.get_rank() == 0 else None
    dist.gather_object(described, parts, dst=0, group=group)
    if dist.get_rank() != 0:
        for value in kept.values():
            if isinstance(value, torch.Tensor):
                dist.send(value.to(device).contiguous(), dst=0, group=group)
        return {}
    assert parts is not None
    for rank, part in zip(members, parts):
        if rank == 0:
            continue
        for key, item in part.items():
            if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], torch.dtype):
                buffer = torch.empty(item[0], dtype=item[1], device=device)
                dist.recv(buffer, src=rank, group=group)
                item = buffer.to(_HOST)
            kept[key] = item
    return kept


def collective_device(group: dist.ProcessGroup) -> torch.device:
    """Where a tensor sent or received over ``group`` must be: host memory for gloo, else this rank's accelerator
    (NCCL takes no host tensors). Chosen from the group, not from the state being sent: an optimizer's first
    entry (AdamW's ``step``) is a host tensor whatever the device of the parameters."""
    if str(dist.get_backend(group)) == "gloo" or not torch.accelerator.is_available():
        return _HOST
    return torch.device(torch.accelerator.current_accelerator().type, torch.accelerator.current_device_index())


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _everyone_wants(keys: set[str]) -> set[str]:
    """The union of every rank's keys (pipeline ranks own different parameters)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return keys
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, sorted(keys))
    return set().union(*map(set, parts))


def _under(prefix: str, entries: dict[str, Any]) -> dict[str, Any]:
    return {key[len(prefix) + 1:]: value for key, value in entries.items() if key.startswith(prefix + ".")}


def load_into(path: Path, model: nn.Module, optimizers: list[Optimizer], strict: bool,
              weights_only: bool | None = None, tied: TiedNames | None = None) -> dict[str, Any]:
    """Load model (and, when ``optimizers`` are given, optimizer) state into the live, parallelized objects
    of any layout; return the rest of the checkpoint (loops, callbacks, schedulers, ...). With ``tied``,
    every tied copy this rank holds is read from the kept entry."""
    require_checkpoint(path)
    tied = tied or {}
    live_model = model_state(model, full=False)
    live_optim = [optimizer_state(model, optimizer, full=False) for optimizer in optimizers]
    # What to read, under the checkpoint's names (the live tensors; DCP reads into them in place).
    wanted_model = as_stored(live_model, tied)
    wanted_optim = [as_stored(state, tied, optimizer=True) for state in live_optim]
    # Copies saved before tied weights were stored once are not unexpected: they are left unread.
    everyone = _everyone_wants(set(wanted_model)) | set(tied)
    if is_sharded_checkpoint(path):
        entries = sharded_entries(path)
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
            rest = torch.load(path / META_FILE, weights_only=safe_loading(weights_only))
        except (Exception, CheckpointException) as error:  # CheckpointException is a BaseException
            raise CheckpointMismatchError(f"cannot read the sharded checkpoint {unsafe_hint(path, error)}") from error
        loaded_model = _as_live(live_model, state[MODEL_KEY], tied)
        set_model_state_dict(model, loaded_model, options=StateDictOptions(strict=strict))
        for index, optimizer in enumerate(optimizers):
            loaded = _as_live(live_optim[index], state[f"optimizer_{index}"], tied, optimizer=True)
            set_optimizer_state_dict(model, optimizer, loaded,
                                     options=StateDictOptions(flatten_optimizer_state_dict=True))
        return rest
    checkpoint = read_full(path, weights_only)
    weights = checkpoint.pop(MODEL_KEY)
    check_entries(path, wanted_model, {k: shape_of(v) for k, v in weights.items()}, "model", strict, everyone)
    # Under a pipeline this rank holds only its stages: it takes their entries.
    full = StateDictOptions(full_state_dict=True, strict=strict)
    set_model_state_dict(model, _as_live(live_model, weights, tied), options=full)
    saved_optim = checkpoint.pop(OPTIMIZER_KEY, [])
    if optimizers and len(saved_optim) < len(optimizers):
        raise CheckpointMismatchError(f"checkpoint {path} holds state for {len(saved_optim)} optimizers, the module"
                                      f" configures {len(optimizers)} (saved with weights_only=True?).")
    for index, (optimizer, saved, wanted) in enumerate(zip(optimizers, saved_optim, wanted_optim)):
        check_entries(path, {k: v for k, v in wanted.items() if k.startswith("state.")},
                      {k: shape_of(v) for k, v in saved.items()}, f"optimizer {index}", strict=False)
        # torch's full_state_dict loading does not take the flattened form, so the full tensors are cut into
        # this rank's shards here and loaded like a sharded checkpoint.
        local = {key: shard_like(saved[stored], value) for key, value in live_optim[index].items()
                 if (stored := stored_key(key, tied, optimizer=True)) in saved}
        set_optimizer_state_dict(model, optimizer, local, options=StateDictOptions(flatten_optimizer_state_dict=True))
    return checkpoint


def _as_live(live: dict[str, Any], stored: dict[str, Any], tied: TiedNames, optimizer: bool = False) -> dict[str, Any]:
    """The entries read under checkpoint names (``stored``), keyed by this rank's names again: each tied copy
    gets the kept entry's value. Names the checkpoint does not hold are left out (checked before)."""
    return {key: stored[name] for key in live if (name := stored_key(key, tied, optimizer)) in stored}


def shard_like(full: Any, template: Any) -> Any:
    """``full`` laid out as ``template``: this rank's shard of a DTensor (local slicing, no communication)."""
    if not isinstance(template, torch.Tensor):
        return full
    full = torch.as_tensor(full).to(device=template.device, dtype=template.dtype)
    if not isinstance(template, DTensor):
        return full
    replicated = DTensor.from_local(full, template.device_mesh, [Replicate()] * template.device_mesh.ndim,
                                    run_check=False)
    return replicated.redistribute(template.device_mesh, template.placements)
