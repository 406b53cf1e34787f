"""Hugging Face BERT family: BertModel and every BertFor* head (all-MiniLM-L6-v2 is a BERT), and the
families built from BERT's layer: RoBERTa, XLM-RoBERTa and ELECTRA (one plan, found by base-model prefix).

Tensor parallelism follows Megatron's split of a transformer layer: q/k/v and the FFN input are
column-wise (each rank owns whole heads / a slice of the FFN width), the attention output and the FFN
output are row-wise (one all-reduce each). HF's BERT reshapes heads with ``view(..., -1, head_dim)``,
so local shards need no change to the model code.

Embeddings and task heads stay replicated across tensor ranks: the word embedding is often tied to
the MLM decoder, and BERT's vocabulary (30,522) does not split evenly for most degrees. FSDP still
shards them across data-parallel ranks.

Pipeline stages run the pieces of ``BertModel.forward`` / ``BertFor*.forward`` one by one: embeddings
on the first stage, ``BertLayer`` calls, then the head on the last stage. The extended attention mask
is rebuilt on every stage from the ``attention_mask`` input, which every stage receives.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import Tensor, nn

from lightning_mp.plans import ModelPlan, PipelinePlan

_LAYER_STYLES = {
    "attention.self.query": "colwise",
    "attention.self.key": "colwise",
    "attention.self.value": "colwise",
    "attention.output.dense": "rowwise",
    "intermediate.dense": "colwise",
    "output.dense": "rowwise",
}


def is_bert(module: nn.Module) -> bool:
    """BERT and the families with BERT's layer (same module names, same ``view(..., -1, head_dim)``):
    RoBERTa, XLM-RoBERTa, ELECTRA."""
    transformers = sys.modules.get("transformers")  # not imported means it cannot be a HF model
    if transformers is None:
        return False
    from transformers import (
        BertPreTrainedModel,
        ElectraPreTrainedModel,
        RobertaPreTrainedModel,
        XLMRobertaPreTrainedModel,
    )

    return isinstance(module, (BertPreTrainedModel, RobertaPreTrainedModel, XLMRobertaPreTrainedModel,
                               ElectraPreTrainedModel))


def bert_plan(model: nn.Module) -> ModelPlan:
    # BertModel is its own base; BertFor* heads keep it under ``base_model_prefix`` ("bert").
    base = model.base_model
    prefix = "" if base is model else f"{model.base_model_prefix}."
    if getattr(base, "encoder", None) is None:
        raise ValueError(f"{type(model).__name__} has no BERT encoder; cannot build a plan for it.")
    config = model.config
    blocks = f"{prefix}encoder.layer"
    return ModelPlan(
        tensor_parallel={f"{blocks}.*.{path}": style for path, style in _LAYER_STYLES.items()},
        blocks=blocks,
        divisible_sizes={
            "num_attention_heads": config.num_attention_heads,
            "intermediate_size": config.intermediate_size,
        },
        name=type(model).__name__,
        pipeline=bert_pipeline_plan(model),
        sequence_parallel=_sequence_parallel(model, prefix, blocks),
    )


def _sequence_parallel(model: nn.Module, prefix: str, blocks: str) -> dict[str, Any] | None:
    """BERT's layer with sequence parallelism. BERT is post-norm with the residual add inside
    ``BertSelfOutput`` / ``BertOutput``: the sequence shards enter the layer, ``attention.self`` and
    ``intermediate`` gather them for their column-wise projections, the row-wise projections reduce-scatter
    back into shards, and the residual add and LayerNorm run on the shards. The embeddings run whole
    (replicated, as without sequence parallelism) and hand over this rank's shard (ELECTRA: its projection
    to the hidden width does); the task head gathers. Only for the token and sequence classifiers (a bare
    BertModel would return sequence-sharded states)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleOutput,
        RowwiseParallel,
        SequenceParallel,
    )

    from lightning_mp.parallel.styles import GatherSequence

    token_classifiers = ("Bert", "Roberta", "XLMRoberta", "Electra")
    gathered_by = {**{f"{family}ForTokenClassification": "classifier" for family in token_classifiers},
                   "BertForSequenceClassification": f"{prefix}pooler"}.get(type(model).__name__)
    if gathered_by is None or not prefix:
        return None
    sequence = Shard(1)
    entry = "embeddings_project" if getattr(model.base_model, "embeddings_project", None) is not None else "embeddings"
    return {
        f"{prefix}{entry}": PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=sequence,
                                                use_local_output=False),
        f"{blocks}.*.attention.self": GatherSequence(),
        **{f"{blocks}.*.attention.self.{name}": ColwiseParallel() for name in ("query", "key", "value")},
        f"{blocks}.*.attention.output.dense": RowwiseParallel(output_layouts=sequence, use_local_output=False),
        f"{blocks}.*.attention.output.LayerNorm": SequenceParallel(),
        f"{blocks}.*.intermediate": GatherSequence(),
        f"{blocks}.*.intermediate.dense": ColwiseParallel(),
        f"{blocks}.*.output.dense": RowwiseParallel(output_layouts=sequence, use_local_output=False),
        f"{blocks}.*.output.LayerNorm": SequenceParallel(),
        gathered_by: GatherSequence(),
    }


# ---------------------------------------------------------------- pipeline pieces
def _bert_embed(model: nn.Module, input_ids: Tensor, inputs: dict[str, Any]) -> Tensor:
    base = model.base_model
    hidden = base.embeddings(
        input_ids=input_ids, token_type_ids=inputs.get("token_type_ids"), position_ids=inputs.get("position_ids")
    )
    project = getattr(base, "embeddings_project", None)  # ELECTRA: embedding width -> hidden width
    return hidden if project is None else project(hidden)


def _bert_block_context(model: nn.Module, hidden: Tensor, inputs: dict[str, Any]) -> dict[str, Any]:
    # What BertModel._create_attention_masks does for an encoder: None when nothing is masked (SDPA
    # then skips the mask), else the additive 4-D mask in the dtype of the hidden states.
    from transformers.masking_utils import create_bidirectional_mask

    mask = create_bidirectional_mask(
        config=model.config, inputs_embeds=hidden, attention_mask=inputs.get("attention_mask")
    )
    return {"attention_mask": mask}


def _bert_block(layer: nn.Module, hidden: Tensor, context: dict[str, Any]) -> Tensor:
    return layer(hidden, context["attention_mask"])


def _token_classification_head(model: nn.Module, hidden: Tensor, inputs: dict[str, Any]) -> Tensor:
    return model.classifier(model.dropout(hidden))


def _sequence_classification_head(model: nn.Module, hidden: Tensor, inputs: dict[str, Any]) -> Tensor:
    return model.classifier(model.dropout(model.bert.pooler(hidden)))


def _base_model_head(model: nn.Module, hidden: Tensor, inputs: dict[str, Any]) -> Any:
    # (last_hidden_state, pooler_output) as in BertModel's output; only the former without a pooler.
    return hidden if model.pooler is None else (hidden, model.pooler(hidden))


# What BertFor*.forward returns, rebuilt from the last stage's output (the loss exactly as HF computes it).
def _token_classification_output(model: nn.Module, logits: Tensor, kwargs: dict[str, Any]) -> Any:
    from transformers.modeling_outputs import TokenClassifierOutput

    labels = kwargs.get("labels")
    loss = None
    if labels is not None:
        loss = nn.functional.cross_entropy(logits.view(-1, model.num_labels), labels.view(-1).to(logits.device))
    return TokenClassifierOutput(loss=loss, logits=logits)


def _sequence_classification_output(model: nn.Module, logits: Tensor, kwargs: dict[str, Any]) -> Any:
    from transformers.modeling_outputs import SequenceClassifierOutput

    labels = kwargs.get("labels")
    loss = None
    if labels is not None:
        labels = labels.to(logits.device)
        problem = model.config.problem_type
        if problem is None:  # HF's inference, without writing it back into the config
            if model.num_labels == 1:
                problem = "regression"
            elif labels.dtype in (torch.long, torch.int):
                problem = "single_label_classification"
            else:
                problem = "multi_label_classification"
        if problem == "regression":
            loss = nn.functional.mse_loss(logits.squeeze(), labels.squeeze()) if model.num_labels == 1 else \
                nn.functional.mse_loss(logits, labels)
        elif problem == "single_label_classification":
            loss = nn.functional.cross_entropy(logits.view(-1, model.num_labels), labels.view(-1))
        else:
            loss = nn.functional.binary_cross_entropy_with_logits(logits, labels)
    return SequenceClassifierOutput(loss=loss, logits=logits)


def _base_model_output(model: nn.Module, output: Any, kwargs: dict[str, Any]) -> Any:
    from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions

    hidden, pooled = output if isinstance(output, tuple) else (output, None)
    return BaseModelOutputWithPoolingAndCrossAttentions(last_hidden_state=hidden, pooler_output=pooled)


def bert_pipeline_plan(model: nn.Module) -> PipelinePlan | None:
    """The pipeline pieces for the base models, the token classifiers and BertForSequenceClassification.

    Other heads get None (no pipeline support): the MLM / pre-training heads tie the decoder to the
    word embedding; RoBERTa's sequence head reads the first token itself, without a pooler; decoders
    need a causal mask and a cache.
    """
    from transformers import BertForSequenceClassification

    config = model.config
    if config.is_decoder or config.add_cross_attention:
        return None
    base = model.base_model
    prefix = "" if base is model else f"{model.base_model_prefix}."
    first = (f"{prefix}embeddings",) + ((f"{prefix}embeddings_project",) if hasattr(base, "embeddings_project") else ())
    pooler = (f"{prefix}pooler",) if getattr(base, "pooler", None) is not None else ()
    common = dict(first=first, embed=_bert_embed, block=_bert_block, block_context=_bert_block_context,
                  input_name="input_ids")
    if base is model:
        return PipelinePlan(last=pooler, head=_base_model_head, model_output=_base_model_output, **common)
    if type(model).__name__.endswith("ForTokenClassification") and hasattr(model, "dropout"):
        return PipelinePlan(last=("classifier",) + pooler, head=_token_classification_head,
                            model_output=_token_classification_output, **common)
    if isinstance(model, BertForSequenceClassification):
        return PipelinePlan(last=("bert.pooler", "classifier"), head=_sequence_classification_head,
                            model_output=_sequence_classification_output, **common)
    return None
