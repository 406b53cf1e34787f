"""Gradient norm and clipping across every way a gradient can be split.

A parameter's gradient may be a plain tensor (replicated), or a DTensor sharded over data-parallel
ranks (FSDP), tensor-parallel ranks, or both, on different meshes for different parameters.
``torch.nn.utils.clip_grad_norm_`` stacks per-parameter norms, which fails across meshes, so here the
p-th powers are summed locally per (mesh, placements) group and reduced over exactly the dimensions
the group is sharded on. Replicated dimensions are not summed, so nothing is counted twice.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Iterable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

from lightning_mp._compat import foreach_mul_, foreach_norm


def total_grad_norm(
    parameters: Iterable[Tensor], norm_type: float = 2.0, extra_group: dist.ProcessGroup | None = None,
    device: torch.device | None = None,
) -> Tensor:
    """The norm of all gradients as if they were one unsharded vector.

    ``extra_group`` sums over ranks holding disjoint parameter sets (pipeline stages). ``device``: where
    the norm lives when this rank holds no gradient (default: the first parameter's device); it joins
    collectives, so it must be the rank's device (NCCL rejects CPU tensors).
    """
    norm_type = float(norm_type)
    parameters = list(parameters)
    if device is None:
        if not parameters:
            raise ValueError("total_grad_norm got no parameters and no device: pass device= (the rank's device).")
        device = parameters[0].device
    groups: dict[object, list[Tensor]] = defaultdict(list)
    layouts: dict[object, tuple] = {}
    for param in parameters:
        grad = param.grad
        if grad is None:
            continue
        if isinstance(grad, DTensor):
            if any(p.is_partial() for p in grad.placements):
                grad = grad.redistribute(placements=[Replicate() if p.is_partial() else p for p in grad.placements])
            key = (id(grad.device_mesh), tuple(grad.placements))
            layouts[key] = (grad.device_mesh, grad.placements)
            groups[key].append(grad.to_local())
        else:
            groups[None].append(grad)

    is_inf = math.isinf(norm_type)
    reduce_op = "max" if is_inf else "sum"
    total: Tensor | None = None
    for key, grads in groups.items():
        norms = torch.stack([n.float() for n in foreach_norm(grads, norm_type)])
        local = norms.max() if is_inf else norms.pow(norm_type).sum()
        if key is not None:
            mesh, placements = layouts[key]
            spec = [Partial(reduce_op) if isinstance(p, Shard) else Replicate() for p in placements]
            local = DTensor.from_local(local, mesh, spec, run_check=False).full_tensor()
        total = local if total is None else (torch.maximum(total, local) if is_inf else total + local)
    if total is None:  # no gradients here (e.g. a frozen stage); still join the collective below
        total = torch.zeros((), device=device)
    if extra_group is not None:
        dist.all_reduce(total, op=dist.ReduceOp.MAX if is_inf else dist.ReduceOp.SUM, group=extra_group)
    return total if is_inf else total.pow(1.0 / norm_type)


def clip_grad_norm_(
    parameters: Iterable[Tensor],
    max_norm: float,
    norm_type: float = 2.0,
    extra_group: dist.ProcessGroup | None = None,
    duplicates: Iterable[Tensor] = (),
    device: torch.device | None = None,
) -> Tensor:
    """Scale gradients in place so their global norm is at most ``max_norm``; returns the norm before.

    ``duplicates``: parameters whose gradient is a copy of one another rank counts (a weight tied across
    pipeline stages); scaled, but not counted again in the norm. ``device`` as in :func:`total_grad_norm`.
    """
    parameters, skip = list(parameters), {id(p) for p in duplicates}
    total = total_grad_norm([p for p in parameters if id(p) not in skip], norm_type, extra_group, device)
    parameters = [p for p in parameters if p.grad is not None]
    coefficient = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in parameters]
    if grads:
        foreach_mul_(grads, coefficient.to(grads[0].device))
    return total
