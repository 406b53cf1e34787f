"""Token-weighted reduction across data-parallel ranks.

A token-classification loss is a mean over the labelled tokens of the local batch. Data-parallel
ranks hold different numbers of labelled tokens, so averaging their gradients (what FSDP/DDP do) is a
mean of means, not the loss of the global batch. Scaling each rank's loss by
``local_tokens * dp_size / global_tokens`` before backward turns the average back into the exact
global token mean; the same weights make ``self.log(..., sync_dist=True)`` report the global value.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import Tensor


def _is_mean(reduce_fx: Any) -> bool:
    return reduce_fx is torch.mean or (isinstance(reduce_fx, str) and reduce_fx.lower() in ("mean", "avg"))


def labelled_tokens(labels: Tensor, ignore_index: int, shifted: bool = False) -> Tensor:
    """The tokens a loss averages over (the one counting rule): labels that are not ``ignore_index``,
    without the first position of every row when ``shifted``. A causal LM shifts its labels inside the
    model (token ``t`` predicts label ``t + 1``), so the first label of a row is never a target; counting
    it is off by one per row, which weights ranks and microbatches wrongly exactly when rows are padded
    to different lengths. Row labels (one per sequence) never shift."""
    if shifted and labels.dim() >= 2:
        labels = labels[..., 1:]
    return (labels != ignore_index).sum()


def count_labelled_tokens(batch: Any, labels_key: str, ignore_index: int, shifted: bool = False) -> Tensor | None:
    labels = batch.get(labels_key) if isinstance(batch, Mapping) else getattr(batch, labels_key, None)
    if not isinstance(labels, Tensor):
        return None
    return labelled_tokens(labels, ignore_index, shifted).to(torch.float64)


class TokenWeighting:
    """Per-batch weights; ``loss_scale`` stays valid from ``observe`` until the next batch.

    ``loss_scale`` is a float32 tensor on the rank's device when the weighting applies (1.0 otherwise):
    reading it on the host would wait for the device every step, and nothing on the host needs its value.
    """

    def __init__(self, labels_key: str = "labels", ignore_index: int = -100, enabled: bool = True) -> None:
        self.labels_key = labels_key
        self.ignore_index = ignore_index
        self.enabled = enabled
        # Set from the model's plan once it is known (causal LMs shift their labels).
        self.shifted_labels = False
        self.loss_scale: Tensor | float = 1.0
        self._local_tokens: Tensor | None = None
        self._reducing = False

    def observe(self, batch: Any, data_group: dist.ProcessGroup | None, data_size: int) -> None:
        """Count this rank's labelled tokens and the data-parallel total (one small all-reduce)."""
        self.loss_scale = 1.0
        self._local_tokens = None
        if not self.enabled or data_size == 1:
            return
        local = count_labelled_tokens(batch, self.labels_key, self.ignore_index, self.shifted_labels)
        if local is None:
            return
        total = local.clone()
        dist.all_reduce(total, group=data_group)
        # Nothing labelled anywhere: the plain mean (every rank weighs 1), decided on the device.
        anything = total > 0
        self._local_tokens = torch.where(anything, local, torch.ones_like(local))
        self.loss_scale = torch.where(anything, local * data_size / total.clamp(min=1), torch.ones_like(local)).float()

    def scale(self, loss: Tensor) -> Tensor:
        """``loss`` times this batch's weight, in the loss's dtype."""
        if isinstance(self.loss_scale, Tensor):
            return loss * self.loss_scale.to(loss.dtype)
        return loss if self.loss_scale == 1.0 else loss * self.loss_scale

    @contextmanager
    def reducing_logged_values(self, module: Any) -> Iterator[None]:
        """While a step runs, mean-reductions of logged values are token-weighted.

        A scalar logged with ``sync_dist=True`` and a mean reduction is replaced at once by its
        token-weighted mean over the data-parallel ranks. Lightning averages a logged value over the epoch
        from each rank's *local* values weighted by batch size, which weights ranks by rows, not labelled
        tokens; with the step's global value on every rank, that average is the single-process one
        (sum over steps of global mean × rows / rows).
        """
        self._reducing = True
        previous = module.__dict__.get("log")
        log = module.log

        def token_weighted_log(name: str, value: Any, *args: Any, **kwargs: Any) -> Any:
            if self._local_tokens is not None and kwargs.get("sync_dist") and _is_mean(kwargs.get("reduce_fx", "mean")):
                if isinstance(value, (int, float)) or (isinstance(value, Tensor) and value.numel() == 1):
                    tensor = torch.as_tensor(value).detach().float().to(self._local_tokens.device)
                    value = self.weighted_mean(tensor)
            return log(name, value, *args, **kwargs)

        module.log = token_weighted_log  # an instance attribute shadows the method for this step only
        try:
            yield
        finally:
            self._reducing = False
            if previous is None:
                del module.log
            else:
                module.log = previous

    def applies_to(self, reduce_op: Any, group: Any) -> bool:
        op = reduce_op.lower() if isinstance(reduce_op, str) else reduce_op
        return self._reducing and self._local_tokens is not None and group is None and op in (None, "mean", "avg")

    def weighted_mean(self, value: Tensor) -> Tensor:
        """Σ_r value_r · tokens_r / Σ_r tokens_r over all ranks (tensor/pipeline peers repeat the same
        pair, which cancels out)."""
        tokens = self._local_tokens.to(device=value.device)
        packed = torch.cat([(value.double() * tokens).reshape(-1), tokens.reshape(1)])
        dist.all_reduce(packed)
        return (packed[:-1] / packed[-1]).reshape(value.shape).to(value.dtype)
