"""Tensor parallelism: apply a {module-glob: style} plan with DTensor."""

from __future__ import annotations

import types
from fnmatch import fnmatchcase
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from lightning_mp.plans import Style

# Short names, as in Hugging Face's ``tp_plan``. Factories, because a style instance holds no state
# but a fresh one per module keeps any future stateful style safe.
STYLE_NAMES = {
    "colwise": ColwiseParallel,
    "rowwise": RowwiseParallel,
    # Output gathered back to a full tensor on every rank (e.g. a head that must see all columns).
    "colwise_rep": lambda: ColwiseParallel(output_layouts=Replicate()),
    "sequence_parallel": SequenceParallel,
}


def to_style(style: Style) -> ParallelStyle:
    if isinstance(style, ParallelStyle):
        return style
    if style not in STYLE_NAMES:
        raise ValueError(f"Unknown tensor-parallel style {style!r}; valid names: {', '.join(STYLE_NAMES)}.")
    return STYLE_NAMES[style]()


def _matches(paths: list[str], pattern: str) -> list[str]:
    parts = pattern.split(".")
    return [
        path
        for path in paths
        if len(path.split(".")) == len(parts) and all(fnmatchcase(atom, want)
                                                      for atom, want in zip(path.split("."), parts))
    ]


def present_globs(module: nn.Module, plan: dict[str, Style]) -> dict[str, Style]:
    """The entries of ``plan`` that match a module of ``module``: a pipeline stage holds only part of the
    model (the embedding glob means nothing on a stage without the embedding). The globs are checked
    against the whole model before it is split (``expand_globs``)."""
    paths = [name for name, _ in module.named_modules() if name]
    return {pattern: style for pattern, style in plan.items() if _matches(paths, pattern)}


def expand_globs(module: nn.Module, plan: dict[str, Style]) -> dict[str, ParallelStyle]:
    """Resolve each glob to concrete module paths; a glob matching nothing is an error, not a no-op."""
    paths = [name for name, _ in module.named_modules() if name]
    resolved: dict[str, ParallelStyle] = {}
    for pattern, style in plan.items():
        hits = _matches(paths, pattern)
        if not hits:
            raise ValueError(
                f"Tensor-parallel plan entry {pattern!r} matches no module of {type(module).__name__};"
                f" its modules include: {', '.join(paths[:12])}{' ...' if len(paths) > 12 else ''}."
            )
        for path in hits:
            resolved[path] = to_style(style)
    return resolved


def apply_tensor_parallel(module: nn.Module, tp_mesh: DeviceMesh, plan: dict[str, Style]) -> None:
    if tp_mesh.size() == 1 or not plan:
        return
    parallelize_module(module, tp_mesh, expand_globs(module, plan))


def prepare_for_compile(model: nn.Module, blocks: Iterable[nn.Module]) -> None:
    """Let torch.compile trace the tensor-parallel linears of ``blocks`` with symbolic sizes (torch 2.13).

    Tracing the backward of a view of a DTensor whose sizes are symbols never ends (pytorch#152954: the C++
    ``ViewBackward0`` takes ``max(size, 1)`` of a symbol and gets the same symbol back), and DTensor's
    ``linear`` makes such a view of every 3-D input. So each tensor-parallel ``nn.Linear`` in the blocks sees a
    2-D input: a pre-hook, run before the style's, flattens the plain ``(batch, seq, in)`` tensor and hands its
    leading sizes on as a keyword argument; the layer's forward multiplies the 2-D DTensor; a hook run after
    the style's unflattens the local output. The sizes travel as an argument, not as state on the module: a
    side effect would break the graph inside traced activation checkpointing. Flattening inside the forward
    instead would view the DTensor again (tried: the same RecursionError). The layer keeps its class,
    parameters and state-dict keys; only this instance's ``forward`` changes. Under sequence parallelism the
    linears' inputs are sharded on the sequence dimension, which flattening would merge: that stays refused
    (``compile_limits.py``).

    The first block's input must not be the view ``DTensor.to_local`` returns from a vocabulary-parallel
    embedding: its gradient would then reach DTensor's redistribution as a plain tensor. Each such
    embedding's output is copied (one ``(batch, seq, hidden)`` copy per step).
    """
    inside = set()
    for block in blocks:
        for module in block.modules():
            inside.add(id(module))
            if isinstance(module, nn.Linear) and isinstance(module.weight, DTensor):
                _flatten_inputs(module)
    for module in model.modules():
        if id(module) not in inside and isinstance(module, nn.Embedding) and isinstance(module.weight, DTensor):
            module.register_forward_hook(_copy_local_output)


def _flatten_inputs(linear: nn.Linear) -> None:
    linear.forward = types.MethodType(_linear_on_rows, linear)
    linear.register_forward_pre_hook(_flatten_leading, prepend=True, with_kwargs=True)
    linear.register_forward_hook(_unflatten_leading, with_kwargs=True)


def _linear_on_rows(self: nn.Linear, rows: torch.Tensor, leading_shape: torch.Size) -> torch.Tensor:
    # ``leading_shape`` is unused here: the forward takes it so that the output hook, which sees the forward's
    # keyword arguments, receives it.
    return F.linear(rows, self.weight, self.bias)


def _flatten_leading(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    hidden = args[0]
    return (hidden.flatten(0, -2), *args[1:]), {**kwargs, "leading_shape": hidden.shape[:-1]}


def _unflatten_leading(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
    return output.unflatten(0, kwargs["leading_shape"])


def _copy_local_output(module: nn.Module, args: tuple, output: object) -> object:
    return output.clone() if isinstance(output, torch.Tensor) and not isinstance(output, DTensor) else output
