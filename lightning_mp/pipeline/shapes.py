"""Pipeline stage shapes that follow the batch, without re-running torch's shape inference.

Why this exists. torch infers the shapes of the tensors sent between stages by running a real forward
and backward of the first microbatch through every stage (``PipelineStage``'s dynamic metadata
inference). Under FSDP that forward and backward all-gather parameters and reduce gradients over the
stage's data-parallel ranks. A batch padded to its own longest row (what a token-classification collator
does) changes width on one data-parallel rank while its peer's stays the same: re-inferring then runs on
one peer only, and the data-parallel collectives stop lining up (gloo: "Received data size doesn't match
expected size" with 1F1B; a hang with GPipe). Evaluation has the same problem.

The mechanism. torch infers once, on the first batch, on every rank together (every rank's first step is
a first step). From then on, when the input shape changes, each stage's metadata is *derived* from the
metadata torch last used: the tensors a per-token model sends between stages lead with the microbatch's
input shape (``[rows, width, hidden]`` for input ids ``[rows, width]``), so the new shape is the new input
shape followed by the same trailing dimensions; dtype (mixed precision included) and ``requires_grad``
are kept. The result is given to torch as user-provided metadata (its "static" mode), which runs no
forward, no backward and no collective outside the pipeline group. Every rank of a stage thus does the
same collectives in the same order whatever each rank's batch looks like, in training and evaluation.

Costs: none on the numbers (no padding, nothing recomputed); per shape change a few metadata objects and
torch's mode vote, one point-to-point round trip between pipeline neighbours (they read the same batch).
Rejected alternatives: padding every batch to the data-parallel group's widest row needs an all-reduce
and a host sync every step, only works for inputs with an attention mask, and still re-infers (a real
forward + backward through the whole pipeline) whenever the group's widest row changes, i.e. nearly every
step on real data; agreeing collectively to re-infer costs the same extra forward + backward.

Under sequence parallelism the tensors sent between stages are each tensor rank's sequence shard,
``[rows, width / t, hidden]``: they lead with ``(rows, local width)`` instead (``sequence_shards.py``).

When a stage's metadata does not follow the input shape (e.g. an activation without a per-row leading
dimension), the shapes cannot be derived: without data-parallel peers torch simply re-infers (safe: no
peer to disagree with); with them the step fails with a ValueError naming the tensors, instead of hanging.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Optional, Sequence

import torch

from lightning_mp._compat import give_stage_metadata, stage_metadata, stage_metadata_types


class NotDerivable(Exception):
    """A stage's metadata does not lead with the input shape."""


def contiguous_stride(shape: Sequence[int]) -> tuple[int, ...]:
    stride, running = [], 1
    for size in reversed(shape):
        stride.append(running)
        running *= max(int(size), 1)
    return tuple(reversed(stride))


def _follow(meta: Any, old: tuple[int, ...], new: tuple[int, ...], what: str) -> Any:
    if meta is None:
        return None
    _, TensorMeta = stage_metadata_types()
    if type(meta) is not TensorMeta:  # DTensor metadata carries global shapes and placements
        raise NotDerivable(f"{what} is a {type(meta).__name__}")
    shape = tuple(meta.shape)
    if shape[: len(old)] != old:
        raise NotDerivable(f"{what} has shape {shape}, which does not start with the input shape {old}")
    if tuple(meta.stride) != contiguous_stride(shape):
        raise NotDerivable(f"{what} is not contiguous (stride {tuple(meta.stride)})")
    new_shape = new + shape[len(old):]
    return TensorMeta(shape=torch.Size(new_shape), stride=contiguous_stride(new_shape), dtype=meta.dtype,
                       requires_grad=meta.requires_grad)


def _follow_all(metas: Optional[tuple], old: tuple[int, ...], new: tuple[int, ...], what: str,
                keep_if_not: bool = False) -> Optional[tuple]:
    if metas is None:
        return None
    derived = []
    for index, meta in enumerate(metas):
        try:
            derived.append(_follow(meta, old, new, f"{what}[{index}]"))
        except NotDerivable:
            if not keep_if_not:
                raise
            derived.append(meta)
    return tuple(derived)


def derived_metadata(stage: Any, old: tuple[int, ...], new: tuple[int, ...],
                     sent: Optional[tuple[tuple[int, ...], tuple[int, ...]]] = None) -> Any:
    """The metadata of ``stage`` for microbatches whose input has shape ``new``, from the metadata it used
    for input shape ``old``; raises :class:`NotDerivable` when a sent or received tensor does not lead
    with the input shape.

    ``sent``: (old, new) shape that the tensors sent between stages lead with, when it is not the input's:
    under sequence parallelism each tensor rank sends its sequence shard (``sequence_shards.py``), while the
    first stage still receives the whole input.
    """
    meta = stage_metadata(stage)
    if meta.inputs is None or meta.outputs is None:
        raise NotDerivable(f"stage {stage.stage_index} has no metadata yet")
    name = f"stage {stage.stage_index}"
    between = sent or (old, new)
    received = (old, new) if stage.stage_index == 0 else between
    # The last stage's outputs go to the loss, never to another stage, and their gradients come from the loss:
    # neither shape is used (a DTensor output, vocabulary-sharded logits under loss parallelism, is kept as it was).
    outputs = _follow_all(meta.outputs, *between, f"{name} output", keep_if_not=stage.is_last)
    output_grads = _follow_all(meta.output_grads, *between, f"{name} output gradient", keep_if_not=stage.is_last)
    if stage.is_last and output_grads is None and outputs is not None:
        # What torch derives itself for plain outputs; for DTensor outputs it would otherwise infer them, running the
        # stage again (and comparing what it infers with the metadata given here).
        output_grads = tuple(None if m is None else replace(m, requires_grad=False) for m in outputs)
    StageMeta, _ = stage_metadata_types()
    return StageMeta(
        inputs=_follow_all(meta.inputs, *received, f"{name} input"),
        outputs=outputs,
        input_grads=_follow_all(meta.input_grads, *received, f"{name} input gradient"),
        output_grads=output_grads,
    )


def follow_input_shape(stages: Sequence[Any], old: tuple[int, ...], new: tuple[int, ...],
                       sent: Optional[tuple[tuple[int, ...], tuple[int, ...]]] = None) -> None:
    """Give every stage the metadata for input shape ``new`` as user-provided metadata, so that the next
    initialization of the schedule uses it instead of inferring (all stages or none: raises
    :class:`NotDerivable` before changing anything). ``sent``: see :func:`derived_metadata`."""
    derived = [derived_metadata(stage, old, new, sent) for stage in stages]
    for stage, meta in zip(stages, derived):
        give_stage_metadata(stage, meta)


def forget_given_shapes(stages: Sequence[Any]) -> None:
    """Let torch infer again (its dynamic mode) at the next initialization."""
    StageMeta, _ = stage_metadata_types()
    for stage in stages:
        give_stage_metadata(stage, StageMeta())
