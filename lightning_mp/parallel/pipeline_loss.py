"""Losses of a pipeline step: each microbatch's loss is its share of the batch loss.

torch divides gradients by the number of microbatches (``scale_grads=True``), which is only right when
every microbatch has the same weight. The pipeline runs with ``scale_grads=False`` instead and each
microbatch's loss is already its share (``sum over its labelled tokens / labelled tokens in the whole
batch``), so the gradients summed over microbatches are exactly those of the single-process batch mean.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch.nn.functional as F
from torch import Tensor
from torch.utils._pytree import tree_flatten


class TokenCrossEntropy:
    """Cross entropy whose per-microbatch value is ``sum of token losses / normalizer``.

    ``normalizer`` is the number of labelled tokens (labels != ``ignore_index``) in the whole local batch
    (see :meth:`count`), so the microbatch losses add up to the batch's token mean however the labelled
    tokens are distributed over microbatches. Works for token logits ``(B, S, C)`` with labels ``(B, S)``
    and sequence logits ``(B, C)`` with labels ``(B,)``.
    """

    def __init__(self, ignore_index: int = -100) -> None:
        self.ignore_index = ignore_index

    def count(self, target: Tensor) -> Tensor:
        return (target != self.ignore_index).sum()

    def __call__(self, output: Any, target: Tensor, normalizer: Tensor) -> Tensor:
        logits = output[0] if isinstance(output, (tuple, list)) else output
        total = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1), ignore_index=self.ignore_index,
            reduction="sum",
        )
        return total / normalizer


class PipelineLoss(Protocol):
    """What the schedule calls per microbatch on the last stage; the returned microbatch losses must add
    up to the batch loss (so gradients need no rescaling)."""

    def count(self, target: Tensor) -> Tensor:
        """The normalizer of a whole batch (e.g. its labelled tokens)."""

    def __call__(self, output: Any, target: Tensor, normalizer: Tensor) -> Tensor:
        """This microbatch's share of the batch loss."""


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
            return sum(t.sum() for t in tree_flatten(output)[0] if isinstance(t, Tensor)) * 0.0
        return self.fn(output, target, **kwargs)

    def watch(self, schedule: Any) -> None:
        """Mark the span of the schedule's shape inference (its private stage-initialization method)."""
        name = "_initialize_stages" if hasattr(schedule, "_initialize_stages") else "_initialize_stage"
        initialize = getattr(schedule, name)  # fails loudly if a torch release renames it

        def marked(*args: Any, **kwargs: Any) -> Any:
            self.inferring = True
            try:
                return initialize(*args, **kwargs)
            finally:
                self.inferring = False

        setattr(schedule, name, marked)
