"""Per-model-family knowledge: which modules are the repeated blocks and how each layer splits.

A :class:`ModelPlan` is plain data about one model instance. Plans are looked up by walking the
LightningModule's submodules top-down and asking each registered factory whether it knows the
module; the first hit wins, and every FQN in the plan is relative to that module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Union

from torch import nn
from torch.distributed.tensor.parallel import ParallelStyle

# A style is a torch ParallelStyle or one of the short names of ``parallel.tensor.STYLE_NAMES``.
Style = Union[str, ParallelStyle]


@dataclass
class ModelPlan:
    """How to parallelize one model.

    Attributes:
        tensor_parallel: module-path glob -> style, in the spirit of Hugging Face's ``tp_plan``. Globs
            match one path component per ``*``: ``"encoder.layer.*.attention.self.query"``.
        blocks: dotted path of the ``nn.ModuleList`` holding the repeated blocks. Each block is an FSDP
            unit and an activation-checkpointing unit (and, later, a pipeline split point).
        divisible_sizes: sizes tensor parallelism splits evenly (e.g. attention heads, FFN width); checked
            against ``tensor_parallel_size`` before anything is sharded.
        name: a human name for error messages.
    """

    tensor_parallel: dict[str, Style] = field(default_factory=dict)
    blocks: str | None = None
    divisible_sizes: dict[str, int] = field(default_factory=dict)
    name: str = "custom model"


PlanFactory = Callable[[nn.Module], ModelPlan]
_REGISTRY: list[tuple[Callable[[nn.Module], bool], PlanFactory]] = []


def register_plan(match: Union[type, Callable[[nn.Module], bool]], factory: PlanFactory) -> None:
    """Teach the strategy a model family. ``match`` is a class (isinstance test) or a predicate.

    Later registrations win over earlier ones, so users can override a shipped plan.
    """
    predicate = (lambda module: isinstance(module, match)) if isinstance(match, type) else match
    _REGISTRY.insert(0, (predicate, factory))


def find_plan(root: nn.Module) -> tuple[str, nn.Module, ModelPlan] | None:
    """The first submodule of ``root`` (breadth-first) that a registered plan knows."""
    _register_builtin_plans()
    queue: list[tuple[str, nn.Module]] = [("", root)]
    while queue:
        path, module = queue.pop(0)
        for predicate, factory in _REGISTRY:
            if predicate(module):
                return path, module, factory(module)
        queue.extend((f"{path}.{name}" if path else name, child) for name, child in module.named_children())
    return None


_builtins_registered = False


def _register_builtin_plans() -> None:
    # Deferred so that importing lightning_mp does not import transformers.
    global _builtins_registered
    if _builtins_registered:
        return
    _builtins_registered = True
    from lightning_mp.plans import bert

    _REGISTRY.append((bert.is_bert, bert.bert_plan))
