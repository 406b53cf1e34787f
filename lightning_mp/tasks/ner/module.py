"""The NER LightningModule: a Hugging Face token-classification model. No parallel code at all: the
strategy shards ``self.model`` and weights the per-rank losses; metric counts sync through torchmetrics."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch

from lightning_mp.checkpoint.pretrained import from_pretrained, is_meta, materialize
from lightning_mp.tasks.ner.metric import EntityF1


class TokenClassifier(L.LightningModule):
    """Fine-tunes ``AutoModelForTokenClassification`` and logs loss and entity-level P/R/F1.

    ``model_name_or_path``: a local directory of pretrained weights, built on the meta device and loaded shard by
    shard by the strategy (a hub id works only when online, and is loaded whole on every rank), or a
    ``transformers.PretrainedConfig`` (or its ``to_dict()``) for a randomly initialised model of that shape.
    ``label_list``: tag strings, index = class id (e.g. ``NERDataModule.label_list``, "O" first).

    Logged: ``train_loss``; ``val_loss``/``test_loss``; ``val_f1``/``val_precision``/``val_recall`` and
    ``test_*`` at epoch end (micro, strict entity match). ``test_report`` keeps the last per-type table.
    """

    def __init__(self, model_name_or_path: Any, label_list: Sequence[str], learning_rate: float = 5e-5,
                 weight_decay: float = 0.01, warmup_ratio: float = 0.1, scheme: str = "BIO") -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModelForTokenClassification, PretrainedConfig

        self.label_list = list(label_list)
        labels = {"num_labels": len(self.label_list), "id2label": dict(enumerate(self.label_list)),
                  "label2id": {label: i for i, label in enumerate(self.label_list)}}
        if isinstance(model_name_or_path, dict):  # a config saved in the hyperparameters of a checkpoint
            model_name_or_path = AutoConfig.for_model(**model_name_or_path)
        if isinstance(model_name_or_path, PretrainedConfig):
            config = copy.deepcopy(model_name_or_path)  # never change the caller's config
            for key, value in labels.items():  # num_labels first: its setter resets id2label
                setattr(config, key, value)
            self.model = AutoModelForTokenClassification.from_config(config)
            source: Any = config.to_dict()
        elif Path(model_name_or_path).is_dir():
            # Built on the meta device; the strategy loads each rank's shards only (lightning_mp.from_pretrained).
            source = str(model_name_or_path)
            self.model = from_pretrained(AutoModelForTokenClassification, source, **labels)
        else:  # a hub id (online): transformers downloads and loads it whole
            source = str(model_name_or_path)
            self.model = AutoModelForTokenClassification.from_pretrained(source, **labels)
        self.model.train()  # from_pretrained returns eval mode; dropout must be on for fine-tuning
        # Plain, picklable hyperparameters, so load_from_checkpoint can rebuild the module without arguments.
        self.save_hyperparameters({"model_name_or_path": source, "label_list": self.label_list,
                                   "learning_rate": learning_rate, "weight_decay": weight_decay,
                                   "warmup_ratio": warmup_ratio, "scheme": scheme})
        self.val_f1 = EntityF1.from_labels(self.label_list, scheme)
        self.test_f1 = EntityF1.from_labels(self.label_list, scheme)
        self.test_report = ""

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # load_from_checkpoint rebuilds the module (a meta model) and then copies the checkpoint's weights into
        # it, which on meta tensors would silently do nothing: give the model real tensors first. Under the
        # strategy the model is already loaded when a checkpoint is restored, and this does nothing.
        if is_meta(self.model):
            materialize(self.model)

    def forward(self, **batch: torch.Tensor) -> Any:
        return self.model(**batch)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        # Hugging Face's loss: cross-entropy averaged over the labelled tokens (labels != -100) of this batch.
        loss = self(**batch).loss
        self.log("train_loss", loss, prog_bar=True, sync_dist=True, batch_size=batch["input_ids"].size(0))
        return loss

    def tags(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[list[list[str]], list[list[str]]]:
        """Predicted and gold tag strings per sentence, at first-sub-token positions (labels != -100)."""
        keep = labels != -100
        predicted, gold = [], []
        for pred_row, label_row, keep_row in zip(logits.argmax(-1).tolist(), labels.tolist(), keep.tolist()):
            predicted.append([self.label_list[p] for p, k in zip(pred_row, keep_row) if k])
            gold.append([self.label_list[g] for g, k in zip(label_row, keep_row) if k])
        return predicted, gold

    def _evaluate(self, batch: dict[str, torch.Tensor], metric: EntityF1, prefix: str) -> None:
        output = self(**batch)
        self.log(f"{prefix}_loss", output.loss, sync_dist=True, batch_size=batch["input_ids"].size(0))
        metric.update(*self.tags(output.logits, batch["labels"]))

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.val_f1, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.test_f1, "test")

    def _log_scores(self, metric: EntityF1, prefix: str) -> None:
        scores = metric.compute()  # sums the counts over ranks, so every rank holds the global scores
        for name in ("precision", "recall", "f1"):
            self.log(f"{prefix}_{name}", scores[name], prog_bar=name == "f1", sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self._log_scores(self.val_f1, "val")
        self.val_f1.reset()

    def on_test_epoch_end(self) -> None:
        self._log_scores(self.test_f1, "test")
        self.test_report = self.test_f1.format_report()
        self.test_f1.reset()

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> list[list[str]]:
        """Predicted tags per sentence, one per word that survived truncation. Word starts are the positions
        with ``labels != -100`` (``encode_sentence`` always sets them; for unlabelled text use "O" tags)."""
        logits = self(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return self.tags(logits, batch["labels"])[0]

    def configure_optimizers(self) -> Any:
        """AdamW without weight decay on biases and norm weights (every parameter of < 2 dims, which
        covers BERT's LayerNorm); linear warmup over ``warmup_ratio`` of the steps, then linear decay to 0,
        stepped per optimizer step, when the trainer knows the number of steps."""
        decay, no_decay = [], []
        for _, parameter in self.model.named_parameters():
            if parameter.requires_grad:
                (no_decay if parameter.ndim < 2 else decay).append(parameter)
        groups = [{"params": decay, "weight_decay": self.hparams.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups, lr=self.hparams.learning_rate)
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else float("inf")
        if not total or total == float("inf"):
            return optimizer
        total = int(total)
        warmup = int(self.hparams.warmup_ratio * total)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return max(0.0, (total - step) / max(total - warmup, 1))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
