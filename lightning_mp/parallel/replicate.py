"""Replicated data parallelism: every rank holds the whole model; gradients are averaged in buckets.

What DDP does, without wrapping the model (its class, parameter names and state dict stay as they
are) and over whatever tensor parallelism left behind: a DTensor parameter's local shard is averaged
over the data-parallel ranks like a plain tensor. Why not FSDP2 on a size-1 shard group (what the
replicated mode was before): it copies every unit's parameters in before each forward and backward and
reduces once per unit, a fixed cost per block and step that DDP does not pay (benchmarks/peers.py).

Buckets: parameters in reverse registration order (roughly the order backward produces their
gradients), the first bucket small (1 MiB) so that communication starts early, the others up to 25 MiB
(DDP's defaults). During backward a bucket's all-reduce is launched, asynchronously, as soon as every
gradient in it is accumulated and every bucket before it was launched, so all ranks issue the same
collectives in the same order and the reduction overlaps the rest of backward. At the end of backward
(an autograd engine callback) the remaining buckets are launched, all are awaited and the averages are
copied back into ``.grad``. A parameter without a gradient (unused in this forward) is left out of its
bucket and keeps ``.grad = None``, as in one process; like FSDP2 and DDP (without
``find_unused_parameters``) this assumes every data-parallel rank leaves out the same ones.

Under a pipeline the stages' backward runs microbatch by microbatch inside torch's schedule; the hooks
stay off there and the pipeline runtime calls :meth:`ReplicatedGradients.reduce` once after the schedule.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from lightning_mp._compat import queue_backward_callback

FIRST_BUCKET_BYTES = 1 * 2**20
BUCKET_BYTES = 25 * 2**20


def _local(tensor: Tensor) -> Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class _Bucket:
    def __init__(self, parameters: list[nn.Parameter]) -> None:
        self.parameters = parameters
        self.ready = 0
        self.grads: list[Tensor] = []  # the local gradients being reduced, in bucket order
        self.flat: Optional[Tensor] = None
        self.work: Optional[dist.Work] = None


class ReplicatedGradients:
    """Average the gradients of ``parameters`` over ``group`` after every backward (``overlap=True``:
    bucket by bucket during backward), or when :meth:`reduce` is called (``overlap=False``)."""

    def __init__(self, parameters: Iterable[nn.Parameter], group: dist.ProcessGroup, overlap: bool = True,
                 first_bucket_bytes: int = FIRST_BUCKET_BYTES, bucket_bytes: int = BUCKET_BYTES) -> None:
        unique = {id(p): p for p in parameters if p.requires_grad}
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.buckets = _assign_buckets(list(unique.values())[::-1], first_bucket_bytes, bucket_bytes)
        self._bucket_of = {id(p): bucket for bucket in self.buckets for p in bucket.parameters}
        self._next_launch = 0
        self._callback_queued = False
        hooked = unique.values() if overlap else ()
        self._handles = [p.register_post_accumulate_grad_hook(self._on_gradient) for p in hooked]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ------------------------------------------------------------ during backward
    def _on_gradient(self, parameter: Tensor) -> None:
        if not self._callback_queued:
            queue_backward_callback(self._finish)
            self._callback_queued = True
        bucket = self._bucket_of[id(parameter)]
        bucket.ready += 1
        # In bucket order only: every rank must issue the same all-reduces in the same order.
        while self._next_launch < len(self.buckets) and self._is_full(self.buckets[self._next_launch]):
            self._launch(self.buckets[self._next_launch])
            self._next_launch += 1

    @staticmethod
    def _is_full(bucket: _Bucket) -> bool:
        return bucket.ready >= len(bucket.parameters)

    def _finish(self) -> None:
        self._callback_queued = False
        self.reduce()

    # ------------------------------------------------------------ reduction
    def reduce(self) -> None:
        """Launch every bucket not launched yet, wait for all of them and write the averages to ``.grad``."""
        with torch.no_grad():
            for bucket in self.buckets[self._next_launch:]:
                self._launch(bucket)
            for bucket in self.buckets:
                self._write_back(bucket)
        self._next_launch = 0

    def _launch(self, bucket: _Bucket) -> None:
        with torch.no_grad():
            bucket.grads = [_local(p.grad) for p in bucket.parameters if p.grad is not None]
            if not bucket.grads:
                return
            bucket.flat = torch.cat([grad.reshape(-1) for grad in bucket.grads])
            bucket.work = dist.all_reduce(bucket.flat, group=self.group, async_op=True)

    def _write_back(self, bucket: _Bucket) -> None:
        if bucket.work is not None:
            bucket.work.wait()
            values = bucket.flat.div_(self.world_size).split([grad.numel() for grad in bucket.grads])
            for grad, value in zip(bucket.grads, values):
                grad.copy_(value.view_as(grad))
        bucket.ready = 0
        bucket.flat = bucket.work = None
        bucket.grads = []


def _assign_buckets(parameters: list[nn.Parameter], first_bytes: int, later_bytes: int) -> list[_Bucket]:
    """Consecutive parameters of one dtype and device per bucket, up to the byte limit."""
    buckets: list[list[nn.Parameter]] = []
    size, key = 0, None
    for parameter in parameters:
        local = _local(parameter)
        limit = first_bytes if len(buckets) <= 1 else later_bytes
        this_key = (local.dtype, local.device)
        if not buckets or this_key != key or size >= limit:
            buckets.append([])
            size, key = 0, this_key
        buckets[-1].append(parameter)
        size += local.numel() * local.element_size()
    return [_Bucket(group) for group in buckets]


def is_replicated(module: nn.Module) -> bool:
    return isinstance(getattr(module, REDUCER_ATTRIBUTE, None), ReplicatedGradients)


REDUCER_ATTRIBUTE = "_lightning_mp_replicated_gradients"


def replicate(root: nn.Module, group: dist.ProcessGroup) -> ReplicatedGradients:
    """Average the gradients of every parameter of ``root`` over ``group`` after each backward; the reducer
    is kept on ``root`` (so that a second ``setup`` sees the module is parallelized already)."""
    reducer = ReplicatedGradients(root.parameters(), group)
    object.__setattr__(root, REDUCER_ATTRIBUTE, reducer)
    return reducer
