"""Pipeline parallelism inside Lightning's loop, with the user's steps unchanged.

Training: the strategy runs torch's schedule on the whole local batch. On the rank holding the last
stage, the schedule's loss calls the user's ``training_step`` once per microbatch, and while it runs
the model (this rank's shell, see ``split.py``) answers every call with the output the
pipeline computed for that microbatch, in the form its own ``forward`` returns
(``PipelinePlan.model_output``: a Hugging Face output with ``.loss`` from ``labels``). The loss the step
returns is weighted by the microbatch's share of the labelled tokens and backpropagated by the schedule;
Lightning's own backward is replaced by handing over those gradients (see ``hand_over_gradients``).
``self.log`` calls made inside are collected, combined over the
microbatches with the same weights, sent to every pipeline rank and logged once on each, so reductions
(``sync_dist``) stay collective and the logger sees one value per step (``relay.py``: one tensor
broadcast per step, names only when they change; nothing in a step waits for the device).

Evaluation (validation, test, predict): a forward-only schedule; the last stage's output goes to every
pipeline rank, and the user's step runs once on the whole batch on every rank with the model answering
with that output. Metrics (e.g. torchmetrics updated from logits) see exactly what they see without a
pipeline.

A local batch whose size is not a multiple of the microbatches (the last batch of an epoch) is padded
with copies of its first row; in training their labels are ``ignore_index`` (no weight), in evaluation
their outputs are cut off before the user's step sees them.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_mp._compat import tree_flatten, tree_unflatten
from lightning_mp.parallel.token_weighting import labelled_tokens
from lightning_mp.pipeline.loss import zero_loss
from lightning_mp.pipeline.relay import StepRelay
from lightning_mp.pipeline.runtime import PipelineRuntime


class PipelineLoop:
    """Runs one LightningModule step through this rank's pipeline stages."""

    def __init__(self, runtime: PipelineRuntime, labels_key: str, ignore_index: int, token_weighted: bool,
                 shifted_labels: bool = False, host_group: Optional[dist.ProcessGroup] = None) -> None:
        """``host_group``: the pipeline ranks over a group that takes host tensors (``mesh.host_group``);
        by default the pipeline group itself, which is right on a CPU mesh."""
        self.runtime = runtime
        self.labels_key = labels_key
        self.ignore_index = ignore_index
        self.token_weighted = token_weighted
        self.shifted_labels = shifted_labels
        self._group_ranks = dist.get_process_group_ranks(runtime.group)
        self._pending: list[tuple[Tensor, Optional[Tensor]]] = []
        self.host_counts: Optional[tuple[int, list[int]]] = None  # see count_on_host
        self._relay = StepRelay(runtime.group, host_group or runtime.group, self._group_ranks[runtime.last_rank],
                                runtime.is_last, runtime.device, runtime.tensor_mesh)
        runtime.shell.forward = _outside_steps
        shell_modules = dict(runtime.shell.named_modules())
        # Stage modules are views of the shell, but the containers on the path to the blocks are their own
        # objects; Lightning's train()/eval() reaches only the shell's.
        self._mirrored = [(module, shell_modules[name]) for stage in runtime.stage_modules
                          for name, module in stage.named_modules() if name in shell_modules]

    def _sync_training_flags(self) -> None:
        for module, original in self._mirrored:
            module.training = original.training

    @property
    def _source(self) -> int:
        """Global rank holding the last stage (where outputs and losses are)."""
        return self._group_ranks[self.runtime.last_rank]

    # ------------------------------------------------------------ training
    def training_step(self, module: Any, batch: Mapping[str, Any], step_args: tuple, loss_scale: Union[float, Tensor],
                      zeroed_next: bool = True) -> Tensor:
        """Forward and backward of the local batch; returns the batch loss (detached) on every rank.

        ``loss_scale`` multiplies every microbatch loss before backward (data-parallel token weighting and
        Lightning's division by ``accumulate_grad_batches``), not the returned value. ``step_args`` are the
        hook's arguments after the batch (``batch_idx``). ``zeroed_next``: Lightning zeroes the gradients
        after this step returns (the first batch of an accumulation window).
        """
        self._sync_training_flags()
        batch = self._check_batch(batch)
        size = _batch_size(batch, self.runtime.pipeline.input_name)
        padded, padded_size = self._pad(batch, size, training=True)
        weights = self._microbatch_weights(batch, size)
        rows_per_microbatch = padded_size // self.runtime.microbatches
        records: list[tuple[Tensor, dict[str, tuple[Tensor, dict]], float]] = []

        def microbatch_loss(output: Any, rows: Tensor) -> Tensor:
            weight = weights[int(rows[0]) // rows_per_microbatch]
            if weight == 0.0:  # no labelled token: contributes nothing (and HF's mean would be 0/0)
                return zero_loss(output)
            microbatch = _select_rows(padded, rows, padded_size)
            with self.answering(module, output, microbatch), _captured_logs(module) as logged:
                step_output = module.training_step(microbatch, *step_args)
            loss = step_output["loss"] if isinstance(step_output, Mapping) else step_output
            if not isinstance(loss, Tensor):
                raise RuntimeError(
                    "under pipeline parallelism training_step must return the loss (a tensor or a dict with"
                    f" 'loss'); it returned {type(step_output).__name__}."
                )
            records.append((loss.detach().float() * weight, logged, weight))
            scale = weight * loss_scale
            return loss * (scale.to(loss.dtype) if isinstance(scale, Tensor) else scale)

        target = torch.arange(padded_size, device=self.runtime.device)
        # One set of gradient memory, as without a pipeline. Inside a window the schedule accumulates straight into
        # .grad. On its first batch Lightning zeroes gradients between training_step and backward: the previous
        # window's (stale) gradients are dropped before the schedule runs, and the new ones are moved aside for
        # zero_grad and handed back in backward (references moved, nothing copied).
        self._pending = []
        parameters = [p for p in self.runtime.shell.parameters() if p.requires_grad] if zeroed_next else []
        for p in parameters:
            p.grad = None
        self.runtime.run(self._model_inputs(padded, padded_size), target, microbatch_loss)
        self._pending = [(p, p.grad) for p in parameters]
        for p in parameters:
            p.grad = None
        batch_loss, logs = None, None
        if self.runtime.is_last:
            batch_loss = (torch.stack([r[0] for r in records]).sum() if records
                          else torch.zeros((), device=self.runtime.device))
            logs = _combine_logs(records, size)
        batch_loss, logs = self._relay.step_results(batch_loss, logs)
        for name, (value, kwargs) in logs.items():
            module.log(name, value, **kwargs)
        return batch_loss

    def hand_over_gradients(self) -> None:
        """Add the last training step's gradients to ``.grad``, where Lightning's backward would have put them."""
        for parameter, grad in self._pending:
            if grad is None:
                continue
            if parameter.grad is None:
                parameter.grad = grad
            else:
                parameter.grad += grad
        self._pending = []

    def count_on_host(self, batch: Any) -> None:
        """Called with the batch before it moves to the device: each microbatch's labelled tokens, counted
        where the labels are, so that the step's weights need no device-to-host copy (which would wait for
        all the device work queued before it, the previous optimizer step included)."""
        self.host_counts = None
        labels = batch.get(self.labels_key) if isinstance(batch, Mapping) and self.token_weighted else None
        if isinstance(labels, Tensor) and labels.device.type == "cpu" and labels.dim() > 0:
            self.host_counts = (int(labels.shape[0]), self._counts(labels))

    def _counts(self, labels: Tensor) -> list[int]:
        """Labelled tokens per microbatch of ``labels`` padded as ``_pad`` pads it (padding rows count 0)."""
        m = self.runtime.microbatches
        rows = -(-labels.shape[0] // m)
        counts = torch.stack([labelled_tokens(chunk, self.ignore_index, self.shifted_labels)
                              for chunk in labels.split(rows)]).tolist()
        return counts + [0] * (m - len(counts))

    def _microbatch_weights(self, batch: Mapping[str, Any], size: int) -> list[float]:
        """Each microbatch's share of the batch loss: its labelled tokens / the batch's (token mean), or
        1/m without labels (the mean of equal-sized microbatches). The host needs the counts: a microbatch
        without labels is not run through the user's loss, whose mean would be 0/0."""
        m = self.runtime.microbatches
        labels = batch.get(self.labels_key) if self.token_weighted else None
        host_counts, self.host_counts = self.host_counts, None
        if not isinstance(labels, Tensor) or labels.shape[0] != size:
            return [1.0 / m] * m
        if host_counts is not None and host_counts[0] == size:
            counts = host_counts[1]
        else:  # labels made on the device: one copy for all microbatches
            counts = self._counts(labels)
        total = sum(counts)
        return [c / total for c in counts] if total else [1.0 / m] * m

    # ------------------------------------------------------------ evaluation
    def evaluation_step(self, module: Any, step: Callable[..., Any], batch: Mapping[str, Any], *args: Any,
                        **kwargs: Any) -> Any:
        """Forward-only schedule, output to every pipeline rank, then ``step(batch, ...)`` on every rank."""
        self._sync_training_flags()
        batch = self._check_batch(batch)
        size = _batch_size(batch, self.runtime.pipeline.input_name)
        padded, padded_size = self._pad(batch, size, training=False)
        output = self.runtime.eval_step(self._model_inputs(padded, padded_size))
        if self.runtime.pp_mesh.size() > 1:
            output = self._relay.tree(output)
        if padded_size != size:
            output = _cut_rows(output, size, padded_size)
        with self.answering(module, output, batch):
            return step(batch, *args, **kwargs)

    # ------------------------------------------------------------ the model answering with pipeline output
    @contextmanager
    def answering(self, module: Any, output: Any, batch: Mapping[str, Any]) -> Iterator[None]:
        """While the user's step runs, calling the shell returns ``output`` as the model's own forward would."""
        shell = self.runtime.shell
        pipeline = self.runtime.pipeline
        expected_rows = _batch_size(batch, pipeline.input_name)

        def forward(*args: Any, **call_kwargs: Any) -> Any:
            ids = call_kwargs.get(pipeline.input_name, args[0] if args else None)
            if isinstance(ids, Tensor) and ids.shape[0] != expected_rows:
                raise RuntimeError(
                    f"under pipeline parallelism the model has already run on this step's batch ({expected_rows}"
                    f" rows) and can only answer for it; it was called with {ids.shape[0]} rows."
                )
            if pipeline.model_output is None:
                return output
            return pipeline.model_output(shell, output, call_kwargs)

        shell.forward = forward
        try:
            yield
        finally:
            shell.forward = _outside_steps

    # ------------------------------------------------------------ batches
    def _check_batch(self, batch: Any) -> Mapping[str, Any]:
        if not isinstance(batch, Mapping):
            raise TypeError(
                "under pipeline parallelism a batch must be a dict of tensors (the model inputs by name, e.g."
                f" input_ids, attention_mask, labels); got {type(batch).__name__}."
            )
        name = self.runtime.pipeline.input_name
        if not isinstance(batch.get(name), Tensor):
            raise ValueError(
                f"the pipeline's first stage needs the batch entry {name!r}; the batch has {sorted(batch)}."
            )
        return batch

    def _model_inputs(self, batch: Mapping[str, Any], size: int) -> dict[str, Tensor]:
        """What travels through the stages: every per-row tensor but the labels (only the loss needs them)."""
        return {k: v for k, v in batch.items() if k != self.labels_key and _is_per_row(v, size)}

    def _pad(self, batch: Mapping[str, Any], size: int, training: bool) -> tuple[dict[str, Any], int]:
        m = self.runtime.microbatches
        padded_size = -(-size // m) * m
        if padded_size == size:
            return dict(batch), size
        labels = batch.get(self.labels_key)
        if training and not (self.token_weighted and isinstance(labels, Tensor)):
            raise ValueError(
                f"the batch size {size} is not divisible by microbatches={m}, and without token-weighted labels"
                f" ('{self.labels_key}') the batch cannot be padded without changing the loss; use a batch size"
                f" that is a multiple of {m} (and drop_last=True in the DataLoader)."
            )
        extra = padded_size - size
        padded: dict[str, Any] = {}
        for key, value in batch.items():
            if not _is_per_row(value, size):
                padded[key] = value
                continue
            filler = value[:1].expand(extra, *value.shape[1:])
            if training and key == self.labels_key:
                filler = torch.full_like(filler, self.ignore_index)
            padded[key] = torch.cat([value, filler])
        return padded, padded_size

def _outside_steps(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError(
        "under pipeline parallelism this model holds only this rank's stages and runs inside the strategy's"
        " pipeline schedule: call it from training_step, validation_step, test_step or predict_step."
    )


def _batch_size(batch: Mapping[str, Any], input_name: str) -> int:
    return int(batch[input_name].shape[0])


def _is_per_row(value: Any, size: int) -> bool:
    return isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == size


def _select_rows(batch: Mapping[str, Any], rows: Tensor, size: int) -> dict[str, Any]:
    return {k: (v[rows.to(v.device)] if _is_per_row(v, size) else v) for k, v in batch.items()}


def _cut_rows(tree: Any, size: int, padded_size: int) -> Any:
    leaves, spec = tree_flatten(tree)
    return tree_unflatten([t[:size] if _is_per_row(t, padded_size) else t for t in leaves], spec)


@contextmanager
def _captured_logs(module: Any) -> Iterator[dict[str, tuple[Tensor, dict]]]:
    """``module.log`` (and ``log_dict``, which calls it) record instead of logging while this is open."""
    logged: dict[str, tuple[Tensor, dict]] = {}
    device = next((p.device for p in module.parameters()), None)

    def record(name: str, value: Any, **kwargs: Any) -> None:
        if isinstance(value, Tensor):
            if value.numel() != 1:
                raise ValueError(
                    f"self.log({name!r}) needs a scalar under pipeline parallelism; got shape {tuple(value.shape)}."
                )
            value = value.detach().float().reshape(())
        elif isinstance(value, (int, float)):
            value = torch.tensor(float(value), device=device)
        else:
            raise TypeError(
                f"self.log({name!r}, <{type(value).__name__}>) in training_step under pipeline parallelism: log"
                " numbers or scalar tensors there (update torchmetrics objects in validation/test steps)."
            )
        logged[name] = (value, kwargs)

    previous = module.__dict__.get("log")
    module.log = record  # an instance attribute shadows the method (and the strategy's own wrapper)
    try:
        yield logged
    finally:
        if previous is None:
            del module.log
        else:
            module.log = previous


# What ``self.log(..., reduce_fx=...)`` asks for, by name or as torch's function, as a reduction over the
# stacked microbatch values; anything else (a mean) is the weighted average.
_NOT_A_MEAN = {"sum": torch.sum, torch.sum: torch.sum, "max": torch.amax, torch.max: torch.amax, torch.amax: torch.amax,
               "min": torch.amin, torch.min: torch.amin, torch.amin: torch.amin}


def _not_a_mean(reduce_fx: Any) -> Optional[Callable[..., Tensor]]:
    return _NOT_A_MEAN.get(reduce_fx.lower() if isinstance(reduce_fx, str) else reduce_fx)


def _combine_logs(records: list[tuple[Tensor, dict[str, tuple[Tensor, dict]], float]],
                  batch_size: int) -> dict[str, tuple[Tensor, dict]]:
    """Per name, the microbatch values combined as the local batch's value would be: summed for
    ``reduce_fx="sum"`` (a count over the batch), the largest or smallest for "max" / "min", otherwise averaged
    with the microbatch weights (the token mean for a loss); Lightning's ``batch_size`` set to the whole local
    batch."""
    values: dict[str, list[Tensor]] = {}
    weights: dict[str, list[float]] = {}
    kwargs_of: dict[str, dict] = {}
    for _, logged, weight in records:
        for name, (value, kwargs) in logged.items():
            values.setdefault(name, []).append(value)
            weights.setdefault(name, []).append(weight)
            kwargs_of[name] = kwargs
    combined = {}
    for name, per_microbatch in values.items():
        kwargs = dict(kwargs_of[name])
        if "batch_size" in kwargs:
            kwargs["batch_size"] = batch_size
        reduce = _not_a_mean(kwargs.get("reduce_fx", "mean"))
        if reduce is not None:
            value = reduce(torch.stack(per_microbatch), dim=0)
        else:
            total_weight = sum(weights[name])
            value = sum(v * w for v, w in zip(per_microbatch, weights[name]))
            value = value / total_weight if total_weight else value
        combined[name] = (value, kwargs)
    return combined


def split_step_arguments(args: tuple, kwargs: dict) -> tuple[Any, tuple]:
    """(batch, the step's other arguments in order) from Lightning's call of a step hook."""
    if args:
        return args[0], tuple(args[1:]) + tuple(kwargs.values())
    kwargs = dict(kwargs)
    return kwargs.pop("batch"), tuple(kwargs.values())
