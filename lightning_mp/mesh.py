"""One named DeviceMesh for every layout.

The mesh always has the four dimensions (pipeline, data replicate, data shard, tensor) — size-1
dimensions cost nothing — plus a flattened "data_parallel" dimension, so that a LightningModule
written for Lightning's own ModelParallelStrategy can keep slicing ``device_mesh["data_parallel"]``
and ``device_mesh["tensor_parallel"]``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from lightning_mp._compat import flatten_mesh
from lightning_mp.config import MeshShape

PIPELINE = "pipeline_parallel"
DATA_REPLICATE = "data_parallel_replicate"
DATA_SHARD = "data_parallel_shard"
DATA = "data_parallel"
TENSOR = "tensor_parallel"


def build_device_mesh(shape: MeshShape, device: torch.device) -> tuple[DeviceMesh, DeviceMesh]:
    """The root mesh, and its flattened data-parallel view (the group of samplers and losses).

    torch keeps ``root["data_parallel"]`` working for user code but asks libraries to hold on to the
    flattened mesh themselves, so it is returned too.
    """
    mesh = init_device_mesh(
        device.type,
        (shape.pipeline, shape.data_replicate, shape.data_shard, shape.tensor),
        mesh_dim_names=(PIPELINE, DATA_REPLICATE, DATA_SHARD, TENSOR),
    )
    return mesh, flatten_mesh(mesh[(DATA_REPLICATE, DATA_SHARD)], DATA)


def fsdp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The mesh ``fully_shard`` gets: 1-D when nothing is replicated, else 2-D (HSDP / pure replication)."""
    if mesh[DATA_REPLICATE].size() == 1:
        return mesh[DATA_SHARD]
    return mesh[(DATA_REPLICATE, DATA_SHARD)]


def host_group(mesh: DeviceMesh, dim: str) -> dist.ProcessGroup:
    """The ranks of ``mesh[dim]`` over a group whose collectives take host tensors: for small control
    messages (names, shapes, flags) that must not wait for the device. On a CPU mesh that is the dimension's
    own group; on an accelerator one gloo group per set of peers is created, every rank taking part in
    creating all of them (``new_subgroups_by_enumeration`` is collective over the world)."""
    group = mesh[dim].get_group()
    if mesh.device_type == "cpu":
        return group
    layout = mesh.mesh
    axis = mesh.mesh_dim_names.index(dim)
    peers = layout.movedim(axis, -1).reshape(-1, layout.shape[axis]).tolist()
    mine, _ = dist.new_subgroups_by_enumeration(peers, backend="gloo")
    return mine
