"""Tensor-parallel styles torch does not ship, built from torch's own so parameters stay DTensors.

Every parameter a style touches becomes a DTensor on the tensor-parallel mesh: FSDP2 then shards it
further over data-parallel ranks, the global grad norm sees its placement, and distributed checkpoints
store it by global shape.
"""

from __future__ import annotations

from torch.distributed.tensor.parallel import SequenceParallel


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

    HEADS_DIM = 2  # HF attention views projections as (*input_shape, -1, head_dim) before the norm

    def __init__(self) -> None:
        super().__init__(sequence_dim=self.HEADS_DIM, use_local_output=True)
