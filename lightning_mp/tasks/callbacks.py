"""Callbacks a user of the recipes expects."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Optional

import lightning as L
import torch


class TokensPerSecond(L.Callback):
    """Shows global training throughput (non-padding tokens per second) in the progress bar and logs.

    On CUDA the host returns from a step long before the device has finished it, so host time measures
    kernel launches, not work. There the step is timed with CUDA events recorded on the current stream
    around it, and read one step later (when the events are long done), so timing adds no host-device
    synchronization to the step: the value logged at step k is the throughput of step k - 1. Elsewhere
    (CPU) the host clock is the device clock.
    """

    def __init__(self, mask_key: str = "attention_mask") -> None:
        self.mask_key = mask_key
        self._start = 0.0
        self._events: Optional[tuple[Any, Any]] = None
        self._pending: Optional[tuple[Any, Any, torch.Tensor]] = None  # the last CUDA step: events and tokens

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if pl_module.device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self._events = (start, torch.cuda.Event(enable_timing=True))
        else:
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not isinstance(batch, Mapping) or self.mask_key not in batch:
            return
        # Summed over data-parallel ranks only: tensor/pipeline peers see the same tokens.
        data_size = trainer.strategy.distributed_sampler_kwargs["num_replicas"] if trainer.world_size > 1 else 1
        tokens = batch[self.mask_key].sum().float() * data_size
        if self._events is None:
            elapsed = max(time.perf_counter() - self._start, 1e-9)
            self._log(pl_module, tokens / elapsed)
            return
        start, end = self._events
        end.record()
        previous, self._pending = self._pending, (start, end, tokens)
        if previous is not None:
            start, end, tokens = previous
            end.synchronize()  # recorded a whole step ago: done by now, so this does not stall the device
            self._log(pl_module, tokens / max(start.elapsed_time(end) / 1000.0, 1e-9))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pending = None  # a step of the next epoch is not compared with this one's

    @staticmethod
    def _log(pl_module: L.LightningModule, value: torch.Tensor) -> None:
        pl_module.log("tokens_per_s", value, prog_bar=True, on_step=True, on_epoch=False, sync_dist=False,
                      batch_size=1)
