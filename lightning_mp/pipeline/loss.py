"""Losses of a pipeline step: each microbatch's loss is its share of the batch loss.

torch divides gradients by the number of microbatches (``scale_grads=True``), which is only right when
every microbatch has the same weight. The pipeline runs with ``scale_grads=False`` instead and each
microbatch's loss is already its share (``sum over its labelled tokens / labelled tokens in the whole
batch``), so the gradients summed over microbatches are exactly those of the single-process batch mean.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.distributed.tensor import DTensor

from lightning_mp._compat import tree_flatten, wrap_shape_inference


def zero_loss(output: Any) -> Tensor:
    """A zero that reaches every tensor of ``output`` in backward (a microbatch that must add nothing). A
    DTensor (vocabulary-sharded logits under loss parallelism) contributes through its local shard, so the
    zero stays a plain tensor for the schedule's backward."""
    tensors = [t.to_local() if isinstance(t, DTensor) else t for t in tree_flatten(output)[0] if isinstance(t, Tensor)]
    return sum(t.sum() for t in tensors) * 0.0


class LossSlot:
    """The loss torch's schedule holds (fixed at construction); what it calls is set per step.

    torch infers the shapes sent between stages by running the first microbatch once more before a
    step (first step, or after a shape change), on the last stage with placeholder inputs. That call only
    needs a loss to differentiate, so it gets a zero one instead of the step's loss, which may have side
    effects (a user's training_step logging).
    """

    fn: Any = None
    inferring = False

    def __call__(self, output: Any, target: Any, **kwargs: Any) -> Tensor:
        if self.inferring:
            return zero_loss(output)
        return self.fn(output, target, **kwargs)

    def watch(self, schedule: Any) -> None:
        """Mark the span of the schedule's shape inference (its private stage-initialization method)."""

        def marking(initialize: Any) -> Any:
            def marked(*args: Any, **kwargs: Any) -> Any:
                self.inferring = True
                try:
                    return initialize(*args, **kwargs)
                finally:
                    self.inferring = False

            return marked

        wrap_shape_inference(schedule, marking)
