"""Pipeline stages under sequence parallelism: what travels between stages is each tensor rank's
sequence shard.

With sequence parallelism a block hands the next one a DTensor sharded on the sequence dimension
(``Shard(1)``, global shape ``[rows, width, hidden]``). torch's pipeline stages send plain tensors (and
the shapes derived in ``shapes.py`` are plain shapes), so at the stage boundary the shard becomes local:
a stage that is not the last sends ``output.to_local()``, ``[rows, width / t, hidden]`` (p2p traffic falls
by the tensor degree ``t``), and a stage that is not the first wraps what it receives back into the
``Shard(1)`` DTensor its first block (and the model's own mask and rotary code, which read the global
shape) expects. Each tensor rank talks only to the same tensor rank of the neighbouring stage (one
pipeline group per tensor rank), so its shard goes where the same shard is expected.

Widths that ``t`` does not divide are sharded as torch shards them everywhere else (what sequence
parallelism without a pipeline does too): ``ceil(width / t)`` rows of the sequence per rank, the last
ones shorter. A local shard alone does not tell the global width (6 rows on rank 0 of 2 is 11 or 12), so
the runtime tells the boundary the width of every batch before running it (``see``): a host integer from
the batch's shape, no collective and no device sync.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from lightning_mp.pipeline.shapes import contiguous_stride

SEQUENCE_DIM = 1


class SequenceShardedStages:
    """The boundary conversions of one rank's stages and the shapes of what they send."""

    def __init__(self, tp_mesh: DeviceMesh) -> None:
        self.mesh = tp_mesh
        self.degree = tp_mesh.size()
        self.rank = tp_mesh.get_local_rank()
        self.width: Optional[int] = None  # the current batch's sequence length (global)

    def local_width(self, width: int) -> int:
        """This tensor rank's share of ``width`` positions under ``Shard(1)``: torch.chunk's split, as DTensor
        cuts it (11 over 2 ranks: 6 and 5; 3 over 4: 1, 1, 1 and 0)."""
        return int(Shard.local_shard_size_and_offset(width, self.degree, self.rank)[0])

    def see(self, input_shape: tuple[int, ...]) -> None:
        """The next batch's model input shape (``[rows, width, ...]``)."""
        if len(input_shape) < 2:
            raise ValueError(
                f"sequence_parallel=True with a pipeline: the model input has shape {input_shape}, without a sequence"
                " dimension to shard; use sequence_parallel=False for this model."
            )
        self.width = int(input_shape[SEQUENCE_DIM])

    def sent_lead(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """What the tensors sent between stages start with, for a microbatch input of ``input_shape``
        (``shapes.py`` derives their metadata from it)."""
        return (input_shape[0], self.local_width(input_shape[SEQUENCE_DIM]))

    def attach(self, stage_module: nn.Module, is_first: bool, is_last: bool) -> None:
        """Hooks on a stage module: received shards become DTensors, sent DTensors become their shards.
        Registered before FSDP wraps the stage, so its root hooks see plain tensors on both sides."""
        if not is_first:
            stage_module.register_forward_pre_hook(self._wrap_received)
        if not is_last:
            stage_module.register_forward_hook(self._unwrap_sent)

    def _wrap_received(self, module: nn.Module, args: tuple) -> tuple:
        hidden = args[0]
        if isinstance(hidden, DTensor) or not isinstance(hidden, Tensor):
            return args
        if self.width is None:
            raise RuntimeError("sequence-sharded pipeline stage ran before the runtime saw the batch's width.")
        expected = self.local_width(self.width)
        if hidden.dim() < 2 or hidden.shape[SEQUENCE_DIM] != expected:
            raise ValueError(
                f"sequence_parallel=True with a pipeline: stage input of shape {tuple(hidden.shape)} is not tensor rank"
                f" {self.rank}'s shard of a sequence of {self.width} positions ({expected} along dim {SEQUENCE_DIM});"
                " the activations between blocks must be [rows, sequence, ...] with the model input's sequence."
            )
        shape = (hidden.shape[0], self.width, *hidden.shape[2:])
        # Differentiable: the gradient sent back to the previous stage is this rank's shard of it.
        wrapped = DTensor.from_local(hidden, self.mesh, [Shard(SEQUENCE_DIM)], run_check=False, shape=shape,
                                     stride=contiguous_stride(shape))
        return (wrapped, *args[1:])

    def _unwrap_sent(self, module: nn.Module, args: Any, output: Any) -> Any:
        if not isinstance(output, DTensor):
            return output
        if output.placements != (Shard(SEQUENCE_DIM),):
            output = output.redistribute(self.mesh, [Shard(SEQUENCE_DIM)])
        return output.to_local()

