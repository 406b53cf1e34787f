"""Data parallelism with FSDP2 (``fully_shard``).

One FSDP unit per block, then the model root, so each block's parameters are all-gathered just in
time and freed after use. The same call covers the three data-parallel modes: the mesh decides
(1-D shard mesh: fully sharded; 2-D replicate × shard mesh: hybrid, or pure replication when the
shard dimension has size 1).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from lightning_mp.config import PRECISIONS

def mixed_precision_policy(precision: str) -> MixedPrecisionPolicy:
    """Lightning precision -> FSDP2 policy. "-mixed": parameters are gathered in the compute dtype (half the
    traffic) and gradients reduced in fp32, so that summing many shards does not lose precision."""
    dtype = PRECISIONS[precision].mixed_dtype
    if dtype is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=getattr(torch, dtype), reduce_dtype=torch.float32)


def apply_fsdp(
    root: nn.Module,
    model: nn.Module | None,
    blocks: Iterable[nn.Module],
    mesh: DeviceMesh,
    policy: MixedPrecisionPolicy,
) -> None:
    """Shard each block, then the planned model, then whatever in ``root`` still holds parameters."""
    loose = [name for name, _ in root.named_parameters(recurse=False)]
    if loose:
        raise ValueError(
            f"{type(root).__name__} owns parameters directly ({', '.join(loose)}), which cannot be sharded"
            " without changing its class; move them into a submodule (e.g. an nn.Module attribute)."
        )
    blocks = list(blocks)
    for index, block in enumerate(blocks):
        # The last block's parameters are needed again first in backward: keep them gathered.
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=index < len(blocks) - 1)
    if model is not None:
        fully_shard(model, mesh=mesh, mp_policy=policy)
    shard_unmanaged(root, mesh, policy)


def shard_unmanaged(root: nn.Module, mesh: DeviceMesh, policy: MixedPrecisionPolicy) -> None:
    """Parameters outside any FSDP unit would silently skip gradient reduction; give each top-level
    child of ``root`` that still owns such parameters its own unit."""
    managed = {id(p) for module in root.modules() if isinstance(module, FSDPModule) for p in module.parameters()}
    for child in root.children():
        if any(id(p) not in managed for p in child.parameters()):
            fully_shard(child, mesh=mesh, mp_policy=policy)


def is_parallelized(module: nn.Module) -> bool:
    """True when user code already applied FSDP2 or tensor parallelism (Lightning's contract), or this
    strategy did (a second fit/validate; the replicated mode leaves plain parameters, so it is asked too)."""
    from torch.distributed.tensor import DTensor

    from lightning_mp.parallel.replicate import is_replicated

    return any(isinstance(m, FSDPModule) for m in module.modules()) or any(
        isinstance(p, DTensor) for p in module.parameters()
    ) or is_replicated(module)
