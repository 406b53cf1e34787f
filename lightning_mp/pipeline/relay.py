"""What the rank holding the last pipeline stage tells its pipeline peers every step.

Only the last stage has the outputs, the loss and whatever the user's ``training_step`` logged; every
pipeline rank must log the same names (``sync_dist`` reductions are collective, and the logger lives on
global rank 0, which holds the first stage). Numbers travel as one device tensor per step, so no rank
waits for its device to finish (no ``.item()``, no pickling of device data). Names, log options and
shapes are host objects: they go over a host-side group, and the log names only when they change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from lightning_mp._compat import tree_flatten, tree_unflatten

LoggedValues = dict[str, tuple[Tensor, dict]]


class StepRelay:
    """Broadcasts from the last stage's rank (``source``, a global rank) to the pipeline group.

    ``group``: the pipeline ranks' device group; ``host_group``: the same ranks over a group that takes
    host tensors (the same group on a CPU mesh, see ``mesh.host_group``).
    """

    def __init__(self, group: dist.ProcessGroup, host_group: dist.ProcessGroup, source: int,
                 is_source: bool, device: torch.device, tensor_mesh: Optional[DeviceMesh] = None) -> None:
        """``tensor_mesh``: the tensor-parallel mesh, on which DTensor outputs (vocabulary-sharded logits under
        loss parallelism) are rebuilt on the receiving ranks."""
        self.group = group
        self.tensor_mesh = tensor_mesh
        self.host_group = host_group
        self.source = source
        self.is_source = is_source
        self.device = device
        self._schema: Optional[tuple[tuple[str, dict], ...]] = None  # the log names and options last sent

    def step_results(self, loss: Optional[Tensor], logs: Optional[LoggedValues]) -> tuple[Tensor, LoggedValues]:
        """(the batch loss, the logged values) on every pipeline rank; ``loss``/``logs`` are read on the source."""
        schema = tuple((name, options) for name, (_, options) in logs.items()) if self.is_source else None
        changed = torch.tensor([int(self.is_source and schema != self._schema)], dtype=torch.int32)
        dist.broadcast(changed, src=self.source, group=self.host_group)
        if int(changed[0]):  # a host tensor: reading it does not wait for the device
            self._schema = self.object(schema)
        names = self._schema or ()
        if self.is_source:
            values = torch.stack([loss.reshape(())] + [logs[name][0].reshape(()).to(loss.dtype) for name, _ in names])
        else:
            values = torch.empty(1 + len(names), dtype=torch.float32, device=self.device)
        dist.broadcast(values, src=self.source, group=self.group)
        return values[0], {name: (values[1 + i], options) for i, (name, options) in enumerate(names)}

    def object(self, obj: Any) -> Any:
        """A picklable host object from the source, over the host group."""
        holder = [obj]
        dist.broadcast_object_list(holder, src=self.source, group=self.host_group)
        return holder[0]

    def tree(self, tree: Any) -> Any:
        """The last stage's output (tensors, tuples, None) on every pipeline rank: its structure, shapes and
        dtypes over the host group, then each tensor over the device group. A DTensor travels as its local
        shard: each tensor rank's pipeline group carries its own shard, rebuilt with the same placements."""
        meta = None
        if self.is_source:
            leaves, spec = tree_flatten(tree)
            meta = (spec, [_Sent.of(t) if isinstance(t, Tensor) else t for t in leaves])
        spec, described = self.object(meta)
        received = []
        for index, item in enumerate(described):
            if not isinstance(item, _Sent):
                received.append(item)
                continue
            if self.is_source:
                leaf = leaves[index]
                tensor = (leaf.to_local() if isinstance(leaf, DTensor) else leaf).contiguous()
            else:
                tensor = torch.empty(item.shape, dtype=item.dtype, device=self.device)
            dist.broadcast(tensor, src=self.source, group=self.group)
            if item.placements is not None:
                tensor = leaves[index] if self.is_source else item.rebuild(tensor, self.tensor_mesh)
            received.append(tensor)
        return tree_unflatten(received, spec)


@dataclass(frozen=True)
class _Sent:
    """What the receiving ranks need to allocate a tensor (the local shard's, for a DTensor) and rebuild it."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    placements: Optional[tuple] = None
    global_shape: Optional[tuple[int, ...]] = None
    global_stride: Optional[tuple[int, ...]] = None

    @staticmethod
    def of(tensor: Tensor) -> "_Sent":
        if isinstance(tensor, DTensor):
            return _Sent(tuple(tensor.to_local().shape), tensor.dtype, tuple(tensor.placements), tuple(tensor.shape),
                         tuple(tensor.stride()))
        return _Sent(tuple(tensor.shape), tensor.dtype)

    def rebuild(self, local: Tensor, mesh: Optional[DeviceMesh]) -> Tensor:
        if mesh is None:
            raise RuntimeError("the last pipeline stage sent a DTensor, but this relay knows no tensor-parallel mesh.")
        return DTensor.from_local(local, mesh, list(self.placements), run_check=False, shape=self.global_shape,
                                  stride=self.global_stride)
