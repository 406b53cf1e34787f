"""Pipeline bubble and activation memory per schedule, measured against theory.

    python benchmarks/pipeline_bubble.py                 # p = 2, 4; m = 4, 8, 16; every schedule (CPU, gloo)
    python benchmarks/pipeline_bubble.py --p 2 --m 4 8   # a subset

For each (p ranks, m microbatches, schedule) a job of p ranks trains a BERT (8 layers) for a few steps
with ``lightning_mp.pipeline.runtime`` and measures, per rank:

- bubble: ``1 - busy / step time``, where busy is the time spent inside the stage's forward and backward
  computations (torch's ``forward_one_chunk`` / ``backward_one_chunk`` / ``backward_weight_one_chunk``),
  step time the wall time of the whole schedule step. The table reports the mean over ranks.
- theory: ``(p - 1) / (v·m + p - 1)`` with v stages per rank (GPipe and 1F1B: v = 1, Huang et al. 2019,
  Narayanan et al. 2021; interleaved: v = 2). Zero-bubble schedules are designed to approach 0
  (Qi et al. 2023); their row shows the interleaved formula as the bound they improve on.
- peak activation memory: the largest number of bytes that autograd holds saved for backward at once
  on a rank (``saved_tensors_hooks``; parameters excluded), the device-independent part of peak memory
  that the schedule controls (GPipe keeps all m microbatches alive, 1F1B at most p).

On a shared 2-core CPU the p ranks also compete for cores, so measured bubbles are above theory and
noisy; the ordering across schedules and the trend in m are what to read. Writes a table,
``benchmarks/results/pipeline_bubble.json`` and ``pipeline_bubble.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCHEDULES = ["gpipe", "1f1b", "interleaved_1f1b", "interleaved_zero_bubble", "zbv_zero_bubble"]
RESULTS = Path(__file__).parent / "results"


def theory(p: int, m: int, schedule: str) -> float:
    v = 1 if schedule in ("gpipe", "1f1b") else 2
    return (p - 1) / (v * m + p - 1)


# ---------------------------------------------------------------- one job (runs under torch.distributed.run)
def worker(args: argparse.Namespace) -> None:
    """One job; ``args`` holds the keys of :func:`settings` plus out, schedule and m."""
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import BertConfig, BertForTokenClassification

    from lightning_mp.pipeline.runtime import build_pipeline
    from lightning_mp.plans import find_plan

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("pipeline_parallel",))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=2000, hidden_size=args.hidden, num_hidden_layers=args.layers,
                        num_attention_heads=4, intermediate_size=4 * args.hidden, num_labels=9,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForTokenClassification(config)
    _, hf, plan = find_plan(model)
    runtime = build_pipeline(hf, plan, mesh["pipeline_parallel"], args.schedule, args.m, torch.device("cpu"))
    del model, hf

    busy = [0.0]

    def timed(method):
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return method(*a, **k)
            finally:
                busy[0] += time.perf_counter() - start
        return wrapper

    for stage in runtime.stages:
        for name in ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk"):
            setattr(stage, name, timed(getattr(stage, name)))

    class SavedBytes:
        def __init__(self) -> None:
            self.live = 0
            self.peak = 0

    tracker = SavedBytes()

    class Saved:
        __slots__ = ("tensor", "size")

        def __init__(self, tensor, size):
            self.tensor, self.size = tensor, size
            tracker.live += size
            tracker.peak = max(tracker.peak, tracker.live)

        def __del__(self):
            tracker.live -= self.size

    def pack(tensor):
        if isinstance(tensor, nn.Parameter) or (tensor.is_leaf and tensor.requires_grad):
            return tensor
        return Saved(tensor, tensor.numel() * tensor.element_size())

    def unpack(saved):
        return saved.tensor if isinstance(saved, Saved) else saved

    g = torch.Generator().manual_seed(0)
    batch = args.m * args.microbatch_size
    ids = torch.randint(1, 2000, (batch, args.seq), generator=g)
    labels = torch.randint(0, 9, (batch, args.seq), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    optimizer = torch.optim.SGD(list(runtime.parameters()), lr=1e-3)
    steps, idle = [], []
    for step in range(args.warmup + args.steps):
        dist.barrier()
        busy[0] = 0.0
        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            # Every token is labelled: each microbatch's share of the batch mean is its mean / m.
            runtime.run(inputs, labels, lambda logits, target: nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), target.reshape(-1)) / args.m)
        elapsed = time.perf_counter() - start
        optimizer.step()
        optimizer.zero_grad()
        if step >= args.warmup:
            steps.append(elapsed)
            idle.append(1.0 - busy[0] / elapsed)
    mine = {"rank": dist.get_rank(), "bubble": sum(idle) / len(idle), "step_s": sorted(steps)[len(steps) // 2],
            "peak_activation_bytes": tracker.peak}
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(gathered))
    dist.barrier()
    # Not destroy_process_group(): after pipelining, gloo's teardown sometimes aborts the process
    # ("terminate called without an active exception"); the results are written, so leave at once.
    sys.stdout.flush()
    os._exit(0)


# ---------------------------------------------------------------- driver
def run_case(p: int, m: int, schedule: str, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ranks.json"
        # One JSON argument: torchrun would read abbreviated options after the script (--m) as its own.
        job = {"out": str(out), "schedule": schedule, "m": m, **settings(args)}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={p}", __file__,
               "--worker", json.dumps(job)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"{schedule} p={p} m={m} failed:\n{proc.stderr[-3000:]}")
        ranks = json.loads(out.read_text())
    return {
        "p": p, "m": m, "schedule": schedule,
        "bubble_measured": sum(r["bubble"] for r in ranks) / p,
        "bubble_theory": theory(p, m, schedule),
        "peak_activation_mib": max(r["peak_activation_bytes"] for r in ranks) / 2**20,
        "step_s": max(r["step_s"] for r in ranks),
        "per_rank": ranks,
    }


def settings(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k) for k in ("hidden", "layers", "seq", "microbatch_size", "steps", "warmup")}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ps = sorted({r["p"] for r in rows})
    fig, axes = plt.subplots(2, len(ps), figsize=(6 * len(ps), 8), squeeze=False)
    for col, p in enumerate(ps):
        for schedule in SCHEDULES:
            sel = sorted((r for r in rows if r["p"] == p and r["schedule"] == schedule), key=lambda r: r["m"])
            if not sel:
                continue
            ms = [r["m"] for r in sel]
            line = axes[0][col].plot(ms, [r["bubble_measured"] for r in sel], marker="o", label=schedule)[0]
            axes[0][col].plot(ms, [r["bubble_theory"] for r in sel], linestyle=":", color=line.get_color())
            axes[1][col].plot(ms, [r["peak_activation_mib"] for r in sel], marker="o", label=schedule)
        axes[0][col].set(title=f"p={p}: bubble (solid measured, dotted theory)", xlabel="microbatches m",
                         ylabel="idle fraction per rank")
        axes[1][col].set(title=f"p={p}: peak saved activations per rank", xlabel="microbatches m", ylabel="MiB")
        axes[0][col].legend(fontsize=8)
        axes[1][col].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", metavar="JOB_JSON", help=argparse.SUPPRESS)
    parser.add_argument("--p", type=int, nargs="*", default=[2, 4])
    parser.add_argument("--m", type=int, nargs="*", default=[4, 8, 16])
    parser.add_argument("--schedules", nargs="*", default=SCHEDULES)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--microbatch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--name", default="pipeline_bubble", help="basename of the JSON and PNG in results/")
    args = parser.parse_args()
    if args.worker:
        worker(argparse.Namespace(**json.loads(args.worker)))
        return
    rows = []
    print(f"{'p':>2} {'m':>3} {'schedule':<24} {'bubble':>7} {'theory':>7} {'peak act MiB':>12} {'step s':>7}")
    for p in args.p:
        for m in args.m:
            for schedule in args.schedules:
                row = run_case(p, m, schedule, args)
                rows.append(row)
                print(f"{p:>2} {m:>3} {schedule:<24} {row['bubble_measured']:>7.3f} {row['bubble_theory']:>7.3f}"
                      f" {row['peak_activation_mib']:>12.2f} {row['step_s']:>7.3f}", flush=True)
    RESULTS.mkdir(exist_ok=True)
    json_path, png_path = RESULTS / f"{args.name}.json", RESULTS / f"{args.name}.png"
    json_path.write_text(json.dumps({"settings": settings(args), "rows": rows}, indent=1))
    try:
        plot(rows, png_path)
        print(f"wrote {json_path} and {png_path}")
    except ImportError:
        print(f"wrote {json_path} (install the 'bench' extra, matplotlib, for the plot)")


if __name__ == "__main__":
    main()
