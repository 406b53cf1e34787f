"""Loss parallelism: the output head stays column-sharded over the tensor-parallel ranks and the
cross-entropy is computed on the vocabulary shards (torch's ``loss_parallel``), so no rank ever holds
the whole ``[batch, sequence, vocabulary]`` logits (Llama 3: 128k vocabulary × 8k tokens × 4 bytes =
4 GiB per sequence in fp32, against 1/t of it per rank).

The user's ``training_step`` does not change: the model's ``.loss`` is the same number as without it
(a plain tensor: the replicated loss is unwrapped), ``.logits`` is a ``DTensor`` sharded on its last
dimension. Code that reads logits outside the loss calls ``.full_tensor()`` on them (all-gathers; see
the README). torch computes the sharded cross-entropy only inside its context, in forward and in
backward: the strategy opens it around every step and around backward.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from typing import Any

from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, loss_parallel

from lightning_mp.plans import ModelPlan


def check_loss_parallel(plan: ModelPlan, tensor_parallel_size: int) -> None:
    """Before launch: the plan must name a column-sharded head. Under a pipeline the head, the loss and its
    backward are on the last stage (the strategy opens the context around the whole schedule step), and in
    evaluation the sharded logits reach the other pipeline ranks shard by shard (``pipeline/relay.py``)."""
    if tensor_parallel_size > 1 and (plan.head is None or plan.head not in plan.tensor_parallel):
        why = ("its output head is replicated over tensor ranks (tied input/output embeddings keep one replicated"
               " weight; a small task head, as BERT's classifier, is not sharded)" if plan.head is None
               else f"its head {plan.head!r} is not in the tensor-parallel plan")
        raise ValueError(
            f"loss_parallel=True needs a column-sharded output head, but {plan.name} has none: {why}. Use"
            " loss_parallel=False for this model."
        )


def with_sharded_head(plan: ModelPlan, sequence_sharded_input: bool = False) -> ModelPlan:
    """The plan with its head's output left sharded on the last (vocabulary) dimension, as a DTensor; under
    sequence parallelism its input arrives sharded on the sequence."""
    assert plan.head is not None
    head_style = ColwiseParallel(input_layouts=Shard(1) if sequence_sharded_input else Replicate(),
                                 output_layouts=Shard(-1), use_local_output=False)
    return replace(plan, tensor_parallel={**plan.tensor_parallel, plan.head: head_style})


def unwrap_loss(model: nn.Module) -> None:
    """The model's ``.loss`` as a plain tensor (the sharded cross-entropy returns a replicated DTensor),
    so Lightning's logging, reductions and backward see what they see without loss parallelism."""
    model.register_forward_hook(_local_loss)


def _local_loss(module: nn.Module, args: Any, output: Any) -> Any:
    loss = getattr(output, "loss", None)
    if isinstance(loss, DTensor):
        output.loss = loss.to_local()  # replicated: every rank's local value is the whole loss
    return output


def loss_parallel_context(active: bool) -> AbstractContextManager:
    return loss_parallel() if active else nullcontext()
