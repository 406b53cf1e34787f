"""The causal-LM LightningModule and the model/tokenizer sources of the recipe. No parallel code: the
strategy shards ``self.model``, weights the per-rank losses by their (shifted) reply tokens and averages
logged values the same way."""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torchmetrics import MeanMetric

from lightning_mp.checkpoint.pretrained import from_pretrained, is_meta, materialize
from lightning_mp.parallel.token_weighting import labelled_tokens


def prepare_gguf(gguf: Path, target: Path) -> Path:
    """A Hugging Face directory (safetensors, config, tokenizer) made once from a GGUF file.

    transformers de-quantises a GGUF file to fp32 on every load and builds its tokenizer from the GGUF
    vocabulary, which takes minutes on a small CPU; the converted directory loads in seconds and is what
    every rank and every later run read. Written aside and renamed into place, so an interrupted or
    concurrent conversion never leaves a half-written directory where it is read.
    """
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(staging)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are de-quantised, but the model still carries the GGUF quantizer, which refuses to be
        # saved: copy the weights into a plain model of the same config.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(loaded.state_dict())
        plain.save_pretrained(staging)
        staging.rename(target)
    except OSError:
        if not (target / "config.json").is_file():  # not a concurrent conversion that finished first
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


class CausalLM(L.LightningModule):
    """Fine-tunes ``AutoModelForCausalLM``; logs ``train_loss``, ``val_loss`` and ``val_perplexity``.

    ``model_name_or_path``: a local Hugging Face directory (built on the meta device, each rank's shards loaded
    by the strategy: ``lightning_mp.from_pretrained``), a hub id (online; loaded whole on every rank), or a
    ``PretrainedConfig``/its dict for a randomly initialised model of that shape (tests, planning). The loss is
    Hugging Face's: mean cross entropy over the reply tokens (labels are shifted inside the model).
    """

    def __init__(self, model_name_or_path: Any, learning_rate: float = 1e-4, weight_decay: float = 0.0,
                 warmup_ratio: float = 0.1) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

        if isinstance(model_name_or_path, dict):  # a config saved in a checkpoint's hyperparameters
            model_name_or_path = AutoConfig.for_model(**model_name_or_path)
        if isinstance(model_name_or_path, PretrainedConfig):
            self.model = AutoModelForCausalLM.from_config(model_name_or_path)
            source: Any = model_name_or_path.to_dict()
        elif Path(model_name_or_path).is_dir():
            # Built on the meta device; the strategy loads each rank's shards only (lightning_mp.from_pretrained).
            source = str(model_name_or_path)
            self.model = from_pretrained(AutoModelForCausalLM, source, dtype=torch.float32)
        else:  # a hub id (online): transformers downloads and loads it whole
            source = str(model_name_or_path)
            self.model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        self.model.train()
        self.val_nll = MeanMetric()
        self.save_hyperparameters({"model_name_or_path": source, "learning_rate": learning_rate,
                                   "weight_decay": weight_decay, "warmup_ratio": warmup_ratio})

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # load_from_checkpoint rebuilds the module (a meta model) and then copies the checkpoint's weights into
        # it, which on meta tensors would silently do nothing: give the model real tensors first. Under the
        # strategy the model is already loaded when a checkpoint is restored, and this does nothing.
        if is_meta(self.model):
            materialize(self.model)
        # A tied weight is stored once (lightning_mp/checkpoint/tied.py); a plain load_from_checkpoint (the
        # generation script) loads strictly and wants the lm_head name too.
        from lightning_mp.checkpoint.tied import add_tied_copies

        if "state_dict" in checkpoint:
            add_tied_copies(self, checkpoint["state_dict"])

    def forward(self, **batch: torch.Tensor) -> Any:
        return self.model(**batch)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self(**batch).loss
        self.log("train_loss", loss, prog_bar=True, sync_dist=True, batch_size=batch["input_ids"].size(0))
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss = self(**batch).loss
        self.log("val_loss", loss, prog_bar=True, sync_dist=True, batch_size=batch["input_ids"].size(0))
        # Perplexity is exp of the mean over every held-out reply token, so each batch's mean loss is
        # weighted by its predicted tokens (labels shift inside the model: position 0 predicts nothing).
        # A batch without reply tokens has a NaN mean (0/0) and weight 0: it must add nothing.
        tokens = labelled_tokens(batch["labels"], -100, shifted=True)
        self.val_nll.update(torch.nan_to_num(loss.detach().float()), weight=tokens)

    def on_validation_epoch_end(self) -> None:
        # compute() already holds every data-parallel rank's sum; sync_dist only averages equal values.
        self.log("val_perplexity", torch.exp(self.val_nll.compute()), sync_dist=True)
        self.val_nll.reset()

    def configure_optimizers(self) -> Any:
        """AdamW (no weight decay on < 2-D parameters: norms), linear warmup then cosine decay to 10%."""
        decay = [p for p in self.model.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.requires_grad and p.ndim < 2]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": self.hparams.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=self.hparams.learning_rate)
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else float("inf")
        if not total or total == float("inf"):
            return optimizer
        total, warmup = int(total), int(self.hparams.warmup_ratio * int(total))

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(total - warmup, 1))
            return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
