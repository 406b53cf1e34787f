"""Hugging Face DistilBERT: DistilBertModel and DistilBertForTokenClassification (transformers ships no
tp/pp plan for it).

Tensor parallelism is BERT's Megatron split under DistilBERT's names: q/k/v_lin and ffn.lin1 column-wise,
out_lin and ffn.lin2 row-wise. Attention views heads as ``(*input_shape, -1, head_size)`` and reshapes
back with ``-1``, so local heads work unchanged. Embeddings and the classifier stay replicated over tensor
ranks, as in the BERT plan.

Pipeline stages: embeddings on the first stage, ``TransformerBlock`` calls with the bidirectional mask
rebuilt on every stage (what DistilBertModel.forward does), dropout + classifier on the last stage. The
BERT pieces do the same for BERT's modules, so they are reused where the call is identical.
"""

from __future__ import annotations

import sys
from typing import Any

from torch import Tensor, nn

from lightning_mp.plans import ModelPlan, PipelinePlan
from lightning_mp.plans.bert import (
    _base_model_output,
    _bert_block,
    _bert_block_context,
    _token_classification_head,
    _token_classification_output,
)

_LAYER_STYLES = {
    "attention.q_lin": "colwise",
    "attention.k_lin": "colwise",
    "attention.v_lin": "colwise",
    "attention.out_lin": "rowwise",
    "ffn.lin1": "colwise",
    "ffn.lin2": "rowwise",
}


def is_distilbert(module: nn.Module) -> bool:
    if sys.modules.get("transformers") is None:  # not imported means it cannot be a HF model
        return False
    from transformers import DistilBertPreTrainedModel

    return isinstance(module, DistilBertPreTrainedModel)


def distilbert_plan(model: nn.Module) -> ModelPlan:
    base = model.base_model
    prefix = "" if base is model else f"{model.base_model_prefix}."
    blocks = f"{prefix}transformer.layer"
    config = model.config
    return ModelPlan(
        tensor_parallel={f"{blocks}.*.{path}": style for path, style in _LAYER_STYLES.items()},
        blocks=blocks,
        divisible_sizes={"n_heads": config.n_heads, "hidden_dim": config.hidden_dim},
        name=type(model).__name__,
        pipeline=_pipeline_plan(model, prefix),
    )


def _embed(model: nn.Module, input_ids: Tensor, inputs: dict[str, Any]) -> Tensor:
    return model.base_model.embeddings(input_ids, None, inputs.get("position_ids"))


def _base_head(model: nn.Module, hidden: Tensor, inputs: dict[str, Any]) -> Tensor:
    return hidden


def _pipeline_plan(model: nn.Module, prefix: str) -> PipelinePlan | None:
    common = dict(first=(f"{prefix}embeddings",), embed=_embed, block=_bert_block, block_context=_bert_block_context)
    if not prefix:
        return PipelinePlan(last=(), head=_base_head, model_output=_base_model_output, **common)
    from transformers import DistilBertForTokenClassification

    if isinstance(model, DistilBertForTokenClassification):
        return PipelinePlan(last=("classifier",), head=_token_classification_head,
                            model_output=_token_classification_output, **common)
    return None  # other heads: tensor parallelism only
