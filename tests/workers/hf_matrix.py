"""Train several tiny Hugging Face families in turn under one layout, in the same processes: one Trainer
per family, 3 steps each; rank 0 writes ``{family: {"losses", "state_dict"}}``.

One multi-process launch per layout instead of one per (family, layout): starting the ranks (imports,
process group) costs as much as training a tiny model, and the suite runs on 2 cores. The single-process
reference is the same script with ``--strategy none``.

    python hf_matrix.py --out r.pt --devices 2 --layout '{"tensor_parallel_size": 2}' --families llama,gpt2
"""

from __future__ import annotations

import argparse
import json
import sys

import lightning as L
import torch
from train import RecordLoss

from helpers import tiny_hf


def train_one(family: str, args: argparse.Namespace, layout: dict) -> dict:
    L.seed_everything(0, verbose=False)
    single = args.strategy == "none"
    if single:
        strategy, data_size = "auto", 1
    else:
        from lightning_mp import ModelParallelStrategy

        strategy = ModelParallelStrategy(**layout)
        model_size = layout.get("tensor_parallel_size", 1) * layout.get("pipeline_parallel_size", 1)
        data_size = layout.get("data_parallel_size", args.devices // model_size)
    recorder = RecordLoss()
    trainer = L.Trainer(accelerator="cpu", devices=args.devices, strategy=strategy, max_steps=args.steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[recorder], num_sanity_val_steps=0)
    module = tiny_hf.TinyHFModule(family, layers=args.layers, optimizer=args.optimizer, lr=args.lr)
    trainer.fit(module, tiny_hf.loader(family, args.batch_size // data_size, single_process=single,
                                       fixed_width=args.fixed_width))
    if single:
        state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    else:
        from lightning_mp.checkpoint.state import model_state

        state = model_state(module, full=True, pipeline_group=trainer.strategy.pipeline_group)
    return {"losses": recorder.losses, "state_dict": state, "is_global_zero": trainer.is_global_zero}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--strategy", default="lightning_mp", choices=["lightning_mp", "none"])
    parser.add_argument("--layout", default="{}", help="JSON kwargs for ModelParallelStrategy")
    parser.add_argument("--families", required=True, help="comma-separated names of tiny_hf.FAMILIES")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16, help="global batch size")
    parser.add_argument("--optimizer", default="sgd", choices=["adamw", "sgd"])
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--fixed-width", action="store_true", help="pad every batch to full length")
    args = parser.parse_args()
    layout = json.loads(args.layout)
    results, global_zero = {}, True
    for family in args.families.split(","):
        print(f"[hf_matrix] {family}", file=sys.stderr, flush=True)  # which family a failure belongs to
        result = train_one(family, args, layout)
        global_zero = result.pop("is_global_zero")
        results[family] = result
    if global_zero:
        torch.save(results, args.out)


if __name__ == "__main__":
    main()
