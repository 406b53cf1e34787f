"""Parameters tied between the first and the last pipeline stage (input and output embeddings).

In the unsplit model one tensor serves the embedding and the LM head; split into stages, the first
stage holds it under the embedding's name and the last stage a copy under the head's name. Both copies
start equal; before every optimizer step their gradients are summed over the two ranks holding them
(Megatron's "embedding group"), so the two optimizers make the same update from the same state and
the copies stay equal. The summed gradient is the single-process one: the tensor's gradient is the sum
of what the embedding and the head contribute. The last stage's copy is a duplicate for the global
gradient norm (counted once, as in one process) and appears in checkpoints under its own name, as it
does in the unsplit model's ``state_dict``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor


class TiedAcrossStages:
    """This rank's copies of the parameters tied across the first and last stage, and the group that
    sums their gradients."""

    def __init__(self, ties: Sequence[tuple[str, str]], shell: nn.Module, holds_first: bool, holds_last: bool,
                 group: dist.ProcessGroup | None) -> None:
        names = [first for first, _ in ties] if holds_first else []
        names += [last for _, last in ties] if holds_last else []
        self.parameters = [shell.get_parameter(name) for name in names]
        # Counted once in the gradient norm: the first stage's copy is the one that counts.
        self.duplicates = [shell.get_parameter(last) for _, last in ties] if holds_last else []
        self.group = group

    @staticmethod
    def groups_for(ties: Sequence[tuple[str, str]], pipeline_group: dist.ProcessGroup, first_rank: int,
                   last_rank: int) -> dist.ProcessGroup | None:
        """The group of the two ranks (positions ``first_rank`` and ``last_rank`` in the pipeline group)
        holding the first and the last stage. Every rank creates every pipeline's group (``new_group`` is
        collective over the world), in the same order; each keeps its own."""
        if not ties:
            return None
        mine = tuple(dist.get_process_group_ranks(pipeline_group))
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        kept = None
        for ranks in sorted(set(everyone)):
            group = dist.new_group([ranks[first_rank], ranks[last_rank]])
            if ranks == mine:
                kept = group
        return kept

    def sync_gradients(self) -> None:
        """Sum the gradients of the two copies (once per optimizer step, after the last backward)."""
        if self.group is None:
            return
        with torch.no_grad():
            for param in self.parameters:
                if param.grad is None:  # still take part in the collective
                    param.grad = torch.zeros_like(param)
                dist.all_reduce(_local(param.grad), group=self.group)


def _local(tensor: Tensor) -> Tensor:
    # FSDP2 shards both copies the same way over the same data-parallel ranks: local shards correspond.
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor
