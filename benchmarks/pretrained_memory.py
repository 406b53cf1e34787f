"""Peak host memory per rank while loading a pretrained checkpoint and exporting it, 4 ranks.

Writes once a random BERT checkpoint of >= 1 GB (fp32, ``save_pretrained`` layout), then runs 4-rank jobs:
``lightning_mp.from_pretrained`` (meta + each rank reads its shards) under dp4, dp2×tp2 and pp2×dp2,
against the class's own ``from_pretrained`` on every rank (what a LightningModule does without it), and
torch's stock ``HuggingFaceStorageReader`` (file kept open while reading) for dp4. Export: our sharded
export against gathering the full state dict on rank 0 and ``save_pretrained`` (the previous export).

Peak resident memory (VmHWM, which counts touched pages of memory-mapped files too) is reset before each
phase; the baseline is the process after imports and the Trainer, before the model exists.

    python benchmarks/pretrained_memory.py               # table + benchmarks/results/pretrained_memory.{json,md}
    python benchmarks/pretrained_memory.py --table-only  # the table of the last run again
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MIB = 2**20

CASES = {  # name: (layout, loader, exporter)
    "dp4 plain from_pretrained": ({"data_parallel_size": 4}, "plain", "gather"),
    "dp4": ({"data_parallel_size": 4}, "sharded", "sharded"),
    "dp4 torch reader": ({"data_parallel_size": 4}, "torch-reader", None),
    "dp2×tp2": ({"data_parallel_size": 2, "tensor_parallel_size": 2}, "sharded", "sharded"),
    "pp2×dp2": ({"data_parallel_size": 2, "pipeline_parallel_size": 2}, "sharded", "sharded"),
}


def bert_config():
    from transformers import BertConfig

    # 283M parameters: 1.13 GB in fp32. 16 heads and an FFN of 4096 divide by 2; 20 blocks split in 2 stages.
    return BertConfig(vocab_size=30522, hidden_size=1024, num_hidden_layers=20, num_attention_heads=16,
                      intermediate_size=4096, max_position_embeddings=512, num_labels=9)


def write_checkpoint(directory: Path) -> int:
    """Random weights, one tensor at a time into one model.safetensors (never the whole model twice)."""
    import torch
    from safetensors.torch import save_file
    from transformers import BertForTokenClassification

    if not (directory / "model.safetensors").exists():
        directory.mkdir(parents=True, exist_ok=True)
        config = bert_config()
        with torch.device("meta"):
            model = BertForTokenClassification(config)
        g = torch.Generator().manual_seed(0)
        tensors = {name: torch.randn(t.shape, generator=g) * 0.02 for name, t in model.state_dict().items()}
        save_file(tensors, str(directory / "model.safetensors.tmp"), metadata={"format": "pt"})
        del tensors
        (directory / "model.safetensors.tmp").rename(directory / "model.safetensors")
        config.save_pretrained(directory)
    return (directory / "model.safetensors").stat().st_size


# ---------------------------------------------------------------- one rank of a job
def _status(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def worker(args: argparse.Namespace) -> None:
    import lightning as L
    import torch
    from torch.utils.data import DataLoader
    from transformers import BertForTokenClassification

    import lightning_mp
    from lightning_mp.checkpoint import pretrained

    layout = json.loads(args.layout)
    if args.loader == "torch-reader":
        from torch.distributed.checkpoint import HuggingFaceStorageReader

        pretrained.SliceReader = HuggingFaceStorageReader  # torch's own: each file open while read

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            load = BertForTokenClassification.from_pretrained if args.loader == "plain" else \
                lambda path: lightning_mp.from_pretrained(BertForTokenClassification, path)
            self.model = load(args.checkpoint)

        def predict_step(self, batch, batch_idx):
            return self.model(**batch).logits.sum().item()  # never runs: limit_predict_batches=0

    torch.set_num_threads(1)
    strategy = lightning_mp.ModelParallelStrategy(**layout)
    # No batch: the strategy's setup (sharding and loading) is what is measured. A forward pass would add
    # its own memory (measured here: +850 MiB per rank after one FSDP forward of this model on CPU).
    trainer = L.Trainer(accelerator="cpu", devices=4, strategy=strategy, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, limit_predict_batches=0)
    baseline = _status("VmRSS")
    _reset_peak()
    start = time.perf_counter()
    module = Module()
    rows = [{"input_ids": ids} for ids in torch.randint(0, 30522, (8, 16), generator=torch.Generator().manual_seed(0))]
    trainer.predict(module, DataLoader(rows, batch_size=2))
    row = {"rank": trainer.global_rank, "baseline": baseline, "load_peak": _status("VmHWM"),
           "load_s": time.perf_counter() - start, "after_load": _status("VmRSS")}
    if args.exporter:
        _reset_peak()
        start = time.perf_counter()
        export_dir = Path(args.out).with_suffix(".export")
        if args.exporter == "sharded":
            from lightning_mp.checkpoint.export import export_hf_model

            export_hf_model(module, "model", export_dir)
        else:
            _export_on_rank_zero(module, export_dir, strategy.pipeline_group)
        row.update(export_peak=_status("VmHWM"), export_s=time.perf_counter() - start)
    Path(f"{args.out}.rank{trainer.global_rank}.json").write_text(json.dumps(row))


def _export_on_rank_zero(module, out_dir: Path, pipeline_group) -> None:
    """The previous export: the full state dict gathered on rank 0, written by save_pretrained there."""
    import torch.distributed as dist
    from transformers import BertForTokenClassification

    from lightning_mp.checkpoint.state import model_state

    full = model_state(module.model, full=True, pipeline_group=pipeline_group)
    if dist.get_rank() == 0:
        with __import__("torch").device("meta"):
            clean = BertForTokenClassification(module.model.config)
        clean.load_state_dict(full, assign=True)
        clean.save_pretrained(out_dir)
    dist.barrier()


# ---------------------------------------------------------------- the driver
def run_case(name: str, checkpoint: Path, work: Path) -> list[dict]:
    layout, loader, exporter = CASES[name]
    out = work / name.replace(" ", "_").replace("×", "x")
    cmd = [sys.executable, __file__, "--worker", "--checkpoint", str(checkpoint), "--layout", json.dumps(layout),
           "--loader", loader, "--out", str(out)] + (["--exporter", exporter] if exporter else [])
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return [json.loads(Path(f"{out}.rank{rank}.json").read_text()) for rank in range(4)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--checkpoint")
    parser.add_argument("--layout")
    parser.add_argument("--loader")
    parser.add_argument("--exporter")
    parser.add_argument("--out")
    parser.add_argument("--work-dir", default="/tmp/lightning_mp_pretrained_memory")
    parser.add_argument("--only", nargs="*", default=None, help="case names to run")
    parser.add_argument("--table-only", action="store_true", help="print the table of the last run's JSON")
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    results_file = RESULTS / "pretrained_memory.json"
    if args.table_only:  # the table again, from the last run's JSON
        results = json.loads(results_file.read_text())
    else:
        work = Path(args.work_dir)
        checkpoint = work / "checkpoint"
        results = {"checkpoint_bytes": write_checkpoint(checkpoint), "cases": {}}
        for name in args.only or CASES:
            results["cases"][name] = {"ranks": run_case(name, checkpoint, work)}
            print(table_row(name, results["cases"][name]["ranks"], results["checkpoint_bytes"] / 4), flush=True)
        RESULTS.mkdir(parents=True, exist_ok=True)
        results_file.write_text(json.dumps(results, indent=2))
    table = make_table(results)
    print(table)
    (RESULTS / "pretrained_memory.md").write_text(table)


def table_row(name: str, rows: list[dict], quarter: float) -> str:
    """Peaks above the process baseline (after imports and the Trainer), of the rank with the largest."""
    load = max(r["load_peak"] - r["baseline"] for r in rows)
    exports = [r["export_peak"] - r["baseline"] for r in rows if "export_peak" in r]
    export = f"{max(exports) / MIB:>9.0f} | {max(exports) / quarter:>9.2f}" if exports else f"{'-':>9} | {'-':>9}"
    seconds = f"{max(r['load_s'] for r in rows):>6.0f} | {max(r.get('export_s', 0) for r in rows):>8.1f}"
    return f"| {name:<26} | {load / MIB:>9.0f} | {load / quarter:>9.2f} | {export} | {seconds} |"


def make_table(results: dict) -> str:
    size = results["checkpoint_bytes"]
    lines = [f"checkpoint: {size / MIB:.0f} MiB, a quarter {size / 4 / MIB:.0f} MiB; expected peak above the"
             f" baseline <= 1.3 x a quarter = {1.3 * size / 4 / MIB:.0f} MiB; MiB, largest rank", "",
             f"| {'layout':<26} | load peak | × quarter | export pk | × quarter | load s | export s |",
             f"|{'-' * 28}|{'-' * 11}|{'-' * 11}|{'-' * 11}|{'-' * 11}|{'-' * 8}|{'-' * 10}|"]
    lines += [table_row(name, case["ranks"], size / 4) for name, case in results["cases"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
