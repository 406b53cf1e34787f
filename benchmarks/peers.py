"""Our strategy against its peers on the same model, data and layout: the one table to read.

    python benchmarks/peers.py                          # every layout, 3 repeats, CPU ranks over gloo
    python benchmarks/peers.py --only dp2 dp2-repl      # some layouts
    python benchmarks/peers.py --no-compiled            # without our compile=True rows (compiling takes minutes on CPU)
    python benchmarks/peers.py --accelerator gpu --only "1 device" --model llama-1b --precision bf16-mixed \
        --batch 8 --seq 2048                            # on a GPU: tokens/s and MFU
    python benchmarks/peers.py --only dp2-repl --repeats 1 --profile /tmp/prof   # where rank 0's step time goes

Layouts: 1 device, dp2 (fully sharded), dp2-repl (replicated), tp2, dp2×tp2, pp2, pp2×dp2. Peers, where
they apply: Lightning's ModelParallelStrategy with the equivalent hand-written ``configure_model`` (dp, tp,
dp×tp), DDPStrategy (dp2 and dp2-repl: the same job, against our fully sharded and our replicated mode),
and Lightning without a strategy on one device. Lightning has no pipeline parallelism: pp rows are ours only.
Our ``compile=True`` rows ("ours+compile") run where compile applies; their ratio is compiled ÷ eager.
Models: ``--model`` picks a preset of benchmarks/workload.py (BERT token classifier or Llama causal LM, from
small CPU shapes to BERT-large and a 1.2 B Llama).

Every job is run ``--repeats`` times, the repeats interleaved (round r runs every job once, starting r jobs
later in the list), so that the machine's drifting load falls on all of them alike.
Reported: the median step time of each job (after
warm-up), its ratio to ours in the same round (median over rounds, and the lowest and highest), the first
step (where compile happens), tokens/s per device, MFU on known GPUs (model FLOPs by the PaLM convention ÷ the
datasheet's dense bf16 peak), the per-rank bytes of parameters + optimizer state, and the per-rank peak memory
(resident on CPUs, allocated on GPUs; ratios to ours). Absolute times on a shared 2-core machine are noise;
ratios from the same round are what to read. Writes ``benchmarks/results/peers.json`` and ``peers.png`` (the
plot needs the ``bench`` extra).

Adding a variant: append a ``Case`` whose ``label`` names it and whose ``kwargs`` carry the extra strategy
arguments (as ``COMPILED`` does); the worker passes ``kwargs`` to our ``ModelParallelStrategy`` unchanged, and
ratios are taken against the plain ``ours`` row of the same layout.
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from workload import PRESETS, peak_flops

RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True, eq=False)  # hashed by identity: a dict field is unhashable
class Case:
    layout: str
    devices: int
    runner: str  # ours | lightning (ModelParallelStrategy, hand-written plan) | ddp | single (no strategy)
    kwargs: dict = field(default_factory=dict)  # strategy arguments (ours: all of them; lightning: dp and tp)
    label: Optional[str] = None  # the row's name; default: the runner

    @property
    def name(self) -> str:
        return self.label or self.runner


CASES = [
    Case("1 device", 1, "ours", {"data_parallel_size": 1}),
    Case("1 device", 1, "single"),
    Case("dp2", 2, "ours", {"data_parallel_size": 2}),
    Case("dp2", 2, "lightning", {"data_parallel_size": 2, "tensor_parallel_size": 1}),
    # DDP holds the whole model on every rank: against our fully sharded mode it trades memory for speed.
    Case("dp2", 2, "ddp"),
    Case("dp2-repl", 2, "ours", {"data_parallel_size": 2, "data_parallel_mode": "replicated"}),
    Case("dp2-repl", 2, "ddp"),
    Case("tp2", 2, "ours", {"data_parallel_size": 1, "tensor_parallel_size": 2}),
    Case("tp2", 2, "lightning", {"data_parallel_size": 1, "tensor_parallel_size": 2}),
    Case("dp2xtp2", 4, "ours", {"data_parallel_size": 2, "tensor_parallel_size": 2}),
    Case("dp2xtp2", 4, "lightning", {"data_parallel_size": 2, "tensor_parallel_size": 2}),
    Case("pp2", 2, "ours", {"data_parallel_size": 1, "pipeline_parallel_size": 2}),
    Case("pp2xdp2", 4, "ours", {"data_parallel_size": 2, "pipeline_parallel_size": 2}),
]
# Our compiled blocks (compile=True) in the layouts where compile applies, against our eager row of the layout.
COMPILED = [
    Case(case.layout, case.devices, "ours", {**case.kwargs, "compile": True}, label="ours+compile")
    for case in CASES if case.name == "ours" and case.layout in ("1 device", "dp2", "pp2", "tp2")
]


def worker(args: argparse.Namespace) -> None:
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import Callback
    from workload import gather_per_rank, hand_written_plan, lightning_module, model_flops_per_token, synthetic_rows

    from lightning_mp.parallel.compile import compile_counts
    from lightning_mp.planner.measure import local_state_bytes
    from lightning_mp.processes.launch import destroy_process_group_at_exit

    # Every peer's job ends with a collective (the all_gather_object below); on gloo that can abort the process
    # at interpreter shutdown (see lightning_mp.processes). Our strategy registers this hook itself; the peers
    # get it here so that a run measures them instead of failing after the measurement.
    destroy_process_group_at_exit()
    kwargs = json.loads(args.kwargs)
    Module = lightning_module(args.model)

    class HandWritten(Module):
        """What a user of Lightning's ModelParallelStrategy writes by hand."""

        def configure_model(self):
            hand_written_plan(self)

    def synchronize(trainer) -> None:
        # The timer's own sync (every runner alike): kernels queued on a GPU must have finished.
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)
        trainer.strategy.barrier()

    class Timer(Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.profiler = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            synchronize(trainer)
            if batch_idx == args.warmup and args.profile and trainer.is_global_zero:
                self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                self.profiler.__enter__()
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, *_):
            synchronize(trainer)
            self.times.append(time.perf_counter() - self.start)

        def on_train_end(self, trainer, *_):
            if self.profiler is not None:
                self.profiler.__exit__(None, None, None)
                Path(args.profile).mkdir(parents=True, exist_ok=True)
                table = self.profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
                Path(args.profile, f"{Path(args.out).stem}.txt").write_text(table)

    if args.runner == "ours":
        from lightning_mp import ModelParallelStrategy

        strategy, module = ModelParallelStrategy(**kwargs), Module()
        data_size = kwargs.get("data_parallel_size", args.devices)
    elif args.runner == "lightning":
        from lightning.pytorch.strategies import ModelParallelStrategy as LightningModelParallel

        strategy, module = LightningModelParallel(**kwargs), HandWritten()
        data_size = kwargs["data_parallel_size"]
    else:  # ddp, single
        strategy, module, data_size = ("ddp" if args.runner == "ddp" else "auto"), Module(), args.devices
    flops_per_token = model_flops_per_token(module.model, args.model, args.seq)  # before any sharding
    loader = torch.utils.data.DataLoader(synthetic_rows(args.model, args.steps * args.batch, args.seq),
                                         batch_size=args.batch // data_size)
    timer = Timer()
    trainer = L.Trainer(accelerator=args.accelerator, devices=args.devices, strategy=strategy, max_steps=args.steps,
                        precision=args.precision,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[timer])
    trainer.fit(module, loader)
    local = local_state_bytes(module, trainer.optimizers[0])
    measured = {**local, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "peak_device": (torch.cuda.max_memory_allocated(trainer.strategy.root_device)
                                if trainer.strategy.root_device.type == "cuda" else 0)}
    per_rank = gather_per_rank(trainer, measured)
    if trainer.is_global_zero:
        warm = timer.times[args.warmup:]
        device_name = torch.cuda.get_device_name() if trainer.strategy.root_device.type == "cuda" else "cpu"
        Path(args.out).write_text(json.dumps({"median_step_s": statistics.median(warm), "per_rank": per_rank,
                                              "flops_per_token": flops_per_token, "device_name": device_name,
                                              "precision": args.precision,
                                              "first_step_s": timer.times[0], "graphs": compile_counts()["graphs"]}))


def run_case(case: Case, args: argparse.Namespace, shared: list[str], out: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--runner", case.runner, "--devices", str(case.devices),
           "--kwargs", json.dumps(case.kwargs), "--out", str(out), *shared]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                              timeout=args.case_timeout or None)
    except subprocess.TimeoutExpired as error:
        raise RuntimeError(f"{case} did not finish in {args.case_timeout} s:\n"
                           f"{(error.stderr or b'')[-2000:].decode(errors='replace')}") from None
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"{case} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    measured = json.loads(out.read_text())
    out.unlink()
    per_rank = measured["per_rank"]
    tokens_per_step = args.batch * args.seq
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(measured["device_name"], measured["precision"])
    achieved = measured["flops_per_token"] * tokens_per_step / measured["median_step_s"]
    return {"step_s": measured["median_step_s"], "first_step_s": measured["first_step_s"], "graphs": measured["graphs"],
            "tokens_per_s": tokens_per_step / measured["median_step_s"] / case.devices,
            "mfu": achieved / case.devices / peak if peak else None, "device_name": measured["device_name"],
            "state_mib": max(r["parameters"] + r["optimizer"] for r in per_rank) / 2**20,
            "peak_rss_mib": max(r["peak_rss"] for r in per_rank) / 2**20,
            "peak_device_mib": max(r["peak_device"] for r in per_rank) / 2**20}


def summarize(cases: list[Case], runs: dict[Case, list[dict]]) -> list[dict]:
    """One row per case: medians over repeats, and step-time ratios to ours taken round by round."""
    ours = {case.layout: case for case in cases if case.name == "ours" and runs[case]}
    rows = []
    for case in cases:
        if not runs[case] or case.layout not in ours:
            continue  # failed (reported when it did), or its layout has no row of ours to compare with
        mine, base = runs[case], runs[ours[case.layout]]
        ratios = [m["step_s"] / b["step_s"] for m, b in zip(mine, base)]
        median = {key: statistics.median(r[key] for r in mine) for key in MEDIANS if mine[0][key] is not None}
        base_median = {key: statistics.median(r[key] for r in base) for key in ("state_mib", "peak_rss_mib")}
        rows.append({
            "layout": case.layout, "strategy": case.name, "devices": case.devices, "kwargs": case.kwargs,
            "device_name": mine[0]["device_name"],
            "median_step_s": median["step_s"], "step_s_repeats": [r["step_s"] for r in mine],
            "step_time_vs_ours": statistics.median(ratios), "step_time_vs_ours_min": min(ratios),
            "step_time_vs_ours_max": max(ratios), "first_step_s": median["first_step_s"],
            "tokens_per_s_per_device": median["tokens_per_s"], "mfu": median.get("mfu"),
            "graphs_rank0": [r["graphs"] for r in mine],
            "state_mib_per_rank": median["state_mib"], "state_vs_ours": median["state_mib"] / base_median["state_mib"],
            "peak_rss_mib_per_rank": median["peak_rss_mib"],
            "peak_rss_vs_ours": median["peak_rss_mib"] / base_median["peak_rss_mib"],
            "peak_device_mib_per_rank": median["peak_device_mib"],
        })
    return rows


MEDIANS = ("step_s", "first_step_s", "tokens_per_s", "mfu", "state_mib", "peak_rss_mib", "peak_device_mib")


def print_table(rows: list[dict]) -> None:
    on_gpu = any(row["peak_device_mib_per_rank"] for row in rows)
    memory = "GPU peak MiB" if on_gpu else "peak RSS MiB"
    header = (f"{'layout':9} {'strategy':13} {'step s':>7} {'÷ ours (min-max)':>18} {'first s':>8} {'tok/s/dev':>10}"
              f" {'MFU':>6} {'state MiB/rank':>15} {'÷ ours':>7} {memory:>13} {'÷ ours':>7}")
    print(header)
    print("-" * len(header))
    for row in rows:
        spread = (f"{row['step_time_vs_ours']:.2f}"
                  f" ({row['step_time_vs_ours_min']:.2f}-{row['step_time_vs_ours_max']:.2f})")
        mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "-"
        peak = row["peak_device_mib_per_rank"] if on_gpu else row["peak_rss_mib_per_rank"]
        base = next(r for r in rows if r["layout"] == row["layout"] and r["strategy"] == "ours")
        base_peak = base["peak_device_mib_per_rank"] if on_gpu else base["peak_rss_mib_per_rank"]
        print(f"{row['layout']:9} {row['strategy']:13} {row['median_step_s']:7.3f} {spread:>18}"
              f" {row['first_step_s']:8.1f} {row['tokens_per_s_per_device']:10.0f} {mfu:>6}"
              f" {row['state_mib_per_rank']:15.2f} {row['state_vs_ours']:7.2f} {peak:13.0f} {peak / base_peak:7.2f}")


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    peers = [row for row in rows if row["strategy"] != "ours"]
    labels = [f"{row['layout']}\n{row['strategy']}" for row in peers]
    fig, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(13, 4.5))
    medians = [row["step_time_vs_ours"] for row in peers]
    errors = [[m - row["step_time_vs_ours_min"] for m, row in zip(medians, peers)],
              [row["step_time_vs_ours_max"] - m for m, row in zip(medians, peers)]]
    time_axis.bar(labels, medians, yerr=errors, capsize=4, color="tab:blue")
    time_axis.set_ylabel("peer step time ÷ ours (median, min-max)")
    memory_axis.bar([x - 0.2 for x in range(len(peers))], [row["state_vs_ours"] for row in peers], width=0.4,
                    label="parameters + optimizer", color="tab:orange")
    memory_axis.bar([x + 0.2 for x in range(len(peers))], [row["peak_rss_vs_ours"] for row in peers], width=0.4,
                    label="peak RSS", color="tab:green")
    memory_axis.set_xticks(range(len(peers)), labels)
    memory_axis.set_ylabel("peer memory per rank ÷ ours")
    memory_axis.legend()
    for axis in (time_axis, memory_axis):
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.tick_params(axis="x", labelsize=8)
    fig.suptitle("Peers against lightning_mp: above 1 = the peer is slower / holds more")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--repeats", type=int, default=3, help="runs of every job (median and spread)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16, help="global batch (sequences)")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--model", default="bert-small", choices=sorted(PRESETS), help="see benchmarks/workload.py")
    parser.add_argument("--precision", default="32-true", help="Lightning's precision for every runner")
    parser.add_argument("--compiled", action=argparse.BooleanOptionalAction, default=True,
                        help="also run our compile=True rows (1 device, dp2, pp2, tp2)")
    parser.add_argument("--peak-tflops", type=float, default=0.0,
                        help="peak FLOP/s (in TFLOP/s) for MFU; default: the datasheet's for known GPUs, none on CPUs")
    parser.add_argument("--only", nargs="+", metavar="LAYOUT", choices=sorted({case.layout for case in CASES}),
                        help="run only these layouts (default: all)")
    parser.add_argument("--case-timeout", type=float, default=0, help="seconds one job may take (default: no limit)")
    parser.add_argument("--keep-going", action="store_true", help="leave a failed job out of the table and go on")
    parser.add_argument("--profile", default="", help="write rank 0's torch.profiler table per job into this folder")
    parser.add_argument("--json", default=str(RESULTS / "peers.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--runner", help=argparse.SUPPRESS)
    parser.add_argument("--devices", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--kwargs", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    candidates = [*CASES, *COMPILED] if args.compiled else CASES
    cases = [case for case in candidates if not args.only or case.layout in args.only]
    shared = ["--accelerator", args.accelerator, "--steps", str(args.steps), "--warmup", str(args.warmup),
              "--batch", str(args.batch), "--seq", str(args.seq), "--model", args.model,
              "--precision", args.precision, "--profile", args.profile]
    runs: dict[Case, list[dict]] = {case: [] for case in cases}
    started = time.perf_counter()
    settings = {k: v for k, v in vars(args).items() if k not in ("worker", "runner", "devices", "kwargs", "out")}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    failed: dict[str, str] = {}
    for round_index in range(args.repeats):
        # Each round starts one job later in the list: no job is always the first (or the last) of a round.
        shift = round_index % len(cases)
        for case in cases[shift:] + cases[:shift]:
            if f"{case.layout} {case.name}" in failed:
                continue
            out = Path(args.json).with_suffix(f".{case.layout.replace(' ', '_')}.{case.name}.tmp")
            try:
                runs[case].append(run_case(case, args, shared, out))
            except RuntimeError as error:
                if not args.keep_going:
                    raise
                failed[f"{case.layout} {case.name}"] = str(error)
                print(f"FAILED, left out of the table: {error}", flush=True)
            rows = summarize(cases, runs)
            # Written after every job: an interrupted run keeps what it measured.
            Path(args.json).write_text(json.dumps({"settings": settings, "rounds": round_index + 1, "failed": failed,
                                                  "cases": [asdict(c) for c in cases], "rows": rows}, indent=2))
        print(f"round {round_index + 1}/{args.repeats} done after {time.perf_counter() - started:.0f} s", flush=True)
    print_table(rows)
    png = Path(args.json).with_suffix(".png")
    drawn = plot(rows, png)
    print(f"wrote {args.json}" + (f" and {png}" if drawn else " (install the 'bench' extra, matplotlib, for the plot)"))


if __name__ == "__main__":
    main()
