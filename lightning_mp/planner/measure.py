"""What a rank actually holds: bytes of parameters and optimizer state (local shards only), and the
activations autograd keeps for backward during a training step."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.multiprocessing.reductions import StorageWeakRef
from torch.optim import Optimizer

from lightning_mp._compat import is_traceable_wrapper_subclass
from lightning_mp.parallel.activation_checkpointing import kept_output_watchers


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


class SavedActivationBytes(Callback):
    """Bytes autograd keeps for backward during each training step, counted once per storage, parameters
    (and views of them) excluded: ``peak`` over the steps, and ``held_between_steps`` (what is still held
    when a step starts; nothing should be). The activation memory the planner's formula estimates; CPU
    tensors have no allocator statistics, and this counts what autograd holds on any device.

    Under activation checkpointing a block's input is saved through these hooks, and the outputs selective
    checkpointing keeps are reported by its policy (``kept_output_watchers``) and counted until their
    storage is freed. Not seen: what a block's recomputation keeps in backward (checkpointing's own hooks
    hide it) and the keyword arguments a checkpoint holds (rotary cos/sin: one small table per step)."""

    def __init__(self) -> None:
        self.live, self.peak, self.held_between_steps = 0, 0, 0
        self._refs: dict[int, tuple[int, int]] = {}
        self._kept: dict[int, StorageWeakRef] = {}  # outputs selective checkpointing holds, until freed
        self._module: nn.Module | None = None
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def on_train_batch_start(self, trainer: Any, pl_module: nn.Module, *args: Any) -> None:
        self._module = pl_module
        self._release_freed()
        self.held_between_steps = max(self.held_between_steps, self.live)
        self._hooks.__enter__()
        kept_output_watchers.append(self._keep)

    def on_train_batch_end(self, *args: Any) -> None:
        self._hooks.__exit__(None, None, None)
        kept_output_watchers.remove(self._keep)
        self._release_freed()

    def _keep(self, output: Any) -> None:
        self._release_freed()  # before adding: a freed storage's address may be reused
        for tensor in (output if isinstance(output, (tuple, list)) else (output,)):
            if not isinstance(tensor, Tensor):
                continue
            storage = _plain(tensor).untyped_storage()
            key = storage.data_ptr()
            if key in self._kept or key in self._parameter_storages():
                continue
            self._kept[key] = StorageWeakRef(storage)
            self._add(key, storage.nbytes())

    def _release_freed(self) -> None:
        for key in [key for key, ref in self._kept.items() if ref.expired()]:
            del self._kept[key]
            self._release(key)

    def _add(self, key: int, size: int) -> None:
        count, size = self._refs.get(key, (0, size))
        if count == 0:
            self.live += size
            self.peak = max(self.peak, self.live)
        self._refs[key] = (count + 1, size)

    def _parameter_storages(self) -> set[int]:
        # Read at every pack: FSDP swaps sharded and gathered (unsharded) parameters during a step.
        assert self._module is not None
        return {_plain(p).untyped_storage().data_ptr() for p in self._module.parameters()}

    def _pack(self, tensor: Tensor) -> Any:
        storage = _plain(tensor).untyped_storage()
        key = storage.data_ptr()
        if key in self._parameter_storages():  # a linear keeps its weight (or its transpose): not an activation
            return tensor
        self._release_freed()
        self._add(key, storage.nbytes())
        # A detached alias (same storage): holding the tensor itself would, for a tensor saved by the op that
        # produced it, make a cycle (its grad_fn holds this object, this object holds it) that only a backward
        # breaks, so a forward never followed by a backward (torch's shape inference on the first pipeline
        # stage) would stay alive because of the measurement alone.
        return _Held(tensor.detach(), key, self)

    @staticmethod
    def _unpack(held: Any) -> Tensor:
        return held.tensor if isinstance(held, _Held) else held

    def _release(self, key: int) -> None:
        count, size = self._refs[key]
        if count == 1:
            del self._refs[key]
            self.live -= size
        else:
            self._refs[key] = (count - 1, size)


class _Held:
    __slots__ = ("tensor", "key", "owner")

    def __init__(self, tensor: Tensor, key: int, owner: SavedActivationBytes) -> None:
        self.tensor, self.key, self.owner = tensor, key, owner

    def __del__(self) -> None:
        self.owner._release(self.key)


def _plain(tensor: Tensor) -> Tensor:
    """The tensor holding the bytes: a DTensor's local shard; the inner tensor of a wrapper such as the
    AsyncCollectiveTensor a row-wise layer's all-reduce returns (a wrapper has no storage of its own)."""
    if isinstance(tensor, DTensor):
        return _plain(tensor._local_tensor)
    if is_traceable_wrapper_subclass(tensor):
        inner, _ = tensor.__tensor_flatten__()
        return _plain(getattr(tensor, inner[0]))
    return tensor
