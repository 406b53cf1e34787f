"""Hugging Face BERT family: BertModel and every BertFor* head (all-MiniLM-L6-v2 is a BERT).

Tensor parallelism follows Megatron's split of a transformer layer: q/k/v and the FFN input are
column-wise (each rank owns whole heads / a slice of the FFN width), the attention output and the FFN
output are row-wise (one all-reduce each). HF's BERT reshapes heads with ``view(..., -1, head_dim)``,
so local shards need no change to the model code.

Embeddings and task heads stay replicated across tensor ranks: the word embedding is often tied to
the MLM decoder, and BERT's vocabulary (30,522) does not split evenly for most degrees. FSDP still
shards them across data-parallel ranks.
"""

from __future__ import annotations

import sys

from torch import nn

from lightning_mp.plans import ModelPlan

_LAYER_STYLES = {
    "attention.self.query": "colwise",
    "attention.self.key": "colwise",
    "attention.self.value": "colwise",
    "attention.output.dense": "rowwise",
    "intermediate.dense": "colwise",
    "output.dense": "rowwise",
}


def is_bert(module: nn.Module) -> bool:
    transformers = sys.modules.get("transformers")  # not imported means it cannot be a HF model
    if transformers is None:
        return False
    from transformers import BertPreTrainedModel

    return isinstance(module, BertPreTrainedModel)


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
    )
