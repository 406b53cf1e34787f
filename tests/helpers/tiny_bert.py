"""A tiny HF BERT token classifier and a deterministic dataset, shared by the multi-process tests.

The label mask is random per sequence, so data-parallel shards hold different numbers of labelled
tokens: a mean of per-rank means would differ from the global loss.

``variable_width=True`` gives rows of different lengths, each batch padded to its own longest row (as
the NER collator does), arranged so that under 2 data-parallel ranks rank 0's batches are always full
width while rank 1's width changes from step to step: one peer changes shape, the other does not.
"""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset
from torchmetrics.classification import MulticlassAccuracy
from transformers import BertConfig, BertForTokenClassification

VOCAB, SEQ, LABELS = 96, 12, 5


def tiny_config(layers: int = 2, hidden: int = 32, heads: int = 4, intermediate: int = 64) -> BertConfig:
    return BertConfig(
        vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=intermediate, max_position_embeddings=32, num_labels=LABELS,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,  # dropout masks differ by rank layout
    )


# Widest row of data-parallel rank 1's batch at each step (rank 0's is always SEQ).
RANK1_WIDTHS = (SEQ, 7, 10, 5)


def variable_widths(order: list[int], local_batch: int, seed: int = 1) -> list[int]:
    """Length of every row, for rows read in ``order`` by 2 data-parallel ranks taking every other row
    (DistributedSampler) in local batches of ``local_batch``: each rank-0 batch holds a row of length
    SEQ, rank 1's batch at step k is as wide as ``RANK1_WIDTHS[k % 4]``."""
    g = torch.Generator().manual_seed(seed)
    widths = [SEQ] * len(order)
    for position, row in enumerate(order):
        rank, index = position % 2, position // 2
        step, within = divmod(index, local_batch)
        widest = SEQ if rank == 0 else RANK1_WIDTHS[step % len(RANK1_WIDTHS)]
        widths[row] = widest if within == 0 else int(torch.randint(2, widest + 1, (), generator=g))
    return widths


def pad_to_longest(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack a batch and cut it to its longest row (attention mask), as a collator padding per batch does."""
    batch = {key: torch.stack([row[key] for row in rows]) for key in rows[0]}
    width = int(batch["attention_mask"].sum(1).max())
    return {key: value[:, :width].contiguous() for key, value in batch.items()}


class TokenDataset(Dataset):
    def __init__(self, size: int = 64, seed: int = 0, all_labelled: bool = False,
                 widths: list[int] | None = None) -> None:
        g = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(1, VOCAB, (size, SEQ), generator=g)
        self.labels = torch.randint(0, LABELS, (size, SEQ), generator=g)
        keep = torch.rand(size, SEQ, generator=g) < torch.rand(size, 1, generator=g)  # 0%..100% labelled
        keep[:, 0] = True
        keep |= all_labelled
        self.labels[~keep] = -100
        self.attention_mask = torch.ones(size, SEQ, dtype=torch.long)
        if widths is not None:  # padding: id 0, attention 0, label ignored
            padding = torch.arange(SEQ) >= torch.tensor(widths)[:, None]
            self.input_ids[padding] = 0
            self.attention_mask[padding] = 0
            self.labels[padding] = -100

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
        # A count over the batch: one process logs the global batch's; every layout must log the same.
        self.log("labelled_tokens", (batch["labels"] != -100).sum().float(), reduce_fx="sum", sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):
        output = self.model(**batch)
        self.log("val_loss", output.loss, sync_dist=True)
        self.val_accuracy.update(output.logits.argmax(-1), batch["labels"])
        self.log("val_accuracy", self.val_accuracy)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def loader(batch_size: int, size: int = 64, single_process: bool = False, all_labelled: bool = False,
           variable_width: bool = False, shuffled: bool = True, global_batch_size: int = 16) -> DataLoader:
    """Under a distributed strategy Lightning swaps in DistributedSampler(shuffle=True, seed=0), whose
    global batch k is ``randperm(size)[k*B:(k+1)*B]``; the single-process reference reads the same order.
    ``shuffled=False``: the order of an evaluation loader (DistributedSampler(shuffle=False))."""
    order = torch.randperm(size, generator=torch.Generator().manual_seed(0)).tolist() if shuffled else list(range(size))
    widths = variable_widths(order, global_batch_size // 2) if variable_width else None
    dataset = TokenDataset(size, all_labelled=all_labelled, widths=widths)
    collate = pad_to_longest if variable_width else None
    if single_process:
        return DataLoader(dataset, batch_size=batch_size, sampler=order, collate_fn=collate)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
