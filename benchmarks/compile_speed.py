"""Compiled blocks against eager ones: ModelParallelStrategy(compile=True) vs compile=False, same layout, same run.

    python benchmarks/compile_speed.py                    # CPU ranks over gloo; prints a table, writes JSON
    python benchmarks/compile_speed.py --accelerator gpu  # same on GPUs (NCCL)
    python benchmarks/compile_speed.py --only 1dev pp2

The model, data and settings are those of benchmarks/peers.py (BERT token classifier, hidden 256, 4 layers, global
batch 16 × 64 tokens, AdamW), so the eager rows are comparable with its "ours" rows. (peers.py
builds its module and timer inside its worker function, so they are rebuilt here rather than imported.) Reported per layout:
the median step time after warm-up, compiled ÷ eager, the first step (where compile happens) and how many graphs
dynamo captured. Absolute times on a shared machine are noise; the ratios from one run are what to read.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

LAYOUTS = {
    # name: (devices, strategy arguments)
    "1dev": (1, {}),
    "dp2": (2, {"data_parallel_size": 2}),
    # tp2 is not here: compile=True with tensor parallelism is refused (torch 2.13, pytorch#152954; see
    # lightning_mp/parallel/compile.py).
    "pp2": (2, {"pipeline_parallel_size": 2, "data_parallel_size": 1}),
}


def worker(args: argparse.Namespace) -> None:
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import Callback
    from torch.utils.data import DataLoader, TensorDataset
    from transformers import BertConfig, BertForTokenClassification

    from lightning_mp import ModelParallelStrategy
    from lightning_mp.parallel.compile import compile_counts

    config = BertConfig(vocab_size=8000, hidden_size=args.hidden, num_hidden_layers=args.layers,
                        num_attention_heads=8, intermediate_size=4 * args.hidden, num_labels=9)
    layout = json.loads(args.layout)

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.model = BertForTokenClassification(config)

        def training_step(self, batch, batch_idx):
            # A dict of model inputs: what a pipeline needs (peers.py's (inputs, labels) pairs cannot be pipelined).
            loss = self.model(**batch).loss
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-4)

    class Timer(Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.graphs: list[int] = []

        def on_train_batch_start(self, trainer, *_):
            trainer.strategy.barrier()
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, *_):
            trainer.strategy.barrier()
            self.times.append(time.perf_counter() - self.start)
            self.graphs.append(compile_counts()["graphs"])

    data_size = args.devices // (layout.get("tensor_parallel_size", 1) * layout.get("pipeline_parallel_size", 1))
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randint(1, 8000, (args.steps * args.batch, args.seq), generator=generator)
    labels = torch.randint(0, 9, (args.steps * args.batch, args.seq), generator=generator)
    loader = DataLoader(TensorDataset(inputs, labels), batch_size=args.batch // data_size,
                        collate_fn=lambda rows: {"input_ids": torch.stack([r[0] for r in rows]),
                                                 "labels": torch.stack([r[1] for r in rows])})
    timer = Timer()
    trainer = L.Trainer(accelerator=args.accelerator, devices=args.devices, strategy=ModelParallelStrategy(**layout),
                        max_steps=args.steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[timer])
    trainer.fit(Module(), loader)
    if trainer.is_global_zero:
        warm = timer.times[args.warmup:]
        Path(args.out).write_text(json.dumps({
            "median_step_s": statistics.median(warm), "first_step_s": timer.times[0], "step_s": timer.times,
            "graphs_after_step": timer.graphs, "loss": float(trainer.callback_metrics["train_loss"]),
        }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the median (compile is in step 1)")
    parser.add_argument("--batch", type=int, default=16, help="global batch (sequences)")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--only", nargs="+", metavar="LAYOUT", choices=list(LAYOUTS), help="default: all layouts")
    parser.add_argument("--json", default=str(Path(__file__).parent / "results" / "compile_speed.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--devices", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--layout", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    shared = ["--accelerator", args.accelerator, "--steps", str(args.steps), "--warmup", str(args.warmup),
              "--batch", str(args.batch), "--seq", str(args.seq), "--hidden", str(args.hidden),
              "--layers", str(args.layers)]
    rows = []
    for name, (devices, layout) in LAYOUTS.items():
        if args.only and name not in args.only:
            continue
        measured = {}
        for compiled in (False, True):
            out = Path(args.json).with_suffix(f".{name}.{compiled}.tmp")
            cmd = [sys.executable, __file__, "--worker", "--devices", str(devices), "--out", str(out),
                   "--layout", json.dumps({**layout, "compile": compiled}), *shared]
            started = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            if proc.returncode != 0:
                raise RuntimeError(f"{name} compile={compiled} failed:\n{proc.stderr[-4000:]}")
            measured[compiled] = {**json.loads(out.read_text()), "job_s": time.perf_counter() - started}
            out.unlink()
        eager, comp = measured[False], measured[True]
        rows.append({
            "layout": name, "devices": devices,
            "eager_step_s": eager["median_step_s"], "compiled_step_s": comp["median_step_s"],
            "compiled_vs_eager": comp["median_step_s"] / eager["median_step_s"],
            "eager_first_step_s": eager["first_step_s"], "compiled_first_step_s": comp["first_step_s"],
            "graphs_rank0": comp["graphs_after_step"], "loss_eager": eager["loss"], "loss_compiled": comp["loss"],
            "job_s": {"eager": eager["job_s"], "compiled": comp["job_s"]},
        })
        row = rows[-1]
        print(f"{name}: compiled ÷ eager {row['compiled_vs_eager']:.2f}, first step {row['compiled_first_step_s']:.0f} s",
              flush=True)
        # Written after every layout: a compile can take many minutes, and an interrupted run keeps what it measured.
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=2))
    header = (f"{'layout':7} {'eager s':>8} {'compiled s':>11} {'÷ eager':>8} {'1st step eager':>15}"
              f" {'1st step compiled':>18} {'graphs':>7}")
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['layout']:7} {row['eager_step_s']:8.3f} {row['compiled_step_s']:11.3f} {row['compiled_vs_eager']:8.2f}"
              f" {row['eager_first_step_s']:15.2f} {row['compiled_first_step_s']:18.1f} {row['graphs_rank0'][-1]:7d}")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
