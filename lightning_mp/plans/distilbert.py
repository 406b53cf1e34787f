"""Hugging Face DistilBERT: DistilBertModel and DistilBertForTokenClassification (transformers ships no
tp/pp plan for it).

Tensor parallelism is BERT's Megatron split under DistilBERT's names: q/k/v_lin and ffn.lin1 column-wise,
out_lin and ffn.lin2 row-wise. Attention views heads as ``(*input_shape, -1, head_size)`` and reshapes
back with ``-1``, so local heads work unchanged. Embeddings and the classifier stay replicated over tensor
ranks, as in the BERT plan.

Sequence parallelism (token classifier): the norms and residual adds on sequence shards, as for BERT.

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
        sequence_parallel=_sequence_parallel(model, blocks),
    )


def _sequence_parallel(model: nn.Module, blocks: str) -> dict[str, Any] | None:
    """DistilBERT's block with sequence parallelism, as BERT's (``plans/bert.py``): post-norm, the residual
    adds and both LayerNorms on the sequence shards; ``attention`` and ``ffn`` gather their input and their
    row-wise projection reduce-scatters back into shards. The embeddings run whole and hand over this
    rank's shard; the classifier gathers. Only for the token classifier (DistilBertModel would return
    sequence-sharded states; the other heads are not planned)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleOutput,
        RowwiseParallel,
        SequenceParallel,
    )
    from transformers import DistilBertForTokenClassification

    from lightning_mp.parallel.styles import GatherSequence

    if not isinstance(model, DistilBertForTokenClassification):
        return None
    sequence = Shard(1)
    return {
        "distilbert.embeddings": PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=sequence,
                                                     use_local_output=False),
        f"{blocks}.*.attention": GatherSequence(),
        **{f"{blocks}.*.attention.{name}": ColwiseParallel() for name in ("q_lin", "k_lin", "v_lin")},
        f"{blocks}.*.attention.out_lin": RowwiseParallel(output_layouts=sequence, use_local_output=False),
        f"{blocks}.*.sa_layer_norm": SequenceParallel(),
        f"{blocks}.*.ffn": GatherSequence(),
        f"{blocks}.*.ffn.lin1": ColwiseParallel(),
        f"{blocks}.*.ffn.lin2": RowwiseParallel(output_layouts=sequence, use_local_output=False),
        f"{blocks}.*.output_layer_norm": SequenceParallel(),
        "classifier": GatherSequence(),
    }


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
