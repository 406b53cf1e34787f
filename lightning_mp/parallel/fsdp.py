"""Data parallelism with FSDP2 (``fully_shard``).

One FSDP unit per block, then the model root, so each block's parameters are all-gathered just in
time and freed after use. The same call covers the three data-parallel modes: the mesh decides
(1-D shard mesh: fully sharded; 2-D replicate × shard mesh: hybrid, or pure replication when the
shard dimension has size 1). ``FSDPSettings`` (config.py) tunes resharding, prefetch and the reduction
dtype; its defaults are what ``benchmarks/fsdp_settings.py`` measured.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from lightning_mp.config import PRECISIONS, FSDPSettings


def mixed_precision_policy(precision: str, reduce_dtype: str | None = None) -> MixedPrecisionPolicy:
    """Lightning precision -> FSDP2 policy. "-mixed": parameters are gathered in the compute dtype (half the
    traffic) and gradients reduced in fp32, so that summing many shards does not lose precision; "-true":
    everything in the parameter dtype. ``reduce_dtype`` (FSDPSettings) overrides the reduction's dtype."""
    dtype = PRECISIONS[precision].mixed_dtype
    if reduce_dtype is None:  # None everywhere: FSDP2 keeps the parameter dtype
        reduce_dtype = "float32" if dtype is not None else None
    return MixedPrecisionPolicy(param_dtype=getattr(torch, dtype) if dtype is not None else None,
                                reduce_dtype=getattr(torch, reduce_dtype) if reduce_dtype is not None else None)


def apply_fsdp(
    root: nn.Module,
    model: nn.Module | None,
    blocks: Iterable[nn.Module],
    mesh: DeviceMesh,
    policy: MixedPrecisionPolicy,
    settings: FSDPSettings = FSDPSettings(),
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
        fully_shard(block, mesh=mesh, mp_policy=policy,
                    reshard_after_forward=reshards_after_forward(settings.reshard_after_forward, index, len(blocks)))
    set_prefetch(blocks, settings.forward_prefetch, settings.backward_prefetch)
    if model is not None:
        fully_shard(model, mesh=mesh, mp_policy=policy)
    shard_unmanaged(root, mesh, policy)


def reshards_after_forward(setting: str, index: int, num_blocks: int) -> bool:
    """Whether block ``index`` frees its gathered parameters after forward. "except_last": the last block's
    parameters are the first backward needs, so they stay gathered."""
    return setting == "all" or (setting == "except_last" and index < num_blocks - 1)


def set_prefetch(blocks: list[nn.Module], forward: int, backward: int) -> None:
    """Explicit prefetch: each block issues the all-gathers of the next ``forward`` blocks (in backward: of the
    ``backward`` blocks before it) once its own are done, instead of each block gathering on arrival. Blocks
    with nobody left to prefetch keep FSDP2's implicit order (torch's FSDP2 example does the same)."""
    for index, block in enumerate(blocks):
        ahead, behind = blocks[index + 1:index + 1 + forward], blocks[max(0, index - backward):index][::-1]
        if forward and ahead:
            block.set_modules_to_forward_prefetch(ahead)
        if backward and behind:
            block.set_modules_to_backward_prefetch(behind)


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
