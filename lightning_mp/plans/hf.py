"""Plans for every Hugging Face model that declares its own tensor- and pipeline-parallel plans.

transformers (5.x) puts, on the config class of most decoder families, ``base_model_tp_plan`` (module
glob -> style name) and ``base_model_pp_plan`` (embedding / ``layers`` / final norm, in forward order),
and on head classes ``_tp_plan`` / ``_pp_plan`` (``lm_head``). A model instance merges them under
its own FQNs (``model.tp_plan``, ``model.pp_plan``). This file turns those into a :class:`ModelPlan`.

Why not transformers' own TP code (``transformers.distributed.tensor_parallel``): its styles shard
meta placeholders before weights are loaded (``distribute_tensor(..., src_data_rank=None)``), replace
``module.forward`` instead of using hooks, and ``replicated_with_grad_allreduce`` all-reduces a plain
tensor's ``.grad`` in a post-accumulate hook, which FSDP2 (which swaps parameters and reduce-scatters
gradients itself) and a global grad norm cannot see. So only the *plans* are reused: each HF style name
maps to a torch ``ParallelStyle`` below, whose parameters are DTensors on our tensor-parallel mesh.
A name with no torch equivalent here (MoE experts, packed / fused weights, MLA) is refused before
launch, naming the style and the supported ones.

Pipeline stages run the model's *own* code for everything around the blocks, so per-family details
(rotary embeddings per layer type, sliding-window masks, Gemma's embedding scale and logit soft-capping)
need no code here:

* ``block_context`` calls the base model's ``forward`` on every stage with its blocks replaced by stubs
  that record the arguments each block would get (causal mask, rotary ``position_embeddings``,
  ``position_ids``) and its final modules by identities; block ``i`` then gets exactly what block ``i``
  gets in the unsplit model. Embeddings a stage does not hold are stood in for.
* ``embed`` (first stage) is what the same recorded call hands to block 0: token and position
  embeddings, scaling, embedding dropout, whatever the family does.
* ``head`` calls the head model's ``forward`` with its base model replaced by a stub that returns the
  last stage's hidden states after the final norm, so ``lm_head`` and any logit post-processing run as
  written; the loss is the model's own ``loss_function`` (shifted causal-LM loss).
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
)

from lightning_mp.parallel.styles import GatherSequence, HeadShardedNorm
from lightning_mp.plans import ModelPlan, PipelinePlan

# HF style name -> torch style (factory). Column-wise output stays sharded, or is gathered ("_rep",
# "_gather_output"); row-wise input arrives sharded, or replicated and split locally ("_split_input",
# "_rep"). ``embedding_rowwise`` is a vocabulary-parallel embedding: torch's RowwiseParallel on an
# nn.Embedding shards the rows and sums the partial lookups. ``replicated_with_grad_allreduce`` (q/k/v
# norms of 27 families) is a norm over the last dim of head-sharded states: ``HeadShardedNorm``.
# Left out on purpose: ``sequence_parallel`` (no family uses it in transformers 5.24, and between these
# styles its input would arrive replicated, not sequence-sharded), MoE / packed / MLA styles, ``local_params``.
HF_STYLES: dict[str, Callable[[], ParallelStyle]] = {
    "colwise": ColwiseParallel,
    "colwise_rep": lambda: ColwiseParallel(output_layouts=Replicate()),
    "colwise_gather_output": lambda: ColwiseParallel(output_layouts=Replicate()),
    "rowwise": RowwiseParallel,
    "rowwise_rep": lambda: RowwiseParallel(input_layouts=Replicate()),
    "rowwise_split_input": lambda: RowwiseParallel(input_layouts=Replicate()),
    "embedding_rowwise": lambda: RowwiseParallel(input_layouts=Replicate()),
    "replicated_with_grad_allreduce": HeadShardedNorm,
}


def _transformers() -> Any:
    return sys.modules.get("transformers")  # not imported means it cannot be a HF model


def has_hf_plans(module: nn.Module) -> bool:
    """A transformers model whose config declares both a tensor- and a pipeline-parallel plan."""
    transformers = _transformers()
    if transformers is None or not isinstance(module, transformers.PreTrainedModel):
        return False
    config = module.config.get_text_config()
    return bool(getattr(config, "base_model_tp_plan", None)) and bool(getattr(config, "base_model_pp_plan", None))


def is_hf_causal_lm(module: nn.Module) -> bool:
    """A transformers causal LM (its loss shifts the labels by one position)."""
    transformers = _transformers()
    if transformers is None or not isinstance(module, transformers.PreTrainedModel):
        return False
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update((value,) if isinstance(value, str) else value)
    return type(module).__name__ in names


def is_tied(model: nn.Module) -> bool:
    """Input and output embeddings are one parameter."""
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    return inputs is not None and outputs is not None and inputs.weight is outputs.weight


def _moe_reason(model: nn.Module, styles: dict[str, str]) -> str | None:
    config = model.config.get_text_config()
    experts = next((getattr(config, k) for k in ("num_local_experts", "num_experts", "n_routed_experts")
                    if getattr(config, k, None)), None)
    moe_styles = sorted({s for s in styles.values() if "moe" in s or "packed" in s})
    if experts is None and not moe_styles and not getattr(model, "ep_plan", None):
        return None
    # The style names are transformers' and change between releases (5.25 dropped moe_tp_experts): shown, not relied on.
    shown = f"; styles {', '.join(moe_styles)}" if moe_styles else ""
    return (
        f"{type(model).__name__} is a mixture-of-experts model ({experts or '?'} experts{shown}): routed experts"
        " are not supported under tensor or pipeline"
        " parallelism by lightning_mp (no parity tests); use data parallelism (FSDP2) only"
    )


def hf_plan(model: nn.Module) -> ModelPlan:
    """A ModelPlan from the model's own ``tp_plan`` / ``pp_plan``; see the module docstring."""
    name = type(model).__name__
    config = model.config.get_text_config()
    styles = dict(model.tp_plan)
    tied = is_tied(model)
    if tied:
        # One parameter used by the embedding and lm_head: both keep it replicated over tensor ranks
        # (sharding it through one module would leave the other with a stale, untied copy).
        tied_modules = {_path_of(model, model.get_input_embeddings()), _path_of(model, model.get_output_embeddings())}
        styles = {glob: style for glob, style in styles.items() if glob not in tied_modules}
    unsupported: dict[str, str] = {}
    moe = _moe_reason(model, styles)
    unknown = sorted({s for s in styles.values() if s not in HF_STYLES})
    if moe is not None:
        unsupported["tensor"] = unsupported["pipeline"] = moe
    elif unknown:
        unsupported["tensor"] = (
            f"the tensor-parallel plan of {name} uses style(s) {', '.join(unknown)}, which lightning_mp does not"
            f" support; supported styles: {', '.join(HF_STYLES)}"
        )
    sharded_vocab = any(glob in (_path_of(model, model.get_input_embeddings()),
                                 _path_of(model, model.get_output_embeddings())) for glob in styles)
    divisible = {key: getattr(config, key) for key in ("num_attention_heads", "num_key_value_heads",
                                                       "intermediate_size") if getattr(config, key, None)}
    if sharded_vocab:
        divisible["vocab_size"] = config.vocab_size
    blocks, pipeline = _pipeline_plan(model)
    if pipeline is None and "pipeline" not in unsupported:
        unsupported["pipeline"] = (
            f"{name} has no pipeline plan here: transformers declares one for the base model and causal-LM"
            " heads (`_pp_plan`); other heads are not pipelined"
        )
    head = _path_of(model, model.get_output_embeddings())
    return ModelPlan(
        sequence_parallel=None if unsupported.get("tensor") else _sequence_parallel_plan(model, styles, blocks),
        tensor_parallel={glob: HF_STYLES[style]() for glob, style in styles.items() if style in HF_STYLES},
        blocks=blocks, divisible_sizes=divisible, name=name, pipeline=pipeline,
        shifted_labels=is_hf_causal_lm(model), unsupported=unsupported,
        head=head if head in styles and styles[head] == "colwise_gather_output" else None,
    )


# Sequence parallelism (Korthikanti et al. 2022, as torchtitan applies it): between the tensor-parallel regions
# the residual stream, the norms and the dropouts work on sequence shards (DTensors sharded on dim 1); each
# attention / MLP region all-gathers its input and its row-wise projection reduce-scatters its output.
SEQUENCE = Shard(1)
# Inside a block: row-wise projections reduce-scatter to sequence shards (and stay DTensors for the residual
# add and the norms); column-wise ones take the gathered local input as without sequence parallelism.
_SP_BLOCK_STYLES: dict[str, Callable[[], ParallelStyle]] = {
    **HF_STYLES,
    "rowwise": lambda: RowwiseParallel(output_layouts=SEQUENCE, use_local_output=False),
    "rowwise_split_input": lambda: RowwiseParallel(input_layouts=Replicate(), output_layouts=SEQUENCE,
                                                   use_local_output=False),
}


def _sequence_parallel_plan(model: nn.Module, styles: dict[str, str], blocks: str | None) -> dict[str, Any] | None:
    """The family's plan with sequence parallelism, derived from its structure: every direct child of a block
    that holds a planned projection is a tensor-parallel region (gathers its input), every other one with
    parameters is a norm (sequence-sharded); the final norm too. None when the structure does not fit (no
    head: a base model would return sequence-sharded states; an untied embedding or head not in the plan;
    a block child that is neither)."""
    embedding = _path_of(model, model.get_input_embeddings())
    head = _path_of(model, model.get_output_embeddings())
    if blocks is None or embedding is None or head is None:
        return None
    plan: dict[str, Any] = {}
    if is_tied(model):
        # One replicated weight for both (see hf_plan): the embedding's whole output is cut into this rank's
        # sequence shard, and the head gathers the final norm's shards.
        plan[embedding] = PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=SEQUENCE,
                                              use_local_output=False)
        plan[head] = GatherSequence()
    elif styles.get(embedding) == "embedding_rowwise" and styles.get(head) == "colwise_gather_output":
        # The embedding reduce-scatters its vocabulary-parallel lookup straight into sequence shards; the head
        # gathers the final norm's shards.
        plan[embedding] = RowwiseParallel(input_layouts=Replicate(), output_layouts=SEQUENCE, use_local_output=False)
        plan[head] = ColwiseParallel(input_layouts=SEQUENCE, output_layouts=Replicate())
    else:
        return None
    planned = {glob.split(".")[len(blocks.split(".")) + 1] for glob in styles if glob.startswith(f"{blocks}.*.")}
    plan.update({glob: _SP_BLOCK_STYLES[style]() for glob, style in styles.items()
                 if style in _SP_BLOCK_STYLES and glob.startswith(f"{blocks}.*.")})
    for name, child in model.get_submodule(blocks)[0].named_children():
        if name in planned:
            plan[f"{blocks}.*.{name}"] = GatherSequence()
        elif isinstance(child, nn.Dropout) or not any(True for _ in child.parameters()):
            continue  # element-wise on the shards as they come
        elif not list(child.children()) and getattr(child, "weight", None) is not None and child.weight.dim() == 1:
            plan[f"{blocks}.*.{name}"] = SequenceParallel()
        else:
            return None
    final = [path for path in (model.pp_plan or {}) if path not in (blocks, embedding, head)
             and isinstance(model.get_submodule(path), nn.Module) and not isinstance(model.get_submodule(path),
                                                                                    (nn.ModuleList, nn.Embedding))]
    plan.update({path: SequenceParallel() for path in final
                 if any(True for _ in model.get_submodule(path).parameters())})
    return plan


def _path_of(model: nn.Module, target: nn.Module | None) -> str | None:
    return next((path for path, module in model.named_modules() if module is target), None)


# ---------------------------------------------------------------- pipeline pieces
def _pipeline_plan(model: nn.Module) -> tuple[str | None, PipelinePlan | None]:
    """(blocks path, pipeline plan): the entries of ``pp_plan`` before the block list run on the first
    stage, those after it (final norm, then the head's ``lm_head``) on the last."""
    base = model.base_model
    prefix = "" if base is model else f"{model.base_model_prefix}."
    base_entries = [f"{prefix}{key}" for key in (base.pp_plan or {})]
    blocks = next((key for key in base_entries if isinstance(model.get_submodule(key), nn.ModuleList)), None)
    if blocks is None:
        return None, None
    head_entries = [key for key in (model.pp_plan or {}) if key not in base_entries]
    if base is not model and (not head_entries or not is_hf_causal_lm(model)):
        return blocks, None  # a head whose forward we cannot rebuild from its plan
    split = base_entries.index(blocks)
    return blocks, own_code_pipeline(model, blocks, tuple(base_entries[:split]), tuple(base_entries[split + 1:]),
                                     tuple(head_entries))


class _BlockArguments(nn.Module):
    """Stands in for block ``index`` while the base model's forward runs: records what the block is
    called with (hidden states and the other arguments) and passes the hidden states through."""

    def __init__(self, index: int, record: dict[int, tuple[Tensor, tuple, dict[str, Any]]]) -> None:
        super().__init__()
        self.index, self.record = index, record

    def forward(self, hidden: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        self.record[self.index] = (hidden, args, kwargs)
        return hidden


class _Zero(nn.Module):
    """Stands in for an embedding this stage does not hold (GPT-2 adds its position embedding to
    ``inputs_embeds``): adds nothing."""

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        return torch.zeros(())


class _FinalHidden(nn.Module):
    """Stands in for the base model under the head's forward: the last stage's hidden states after the
    final modules (norm), as ``last_hidden_state``."""

    def __init__(self, hidden: Tensor) -> None:
        super().__init__()
        self.hidden = hidden

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        # The richest base output, so any head's forward finds the fields it copies (GPT-2 reads
        # cross_attentions); all but the hidden states are None, as without output_* flags.
        from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=self.hidden)


class _Swapped:
    """Replace child modules for the duration of a ``with`` block (a stage runs one call at a time)."""

    def __init__(self, model: nn.Module, replacements: dict[str, nn.Module]) -> None:
        self.model, self.replacements, self.saved = model, replacements, []

    def __enter__(self) -> None:
        for path, module in self.replacements.items():
            owner_path, _, name = path.rpartition(".")
            owner = self.model.get_submodule(owner_path) if owner_path else self.model
            self.saved.append((owner, name, owner._modules.get(name)))
            owner._modules[name] = module

    def __exit__(self, *exc: Any) -> None:
        for owner, name, module in reversed(self.saved):
            owner._modules[name] = module


class OwnCodePieces:
    """Stage functions that run the model's own forward code around the blocks (see the module
    docstring); usable for any HF model whose base model loops over ``blocks`` once, in order, and
    whose head model calls its base model and reads ``last_hidden_state`` / ``outputs[0]``.

    ``first``: modules before the blocks (embeddings, embedding dropout); ``final``: modules of the base
    model after the blocks (final norm). ``base_path``: where the base model sits ("" for a base model).
    """

    def __init__(self, model: nn.Module, base_path: str, blocks: str, first: tuple[str, ...],
                 final: tuple[str, ...]) -> None:
        self.base_path, self.blocks, self.first, self.final = base_path, blocks, first, final
        self.num_blocks = len(model.get_submodule(blocks))
        self.embeddings = {path for path in first if isinstance(model.get_submodule(path), nn.Embedding)}

    def _run_base(self, model: nn.Module, inputs: dict[str, Any], **embedding: Tensor) -> dict[int, tuple]:
        """Run the base model's forward with every block a recorder and the final modules identities;
        the modules before the blocks run when this stage holds them (first stage), else stand-ins."""
        base = model.get_submodule(self.base_path) if self.base_path else model
        record: dict[int, tuple] = {}
        stubs = nn.ModuleList(_BlockArguments(i, record) for i in range(self.num_blocks))
        swaps: dict[str, nn.Module] = {self.blocks: stubs, **{path: nn.Identity() for path in self.final}}
        if "input_ids" not in embedding:  # stand-ins on stages without the embeddings
            swaps.update((path, _Zero() if path in self.embeddings else nn.Identity()) for path in self.first)
        with _Swapped(model, swaps):
            # The class's forward: a pipelined base model is itself the stage, whose forward is replaced.
            type(base).forward(base, attention_mask=inputs.get("attention_mask"),
                               position_ids=inputs.get("position_ids"), use_cache=False, **embedding)
        return record

    def embed(self, model: nn.Module, input_ids: Tensor, inputs: dict[str, Any]) -> Tensor:
        # What reaches block 0 in the unsplit model: embeddings, position embeddings, scaling, dropout.
        return self._run_base(model, inputs, input_ids=input_ids)[0][0]

    def block_context(self, model: nn.Module, hidden: Tensor, inputs: dict[str, Any]) -> dict[str, Any]:
        record = self._run_base(model, inputs, inputs_embeds=hidden)
        owned = model.get_submodule(self.blocks)
        return {"per_block": {id(block): record[int(key)][1:] for key, block in owned.items()}}

    def block(self, block: nn.Module, hidden: Tensor, context: dict[str, Any]) -> Tensor:
        args, kwargs = context["per_block"][id(block)]
        return block(hidden, *args, **kwargs)

    def head(self, model: nn.Module, hidden: Tensor, inputs: dict[str, Any]) -> Tensor:
        for path in self.final:
            hidden = model.get_submodule(path)(hidden)
        if not self.base_path:
            return hidden
        # The class's forward: on a stage, ``model.forward`` is the stage's own (see pipeline/split.py).
        with _Swapped(model, {self.base_path: _FinalHidden(hidden)}):
            output = type(model).forward(model, inputs_embeds=hidden, attention_mask=inputs.get("attention_mask"),
                                         use_cache=False)
        return output.logits

    def model_output(self, model: nn.Module, logits: Tensor, kwargs: dict[str, Any]) -> Any:
        from transformers.modeling_outputs import CausalLMOutputWithPast

        labels = kwargs.get("labels")
        loss = None
        if labels is not None:
            loss = model.loss_function(logits=logits, labels=labels.to(logits.device),
                                       vocab_size=model.config.get_text_config().vocab_size)
        return CausalLMOutputWithPast(loss=loss, logits=logits)


def own_code_pipeline(model: nn.Module, blocks: str, first: tuple[str, ...], final: tuple[str, ...],
                      head: tuple[str, ...]) -> PipelinePlan:
    """A PipelinePlan for a causal LM (or its base model) from where its parts are."""
    base_path = "" if model.base_model is model else model.base_model_prefix
    pieces = OwnCodePieces(model, base_path, blocks, first, final)
    return PipelinePlan(
        first=first, last=final + head, embed=pieces.embed, block_context=pieces.block_context, block=pieces.block,
        head=pieces.head, model_output=pieces.model_output if base_path else _base_output,
    )


def _base_output(model: nn.Module, hidden: Tensor, kwargs: dict[str, Any]) -> Any:
    from transformers.modeling_outputs import BaseModelOutputWithPast

    return BaseModelOutputWithPast(last_hidden_state=hidden)


def causal_lm_fallback(model: nn.Module) -> ModelPlan:
    """Any other HF causal LM: no parallel plan, but its loss shifts the labels (data-parallel token
    weighting must know)."""
    reason = (f"transformers declares no tensor/pipeline plan for {type(model).__name__} and lightning_mp ships"
              " none; register one with `lightning_mp.register_plan`")
    return ModelPlan(name=type(model).__name__, shifted_labels=True,
                     unsupported={"tensor": reason, "pipeline": reason})
