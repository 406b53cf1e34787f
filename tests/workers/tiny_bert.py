"""A tiny HF BERT token classifier and a deterministic dataset, shared by the multi-process tests.

The label mask is random per sequence, so data-parallel shards hold different numbers of labelled
tokens: a mean of per-rank means would differ from the global loss.
"""

from __future__ import annotations

import lightning as L
import torch
from torchmetrics.classification import MulticlassAccuracy
from torch.utils.data import DataLoader, Dataset
from transformers import BertConfig, BertForTokenClassification

VOCAB, SEQ, LABELS = 96, 12, 5


def tiny_config(layers: int = 2, hidden: int = 32, heads: int = 4, intermediate: int = 64) -> BertConfig:
    return BertConfig(
        vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=intermediate, max_position_embeddings=32, num_labels=LABELS,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,  # dropout masks differ by rank layout
    )


class TokenDataset(Dataset):
    def __init__(self, size: int = 64, seed: int = 0, all_labelled: bool = False) -> None:
        g = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(1, VOCAB, (size, SEQ), generator=g)
        self.labels = torch.randint(0, LABELS, (size, SEQ), generator=g)
        keep = torch.rand(size, SEQ, generator=g) < torch.rand(size, 1, generator=g)  # 0%..100% labelled
        keep[:, 0] = True
        keep |= all_labelled
        self.labels[~keep] = -100
        self.attention_mask = torch.ones(size, SEQ, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i], "labels": self.labels[i]}


class TinyBertModule(L.LightningModule):
    """An ordinary LightningModule: no parallel code at all."""

    def __init__(self, layers: int = 2, lr: float = 1e-3) -> None:
        super().__init__()
        torch.manual_seed(1234)
        self.model = BertForTokenClassification(tiny_config(layers))
        self.lr = lr
        self.val_accuracy = MulticlassAccuracy(num_classes=LABELS, average="micro", ignore_index=-100)

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.log("train_loss", loss, sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):
        output = self.model(**batch)
        self.log("val_loss", output.loss, sync_dist=True)
        self.val_accuracy.update(output.logits.argmax(-1), batch["labels"])
        self.log("val_accuracy", self.val_accuracy)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def loader(batch_size: int, size: int = 64, single_process: bool = False, all_labelled: bool = False) -> DataLoader:
    """Under a distributed strategy Lightning swaps in DistributedSampler(shuffle=True, seed=0), whose
    global batch k is ``randperm(size)[k*B:(k+1)*B]``; the single-process reference reads the same order."""
    dataset = TokenDataset(size, all_labelled=all_labelled)
    if single_process:
        order = torch.randperm(size, generator=torch.Generator().manual_seed(0)).tolist()
        return DataLoader(dataset, batch_size=batch_size, sampler=order)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)
