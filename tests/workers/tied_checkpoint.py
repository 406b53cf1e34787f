"""A tiny Llama with tied input/output embeddings (SGD with momentum: optimizer state per parameter),
trained under one layout by several Trainers in turn, in the same processes: each run may resume from a
checkpoint, and may save a sharded checkpoint, a full one and a Hugging Face export after its last step
(inside the step, as ModelCheckpoint saves: resuming from a checkpoint written after ``fit`` returned
starts a new epoch, so its batches would differ from the uninterrupted run's). Rank 0
writes, per run, the loss of every step, the weights right after loading (both names of the tied weight)
and the final weights.

    python tied_checkpoint.py --out r.pt --devices 2 --layout '{"pipeline_parallel_size": 2}' \
        --runs '[{"steps": 3, "save": "ck", "save_full": "ck.full", "export": "hf"}]'
"""

from __future__ import annotations

import argparse
import json

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from helpers import tiny_hf
from lightning_mp import ModelParallelStrategy
from lightning_mp.checkpoint.export import export_hf_model
from lightning_mp.checkpoint.state import model_state


class TiedLlama(tiny_hf.TinyHFModule):
    def __init__(self) -> None:
        super().__init__("llama", layers=4, lr=0.1, tie_word_embeddings=True)

    def configure_optimizers(self):
        # Momentum: a resumed run is only exact if every copy's optimizer state was restored too.
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class Record(Callback):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}
        self.loaded: dict | None = None

    def on_train_start(self, trainer, pl_module):  # after a checkpoint was restored, before any step
        state = model_state(pl_module, full=True, pipeline_group=trainer.strategy.pipeline_group)
        self.loaded = {key: value.clone() for key, value in state.items()}  # unsharded tensors may be the live ones

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = float(trainer.callback_metrics["train_loss"])


class SaveAfterLastStep(Callback):
    def __init__(self, spec: dict) -> None:
        self.spec = spec

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step < self.spec["steps"]:
            return
        strategy = trainer.strategy
        if self.spec.get("save"):
            trainer.save_checkpoint(self.spec["save"])
        if self.spec.get("save_full"):
            strategy._save_distributed_checkpoint = False  # the same job writes the full form too
            trainer.save_checkpoint(self.spec["save_full"])
            strategy._save_distributed_checkpoint = True
        if self.spec.get("export"):
            export_hf_model(pl_module, "model", self.spec["export"])


def run(spec: dict, devices: int, layout: dict) -> dict:
    L.seed_everything(0, verbose=False)
    strategy = ModelParallelStrategy(**layout)
    model_size = layout.get("tensor_parallel_size", 1) * layout.get("pipeline_parallel_size", 1)
    data_size = layout.get("data_parallel_size", devices // model_size)
    record = Record()
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=spec["steps"], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[record, SaveAfterLastStep(spec)], num_sanity_val_steps=0)
    module = TiedLlama()
    trainer.fit(module, tiny_hf.loader("llama", 16 // data_size), ckpt_path=spec.get("resume"))
    final = model_state(module, full=True, pipeline_group=strategy.pipeline_group)
    return {"losses": record.losses, "loaded": record.loaded, "state_dict": final,
            "is_global_zero": trainer.is_global_zero}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--layout", default="{}", help="JSON kwargs for ModelParallelStrategy")
    parser.add_argument("--runs", required=True, help="JSON list of {steps, resume, save, save_full, export}")
    args = parser.parse_args()
    results, global_zero = [], True
    for spec in json.loads(args.runs):
        result = run(spec, args.devices, json.loads(args.layout))
        global_zero = result.pop("is_global_zero")
        results.append(result)
    if global_zero:
        torch.save(results, args.out)


if __name__ == "__main__":
    main()
