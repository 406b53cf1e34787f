"""The NER LightningModule: a Hugging Face token-classification model, no parallel code at all."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from lightning_mp.tasks.ner.metric import EntityF1


class TokenClassifier(L.LightningModule):
    """Fine-tunes ``AutoModelForTokenClassification``; logs loss and entity-level P/R/F1.

    ``model`` is a local path / hub id of pretrained weights, or a ``transformers.PretrainedConfig``
    for random initialisation (model shapes without weights, tests).
    """

    def __init__(self, model: Any, label_list: list[str], learning_rate: float = 5e-5, weight_decay: float = 0.01,
                 warmup_ratio: float = 0.1, scheme: str = "BIO") -> None:
        super().__init__()
        from transformers import AutoModelForTokenClassification, PretrainedConfig

        self.save_hyperparameters(ignore=["model"])
        self.label_list = list(label_list)
        labels = {"num_labels": len(label_list), "id2label": dict(enumerate(label_list)),
                  "label2id": {label: i for i, label in enumerate(label_list)}}
        if isinstance(model, PretrainedConfig):
            for key, value in labels.items():
                setattr(model, key, value)
            self.model = AutoModelForTokenClassification.from_config(model)
        else:
            self.model = AutoModelForTokenClassification.from_pretrained(str(model), **labels)
        self.model.train()  # from_pretrained returns eval mode: dropout would stay off during fine-tuning
        types = EntityF1.types_from_labels(label_list)
        self.val_f1 = EntityF1(types, scheme)
        self.test_f1 = EntityF1(types, scheme)
        self.test_report = ""

    def forward(self, **batch: torch.Tensor) -> Any:
        return self.model(**batch)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss  # mean over labelled tokens; the strategy weights ranks by token count
        self.log("train_loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def _tags(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[list[list[str]], list[list[str]]]:
        """Predicted and gold tags at first-sub-token positions (labels != -100)."""
        predicted, gold = [], []
        for pred_row, label_row in zip(logits.argmax(-1).tolist(), labels.tolist()):
            keep = [i for i, label in enumerate(label_row) if label != -100]
            predicted.append([self.label_list[pred_row[i]] for i in keep])
            gold.append([self.label_list[label_row[i]] for i in keep])
        return predicted, gold

    def _evaluate(self, batch: dict, metric: EntityF1, prefix: str) -> None:
        output = self.model(**batch)
        self.log(f"{prefix}_loss", output.loss, sync_dist=True, batch_size=len(batch["input_ids"]))
        metric.update(*self._tags(output.logits, batch["labels"]))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, self.val_f1, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, self.test_f1, "test")

    def _log_scores(self, metric: EntityF1, prefix: str) -> None:
        scores = metric.compute()  # syncs counts across ranks
        for name in ("precision", "recall", "f1"):
            self.log(f"{prefix}_{name}", scores[name], prog_bar=name == "f1", sync_dist=True)  # equal on all ranks

    def on_validation_epoch_end(self) -> None:
        self._log_scores(self.val_f1, "val")
        self.val_f1.reset()

    def on_test_epoch_end(self) -> None:
        self._log_scores(self.test_f1, "test")
        self.test_report = self.test_f1.format_report()
        self.test_f1.reset()

    def predict_step(self, batch: dict, batch_idx: int) -> list[list[str]]:
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return self._tags(logits, batch["labels"])[0]

    def configure_optimizers(self) -> Any:
        no_decay = ("bias", "LayerNorm.weight", "LayerNorm.bias")
        groups = [
            {"params": [p for n, p in self.named_parameters() if not n.endswith(no_decay)],
             "weight_decay": self.hparams.weight_decay},
            {"params": [p for n, p in self.named_parameters() if n.endswith(no_decay)], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(groups, lr=self.hparams.learning_rate)
        total = self.trainer.estimated_stepping_batches
        if not total or total == float("inf"):
            return optimizer
        warmup = int(self.hparams.warmup_ratio * total)

        def factor(step: int) -> float:  # linear warmup, then linear decay to 0
            if step < warmup:
                return (step + 1) / max(warmup, 1)
            return max(0.0, (total - step) / max(total - warmup, 1))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
