"""Callbacks a user of the recipes expects."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import lightning as L


class TokensPerSecond(L.Callback):
    """Shows global training throughput (non-padding tokens per second) in the progress bar and logs."""

    def __init__(self, mask_key: str = "attention_mask") -> None:
        self.mask_key = mask_key
        self._start = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not isinstance(batch, Mapping) or self.mask_key not in batch:
            return
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        local_tokens = batch[self.mask_key].sum().float()
        # Summed over data-parallel ranks only: tensor/pipeline peers see the same tokens.
        data_size = trainer.strategy.distributed_sampler_kwargs["num_replicas"] if trainer.world_size > 1 else 1
        pl_module.log("tokens_per_s", local_tokens * data_size / elapsed, prog_bar=True, on_step=True,
                      on_epoch=False, sync_dist=False, batch_size=1)
