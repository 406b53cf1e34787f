"""Tiny random Hugging Face models of any family, padded variable-length data, and one LightningModule.

Adding a family to the test matrix is one line in ``FAMILIES``: its ``model_type`` and the config
fields that differ from the common tiny shape (hidden 32, 4 heads / 2 KV heads, FFN 64, vocab 96).
Decoders train as causal LMs (``AutoModelForCausalLM``), encoders as token classifiers.

The data is shaped like real data: rows of different lengths, right-padded to the longest row of their
own batch (``attention_mask`` 0 and label -100 on padding), so data-parallel ranks and pipeline
microbatches hold different numbers of labelled tokens. ``fixed_width`` pads every batch to the full
length instead (pipelines with data parallelism need equal widths across data-parallel peers today).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

VOCAB, SEQ, LABELS, HIDDEN = 96, 12, 5, 32
PAD = 0

_COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
               max_position_embeddings=64, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
               tie_word_embeddings=False)
_NO_DROPOUT = dict(attention_dropout=0.0)
_BERT_LIKE = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_attention_heads=4, intermediate_size=64,
                  max_position_embeddings=64, pad_token_id=PAD, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0, num_labels=LABELS)

# name -> (model_type, task, config fields)
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("llama", "causal", {**_COMMON, **_NO_DROPOUT}),
    "qwen2": ("qwen2", "causal", {**_COMMON, **_NO_DROPOUT}),
    "qwen3": ("qwen3", "causal", {**_COMMON, **_NO_DROPOUT, "head_dim": 8}),
    "mistral": ("mistral", "causal", {**_COMMON, **_NO_DROPOUT, "sliding_window": None}),
    "gemma": ("gemma", "causal", {**_COMMON, **_NO_DROPOUT, "head_dim": 8}),
    # Sliding-window layers (window 4 < the 12-token rows) alternate with full attention, each with its
    # own rotary embedding; q/k norms are head-sharded; logits are soft-capped.
    "gemma3": ("gemma3_text", "causal", {**_COMMON, **_NO_DROPOUT, "head_dim": 8, "sliding_window": 4,
                                         "layer_types": None, "sliding_window_pattern": 2,
                                         "final_logit_softcapping": 30.0}),
    "phi3": ("phi3", "causal", {**_COMMON, **_NO_DROPOUT, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
                                "pad_token_id": PAD}),
    "olmo2": ("olmo2", "causal", {**_COMMON, **_NO_DROPOUT}),
    "bert": ("bert", "token", _BERT_LIKE),
    "roberta": ("roberta", "token", {**_BERT_LIKE, "pad_token_id": 1}),
    "xlm-roberta": ("xlm-roberta", "token", {**_BERT_LIKE, "pad_token_id": 1}),
    "electra": ("electra", "token", {**_BERT_LIKE, "embedding_size": 16}),
    "distilbert": ("distilbert", "token", dict(vocab_size=VOCAB, dim=32, n_heads=4, hidden_dim=64,
                                               max_position_embeddings=64, pad_token_id=PAD, dropout=0.0,
                                               attention_dropout=0.0, num_labels=LABELS)),
    "gpt2": ("gpt2", "causal", dict(vocab_size=VOCAB, n_embd=32, n_head=4, n_inner=64, n_positions=64,
                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False,
                                    bos_token_id=1, eos_token_id=2)),
}


def tiny_config(family: str, layers: int = 2, **overrides: Any):
    from transformers import AutoConfig

    model_type, _, fields = FAMILIES[family]
    layer_key = {"distilbert": "n_layers", "gpt2": "n_layer"}.get(family, "num_hidden_layers")
    return AutoConfig.for_model(model_type, **{**fields, layer_key: layers, **overrides})


def tiny_model(family: str, layers: int = 2, **overrides: Any) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

    config = tiny_config(family, layers, **overrides)
    config._attn_implementation = "sdpa"
    task = FAMILIES[family][1]
    factory = AutoModelForCausalLM if task == "causal" else AutoModelForTokenClassification
    return factory.from_config(config, attn_implementation="sdpa")


class PaddedTokens(Dataset):
    """Rows of 3..SEQ tokens; labels are the ids (causal LM) or random classes with some unlabelled."""

    def __init__(self, task: str, size: int = 64, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.lengths = torch.randint(3, SEQ + 1, (size,), generator=g)
        self.input_ids = torch.randint(3, VOCAB, (size, SEQ), generator=g)
        positions = torch.arange(SEQ).expand(size, SEQ)
        real = positions < self.lengths[:, None]
        self.input_ids[~real] = PAD
        self.attention_mask = real.long()
        if task == "causal":
            self.labels = self.input_ids.clone()
        else:
            self.labels = torch.randint(0, LABELS, (size, SEQ), generator=g)
            self.labels[torch.rand(size, SEQ, generator=g) < 0.3] = -100
        self.labels[~real] = -100

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i], "labels": self.labels[i]}


def collate(rows: list[dict[str, torch.Tensor]], fixed_width: bool = False) -> dict[str, torch.Tensor]:
    batch = {key: torch.stack([row[key] for row in rows]) for key in rows[0]}
    width = SEQ if fixed_width else int(batch["attention_mask"].sum(1).max())
    # Contiguous, as a tokenizer's padded batch is: RoBERTa's and DistilBERT's token-classification losses
    # call ``labels.view(-1)``, which a column slice of the full-width rows cannot serve.
    return {key: value[:, :width].contiguous() for key, value in batch.items()}


def loader(family: str, batch_size: int, size: int = 64, single_process: bool = False,
           fixed_width: bool = False) -> DataLoader:
    """Same global batches in every layout (see tiny_bert.loader for the sampler order)."""
    from functools import partial

    dataset = PaddedTokens(FAMILIES[family][1], size)
    kwargs = dict(batch_size=batch_size, collate_fn=partial(collate, fixed_width=fixed_width))
    if single_process:
        order = torch.randperm(size, generator=torch.Generator().manual_seed(0)).tolist()
        return DataLoader(dataset, sampler=order, **kwargs)
    return DataLoader(dataset, shuffle=False, **kwargs)


class TinyHFModule(L.LightningModule):
    """An ordinary LightningModule holding ``AutoModelFor*.from_config``: no parallel code."""

    def __init__(self, family: str, layers: int = 2, lr: float = 1e-2, optimizer: str = "adamw",
                 **overrides: Any) -> None:
        super().__init__()
        torch.manual_seed(1234)
        self.model = tiny_model(family, layers, **overrides)
        self.lr, self.optimizer = lr, optimizer

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.log("train_loss", loss, sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.model(**batch).loss, sync_dist=True)

    def configure_optimizers(self):
        if self.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr)
        return torch.optim.AdamW(self.parameters(), lr=self.lr)
