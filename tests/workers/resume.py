"""Train the tiny BERT (with an LR schedule) under one layout, optionally resuming from a checkpoint
written by another layout; rank 0 writes losses, the batch each step saw, the LR and full weights.

The reference is an uninterrupted run of the same script (any layout: they are numerically equal, and
every layout reads the same global batches, in DistributedSampler order).

    python resume.py --out r.pt --devices 4 --layout '{"tensor_parallel_size": 2}' --steps 3 --every-step ck
    python resume.py --out r.pt --devices 2 --layout '{"pipeline_parallel_size": 2}' --steps 5 --resume ck/last.ckpt

``--kill-after N`` SIGKILLs the whole job (every rank) right after the checkpoint of step N was written,
like a node failure; ``--every-step DIR`` keeps a ``last.ckpt`` there after every optimizer step.
"""

from __future__ import annotations

import argparse
import json
import os
import signal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from helpers.tiny_bert import TinyBertModule, loader
from lightning_mp import ModelParallelStrategy
from lightning_mp.checkpoint.state import model_state


class ScheduledTinyBert(TinyBertModule):
    """AdamW with an LR that halves every step: a resumed run is only exact if the schedule resumes too."""

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class RecordLoss(Callback):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}
        self.first_ids: dict[int, list[int]] = {}  # which batch each step saw (rank 0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = float(trainer.callback_metrics["train_loss"])
        self.first_ids[trainer.global_step] = batch["input_ids"][0, :4].tolist()


class KillAfter(Callback):
    """The whole job (its process group) is killed at the start of step N + 1: step N's checkpoint was written
    at the end of step N (Lightning runs checkpoint callbacks after all others)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.strategy.barrier()
            os.killpg(0, signal.SIGKILL)


class KeepWeightsAt(Callback):
    """The full weights right after optimizer step N: what a run of N steps ends with, without a run of its own."""

    def __init__(self, step: int) -> None:
        self.step, self.state_dict = step, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            full = model_state(pl_module, full=True, pipeline_group=trainer.strategy.pipeline_group)
            self.state_dict = {k: v.detach().clone() for k, v in full.items()}  # not the live weights


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--layout", default="{}")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--resume", help="ckpt_path for trainer.fit")
    parser.add_argument("--every-step", help="ModelCheckpoint(dirpath=DIR, every_n_train_steps=1, save_last=True)")
    parser.add_argument("--kill-after", type=int)
    parser.add_argument("--full", action="store_true", help="save_distributed_checkpoint=False (one full file)")
    parser.add_argument("--weights-at", type=int, help="also write the full weights after this step (weights_at)")
    args = parser.parse_args()

    L.seed_everything(0, verbose=False)
    layout = json.loads(args.layout)
    strategy = ModelParallelStrategy(**layout, save_distributed_checkpoint=not args.full)
    model_size = layout.get("tensor_parallel_size", 1) * layout.get("pipeline_parallel_size", 1)
    data_size = layout.get("data_parallel_size", args.devices // model_size)
    recorder = RecordLoss()
    callbacks: list = [recorder]
    if args.every_step:
        callbacks.append(ModelCheckpoint(dirpath=args.every_step, every_n_train_steps=1, save_last=True,
                                         save_top_k=0))
    if args.kill_after is not None:
        callbacks.append(KillAfter(args.kill_after))
    keep_weights = KeepWeightsAt(args.weights_at) if args.weights_at is not None else None
    if keep_weights is not None:
        callbacks.append(keep_weights)
    trainer = L.Trainer(
        accelerator="cpu", devices=args.devices, strategy=strategy, max_steps=args.steps, logger=False,
        enable_checkpointing=bool(args.every_step), enable_progress_bar=False, enable_model_summary=False,
        callbacks=callbacks, num_sanity_val_steps=0,
    )
    module = ScheduledTinyBert(layers=args.layers)
    trainer.fit(module, loader(16 // data_size), ckpt_path=args.resume)
    result = {"losses": recorder.losses, "first_ids": recorder.first_ids,
              "lr": trainer.optimizers[0].param_groups[0]["lr"]}
    result["state_dict"] = model_state(module, full=True, pipeline_group=trainer.strategy.pipeline_group)
    if keep_weights is not None:
        result["weights_at"] = keep_weights.state_dict
    if trainer.is_global_zero:
        torch.save(result, args.out)


if __name__ == "__main__":
    main()
