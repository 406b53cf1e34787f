"""Per-model-family knowledge: which modules are the repeated blocks and how each layer splits.

A :class:`ModelPlan` is plain data about one model instance. Plans are looked up by walking the
LightningModule's submodules top-down and asking each registered factory whether it knows the
module; the first hit wins, and every FQN in the plan is relative to that module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

from torch import Tensor, nn
from torch.distributed.tensor.parallel import ParallelStyle

# A style is a torch ParallelStyle or one of the short names of ``parallel.tensor.STYLE_NAMES``.
Style = Union[str, ParallelStyle]


@dataclass
class PipelinePlan:
    """How one model runs when its blocks are split into pipeline stages (``parallel.pipeline``).

    Every stage is a pruned copy of the whole model: it keeps its own blocks (under their original
    indices), the first stage also keeps ``first`` and the last stage ``last``. Since a pruned model
    can no longer run its own ``forward``, the stage runs ``embed`` → ``block`` per owned block →
    ``head`` instead, skipping what it does not own.

    Attributes:
        first: module paths (relative to the model) owned by the first stage only, e.g. embeddings.
        last: module paths owned by the last stage only, e.g. the pooler and the task head.
        input_name: the model input the first stage receives positionally (``input_ids``). Every other
            tensor input reaches every stage as a keyword argument, split into microbatches alike.
        embed: ``(model, first_input, inputs) -> hidden``; first stage, before its blocks.
        block_context: ``(model, hidden, inputs) -> dict``; computed once per stage and microbatch, its
            entries reach every ``block`` call (e.g. the extended attention mask). Optional.
        block: ``(block, hidden, context) -> hidden``; one block.
        head: ``(model, hidden, inputs) -> output``; last stage, after its blocks. The output is what
            the loss function and ``eval_step`` see (e.g. logits).
        model_output: ``(model, head_output, call_kwargs) -> what model(**call_kwargs) returns`` (e.g. a
            Hugging Face output whose ``.loss`` comes from ``labels``). Under the strategy, a
            LightningModule's unchanged ``training_step`` / ``validation_step`` call the model, and the
            model answers with the pipeline's output in this form. None: the head output itself.
    """

    first: tuple[str, ...]
    last: tuple[str, ...]
    embed: Callable[[nn.Module, Tensor, dict[str, Any]], Tensor]
    block: Callable[[nn.Module, Tensor, dict[str, Any]], Tensor]
    head: Callable[[nn.Module, Tensor, dict[str, Any]], Any]
    block_context: Optional[Callable[[nn.Module, Tensor, dict[str, Any]], dict[str, Any]]] = None
    input_name: str = "input_ids"
    model_output: Optional[Callable[[nn.Module, Any, dict[str, Any]], Any]] = None


@dataclass
class ModelPlan:
    """How to parallelize one model.

    Attributes:
        tensor_parallel: module-path glob -> style, in the spirit of Hugging Face's ``tp_plan``. Globs
            match one path component per ``*``: ``"encoder.layer.*.attention.self.query"``.
        blocks: dotted path of the ``nn.ModuleList`` holding the repeated blocks. Each block is an FSDP
            unit, an activation-checkpointing unit and the unit pipeline stages are cut at.
        divisible_sizes: sizes tensor parallelism splits evenly (e.g. attention heads, FFN width); checked
            against ``tensor_parallel_size`` before anything is sharded.
        name: a human name for error messages.
        pipeline: how to run the model split into pipeline stages; None when the model cannot be
            pipelined (no ``blocks``, tied weights across first and last stage, ...).
        shifted_labels: the model's own loss shifts ``labels`` by one position (causal LMs): token
            weighting then counts ``labels[..., 1:]`` (see ``parallel.token_weighting.labelled_tokens``).
        unsupported: axis (``"tensor"``, ``"pipeline"``) -> why this model cannot use it; checked with the
            degrees before anything is launched (e.g. mixture-of-experts layers, an unknown style).
        sequence_parallel: the tensor-parallel plan with sequence parallelism (norms and residual stream on
            sequence shards between the tensor-parallel regions), or None when the family has none.
        head: the ``tensor_parallel`` key of the column-sharded output head whose logits the model's loss
            reads (e.g. ``"lm_head"``); None when the head is replicated. Loss parallelism needs it.
    """

    tensor_parallel: dict[str, Style] = field(default_factory=dict)
    blocks: str | None = None
    divisible_sizes: dict[str, int] = field(default_factory=dict)
    name: str = "custom model"
    pipeline: Optional[PipelinePlan] = None
    shifted_labels: bool = False
    unsupported: dict[str, str] = field(default_factory=dict)
    head: str | None = None
    sequence_parallel: Optional[dict[str, Style]] = None


PlanFactory = Callable[[nn.Module], ModelPlan]
_REGISTRY: list[tuple[Callable[[nn.Module], bool], PlanFactory]] = []


def as_model_plan(plan: Union[ModelPlan, dict[str, Style], None]) -> Optional[ModelPlan]:
    """``ModelParallelStrategy(plan=...)`` as a ModelPlan: a ``{module-glob: style}`` dict is its tensor-parallel
    part (paths relative to the LightningModule)."""
    if isinstance(plan, dict):
        plan = ModelPlan(tensor_parallel=plan, name="user plan")
    if plan is not None and not isinstance(plan, ModelPlan):
        raise TypeError(f"plan must be a ModelPlan or a dict of module-glob -> style, got {type(plan).__name__}.")
    return plan


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
    from lightning_mp.plans import bert, distilbert, gpt2, hf

    # First match wins: shipped per-family plans, then plans derived from transformers' own, then any other
    # causal LM (no parallel plan, but its labels are shifted).
    _REGISTRY.append((bert.is_bert, bert.bert_plan))
    _REGISTRY.append((distilbert.is_distilbert, distilbert.distilbert_plan))
    _REGISTRY.append((gpt2.is_gpt2, gpt2.gpt2_plan))
    _REGISTRY.append((hf.has_hf_plans, hf.hf_plan))
    _REGISTRY.append((hf.is_hf_causal_lm, hf.causal_lm_fallback))
