"""Tensor parallelism: apply a {module-glob: style} plan with DTensor."""

from __future__ import annotations

from fnmatch import fnmatchcase

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate
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
        if len(path.split(".")) == len(parts) and all(fnmatchcase(atom, want) for atom, want in zip(path.split("."), parts))
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
