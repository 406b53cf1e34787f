"""Tensor-parallel styles torch does not ship, built from torch's own so parameters stay DTensors.

Every parameter a style touches becomes a DTensor on the tensor-parallel mesh: FSDP2 then shards it
further over data-parallel ranks, the global grad norm sees its placement, and distributed checkpoints
store it by global shape.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle, SequenceParallel


class HeadShardedNorm(SequenceParallel):
    """A norm over ``head_dim`` applied to per-head states ``(batch, seq, heads, head_dim)`` whose heads
    are split over the tensor ranks (Qwen3's and Gemma 3's ``q_norm`` / ``k_norm`` between a column-wise
    projection and attention; Hugging Face calls it ``replicated_with_grad_allreduce``).

    The weight is replicated; each rank's gradient covers only its own heads. Marking the input as a
    DTensor sharded on the heads dimension makes DTensor derive the weight gradient as a partial sum and
    all-reduce it in backward — the same arithmetic as Hugging Face's gradient hook, but on a DTensor
    parameter that FSDP2 and the grad norm understand. The output goes back to a local tensor (the
    attention that follows works on local heads).
    """

    # HF attention views projections as (*input_shape, -1, head_dim) before the norm. Which non-last dim
    # is marked sharded is bookkeeping only: the norm works row by row over head_dim, so the weight
    # gradient is the same partial sum whether heads sit at dim 1 or 2.
    HEADS_DIM = 2

    def __init__(self) -> None:
        super().__init__(sequence_dim=self.HEADS_DIM, use_local_output=True)


class TransposedColwise(ParallelStyle):
    """Column-wise parallelism for a linear layer that stores its weight transposed, ``(in, out)``, and
    computes ``x @ weight + bias`` (Hugging Face's ``Conv1D`` in GPT-2). torch's ColwiseParallel only
    knows ``nn.Linear`` (weight ``(out, in)``): here the output columns are ``weight`` dim 1 and ``bias``
    dim 0. The input arrives replicated; the output stays sharded on its last dimension, or is gathered
    (``gather_output``, for a fused q/k/v whose columns are not whole heads per rank)."""

    def __init__(self, gather_output: bool = False) -> None:
        super().__init__()
        self.gather_output = gather_output

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def partition(name: str, mod: nn.Module, mesh: DeviceMesh) -> None:
            _shard_parameters(mod, mesh, {"weight": Shard(1), "bias": Shard(0)})

        def prepare_input(mod: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
            return (_as_dtensor(inputs[0], mesh, Replicate(), Replicate()), *inputs[1:])

        def prepare_output(mod: nn.Module, output: DTensor, mesh: DeviceMesh) -> torch.Tensor:
            return (output.redistribute(mesh, [Replicate()]) if self.gather_output else output).to_local()

        return distribute_module(module, device_mesh, partition, prepare_input, prepare_output)


class TransposedRowwise(ParallelStyle):
    """Row-wise parallelism for a transposed-weight linear layer (see ``TransposedColwise``): ``weight``
    dim 0 sharded, ``bias`` replicated (added once to the reduced sum). The input arrives sharded on its
    last dimension, or replicated (``split_input``) and split locally; the output is all-reduced into a
    local tensor, or (``output_layout=Shard(1)``, sequence parallelism) reduce-scattered into a DTensor
    sharded on the sequence."""

    def __init__(self, split_input: bool = False, output_layout: Placement = Replicate()) -> None:
        super().__init__()
        self.split_input = split_input
        self.output_layout = output_layout

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def partition(name: str, mod: nn.Module, mesh: DeviceMesh) -> None:
            _shard_parameters(mod, mesh, {"weight": Shard(0), "bias": Replicate()})

        def prepare_input(mod: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
            arrives = Replicate() if self.split_input else Shard(inputs[0].dim() - 1)
            return (_as_dtensor(inputs[0], mesh, arrives, Shard(inputs[0].dim() - 1)), *inputs[1:])

        def prepare_output(mod: nn.Module, output: DTensor, mesh: DeviceMesh) -> torch.Tensor:
            reduced = output.redistribute(mesh, [self.output_layout])
            return reduced.to_local() if isinstance(self.output_layout, Replicate) else reduced

        return distribute_module(module, device_mesh, partition, prepare_input, prepare_output)


def _shard_parameters(module: nn.Module, mesh: DeviceMesh, placements: dict[str, Placement]) -> None:
    for name, param in list(module.named_parameters(recurse=False)):
        module.register_parameter(name, nn.Parameter(distribute_tensor(param, mesh, [placements[name]]),
                                                     requires_grad=param.requires_grad))


def _as_dtensor(tensor: torch.Tensor, mesh: DeviceMesh, arrives: Placement, wanted: Placement) -> DTensor:
    if not isinstance(tensor, DTensor):
        tensor = DTensor.from_local(tensor, mesh, [arrives], run_check=False)
    return tensor if tensor.placements == (wanted,) else tensor.redistribute(mesh, [wanted])


class GatherSequence(ParallelStyle):
    """Sequence parallelism's entry into a tensor-parallel region (an attention or MLP module, a replicated
    head): every DTensor among its inputs (the hidden states, sharded on the sequence dimension) is
    all-gathered into a full local tensor for the column-wise projections inside, once per distinct tensor
    (an attention called with ``query``, ``key`` and ``value`` the same hidden states gathers once). The
    region's row-wise projection reduce-scatters back to sequence shards."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def gather(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            gathered: dict[int, torch.Tensor] = {}

            def full(value: object) -> object:
                if not isinstance(value, DTensor):
                    return value
                if id(value) not in gathered:
                    gathered[id(value)] = value.redistribute(placements=[Replicate()]).to_local()
                return gathered[id(value)]

            return tuple(full(a) for a in args), {k: full(v) for k, v in kwargs.items()}

        module.register_forward_pre_hook(gather, with_kwargs=True)
        return module
