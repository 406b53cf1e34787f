"""trainer.validate, then trainer.fit and a full checkpoint, under pipeline × data parallelism (tiny Llama).

A forward-only pipeline step used to leave FSDP units gathered: configure_optimizers after validate took
the gathered (temporary) parameters, so those weights never trained and saving the optimizer failed.
Rank 0 writes, for every rank, how many optimizer parameters are not the module's, and the saved keys.
"""

from __future__ import annotations

import json
import os
import sys

import lightning as L
import torch

from helpers import tiny_hf
from lightning_mp import ModelParallelStrategy


def main(out: str) -> None:
    L.seed_everything(0, verbose=False)
    strategy = ModelParallelStrategy(pipeline_parallel_size=2, data_parallel_size=2, microbatches=2,
                                     save_distributed_checkpoint=False)
    trainer = L.Trainer(accelerator="cpu", devices=4, strategy=strategy, max_steps=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)
    module = tiny_hf.TinyHFModule("llama", layers=2, optimizer="adamw", lr=1e-2)
    trainer.validate(module, tiny_hf.loader("llama", 8, fixed_width=True), verbose=False)
    trainer.fit(module, tiny_hf.loader("llama", 8, fixed_width=True))
    trainer.validate(module, tiny_hf.loader("llama", 8, fixed_width=True), verbose=False)
    own = {id(p) for p in module.parameters()}
    foreign = sum(id(p) not in own for group in trainer.optimizers[0].param_groups for p in group["params"])
    counts = [None] * trainer.world_size
    torch.distributed.all_gather_object(counts, foreign)
    path = os.path.join(os.path.dirname(out), "after-validation.ckpt")
    trainer.save_checkpoint(path)  # every rank; rank 0 writes the full file
    if trainer.is_global_zero:
        saved = torch.load(path, weights_only=False)
        json.dump({"foreign_optimizer_parameters": counts, "saved_entries": len(saved["state_dict"]),
                   "optimizer_entries": sum(k.startswith("state.") for k in saved["optimizer_states"][0])},
                  open(out, "w"))


if __name__ == "__main__":
    main(sys.argv[1])
