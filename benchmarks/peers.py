"""Our strategy against its peers on the same model, data and layout, in one run.

    python benchmarks/peers.py                      # CPU ranks over gloo; prints a table, writes JSON
    python benchmarks/peers.py --accelerator gpu    # same on GPUs (NCCL)

Peers: Lightning's ModelParallelStrategy with the equivalent hand-written ``configure_model`` (for
dp × tp and pure dp), and DDPStrategy (pure dp, against our fully sharded and our replicated mode).
Reported: median step time relative to ours, and the per-rank bytes of parameters + optimizer state and
peak resident memory. Absolute times on a shared 2-core machine are noise; ratios from the same run are
what to read.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

CASES = [
    # (name, devices, strategy, layout)
    ("dp2xtp2", 4, "lightning_mp", {"data_parallel_size": 2, "tensor_parallel_size": 2}),
    ("dp2xtp2", 4, "lightning", {"data_parallel_size": 2, "tensor_parallel_size": 2}),
    ("dp2", 2, "lightning_mp", {"data_parallel_size": 2}),
    ("dp2", 2, "lightning", {"data_parallel_size": 2, "tensor_parallel_size": 1}),
    ("dp2", 2, "ddp", {}),
    # Our replicated mode is the like-for-like peer of DDP: the same state per rank, no parameter traffic
    # (FSDP2 still copies parameters through its size-1 shard group; see the README's numbers).
    ("dp2-repl", 2, "lightning_mp", {"data_parallel_size": 2, "data_parallel_mode": "replicated"}),
    ("dp2-repl", 2, "ddp", {}),
]


def worker(args: argparse.Namespace) -> None:
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import Callback
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    from torch.utils.data import DataLoader, TensorDataset
    from transformers import BertConfig, BertForTokenClassification

    from lightning_mp.planner.measure import local_state_bytes
    from lightning_mp.processes.launch import destroy_process_group_at_exit

    # Every peer's job ends with a collective (the all_gather_object below); on gloo that can abort the process
    # at interpreter shutdown (see lightning_mp.processes). Our strategy registers this hook itself; the peers
    # get it here so that a run measures them instead of failing after the measurement.
    destroy_process_group_at_exit()

    config = BertConfig(vocab_size=8000, hidden_size=args.hidden, num_hidden_layers=args.layers,
                        num_attention_heads=8, intermediate_size=4 * args.hidden, num_labels=9)
    layout = json.loads(args.layout)

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.model = BertForTokenClassification(config)

        def training_step(self, batch, batch_idx):
            input_ids, labels = batch
            return self.model(input_ids=input_ids, labels=labels).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-4)

    class HandWritten(Module):
        """What a user of Lightning's ModelParallelStrategy writes by hand."""

        def configure_model(self):
            tp, dp = self.device_mesh["tensor_parallel"], self.device_mesh["data_parallel"]
            for layer in self.model.bert.encoder.layer:
                if tp.size() > 1:
                    parallelize_module(layer, tp, {
                        "attention.self.query": ColwiseParallel(), "attention.self.key": ColwiseParallel(),
                        "attention.self.value": ColwiseParallel(), "attention.output.dense": RowwiseParallel(),
                        "intermediate.dense": ColwiseParallel(), "output.dense": RowwiseParallel()})
                fully_shard(layer, mesh=dp)
            fully_shard(self.model, mesh=dp)

    class Timer(Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_batch_start(self, trainer, *_):
            trainer.strategy.barrier()
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, *_):
            trainer.strategy.barrier()
            self.times.append(time.perf_counter() - self.start)

    if args.strategy == "lightning_mp":
        from lightning_mp import ModelParallelStrategy

        strategy, module = ModelParallelStrategy(**layout), Module()
    elif args.strategy == "lightning":
        from lightning.pytorch.strategies import ModelParallelStrategy as LightningModelParallel

        strategy, module = LightningModelParallel(**layout), HandWritten()
    else:
        strategy, module = "ddp", Module()
    data_size = args.devices // layout.get("tensor_parallel_size", 1)
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randint(1, 8000, (args.steps * args.batch, args.seq), generator=generator)
    labels = torch.randint(0, 9, (args.steps * args.batch, args.seq), generator=generator)
    loader = DataLoader(TensorDataset(inputs, labels), batch_size=args.batch // data_size)
    timer = Timer()
    trainer = L.Trainer(accelerator=args.accelerator, devices=args.devices, strategy=strategy, max_steps=args.steps,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[timer])
    trainer.fit(module, loader)
    local = local_state_bytes(module, trainer.optimizers[0])
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    per_rank = [None] * trainer.world_size
    torch.distributed.all_gather_object(per_rank, {**local, "peak_rss": peak_rss})
    if trainer.is_global_zero:
        warm = timer.times[args.warmup:]
        Path(args.out).write_text(json.dumps({"median_step_s": statistics.median(warm), "per_rank": per_rank}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16, help="global batch (sequences)")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--only", nargs="+", metavar="LAYOUT", choices=sorted({case[0] for case in CASES}),
                        help="run only these layouts (default: all)")
    parser.add_argument("--json", default=str(Path(__file__).parent / "results" / "peers.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", help=argparse.SUPPRESS)
    parser.add_argument("--devices", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--layout", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    rows = []
    shared = ["--accelerator", args.accelerator, "--steps", str(args.steps), "--warmup", str(args.warmup),
              "--batch", str(args.batch), "--seq", str(args.seq), "--hidden", str(args.hidden),
              "--layers", str(args.layers)]
    for name, devices, strategy, layout in CASES:
        if args.only and name not in args.only:
            continue
        out = Path(args.json).with_suffix(f".{name}.{strategy}.tmp")
        cmd = [sys.executable, __file__, "--worker", "--strategy", strategy, "--devices", str(devices),
               "--layout", json.dumps(layout), "--out", str(out), *shared]
        subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        measured = json.loads(out.read_text())
        out.unlink()
        per_rank = measured["per_rank"]
        rows.append({
            "layout": name, "strategy": strategy, "devices": devices, "median_step_s": measured["median_step_s"],
            "state_mib_per_rank": max(r["parameters"] + r["optimizer"] for r in per_rank) / 2**20,
            "peak_rss_mib_per_rank": max(r["peak_rss"] for r in per_rank) / 2**20,
        })
    ours = {row["layout"]: row for row in rows if row["strategy"] == "lightning_mp"}
    for row in rows:
        base = ours[row["layout"]]
        row["step_time_vs_ours"] = row["median_step_s"] / base["median_step_s"]
        row["state_vs_ours"] = row["state_mib_per_rank"] / base["state_mib_per_rank"]
    header = f"{'layout':10} {'strategy':13} {'step s':>8} {'÷ ours':>7} {'state MiB/rank':>15} {'÷ ours':>7} {'peak RSS MiB':>13}"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['layout']:10} {row['strategy']:13} {row['median_step_s']:8.3f} {row['step_time_vs_ours']:7.2f}"
              f" {row['state_mib_per_rank']:15.2f} {row['state_vs_ours']:7.2f} {row['peak_rss_mib_per_rank']:13.0f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
