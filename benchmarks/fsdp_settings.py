"""FSDP2 settings (``ModelParallelStrategy(fsdp_settings=...)``, ``lightning_mp.config.FSDPSettings``), each
against the current default in the same round.

    python benchmarks/fsdp_settings.py                     # dp2, 3 interleaved repeats, CPU ranks over gloo
    python benchmarks/fsdp_settings.py --devices 4         # dp4
    python benchmarks/fsdp_settings.py --repeats 1 --skip-probe

Same model, data and timing as ``benchmarks/peers.py`` (its default ``bert-small`` workload of
benchmarks/workload.py: BERT token classifier, hidden 256, 4 layers, global batch 16 × 64, AdamW): the step times
come from peers.py's own worker (its ``Case``/``run_case``/``summarize``;
a case's ``kwargs`` reach our strategy unchanged), so both tables measure the same thing. Rows:

  (a) reshard_after_forward "all" (the last block resharded too) against the default "except_last";
  (b) "none": every block keeps its gathered parameters from forward to backward (ZeRO-2-like);
  (c) explicit forward prefetch 1 and 2, backward prefetch 1 and 2, against FSDP2's implicit order;
  (d) under precision "bf16-mixed": reduce_dtype "bfloat16" against the default float32 reduction.

A second, short job per setting (the probe, this script's own worker) measures what timing cannot: the bytes
of parameters still gathered when backward starts (non-DTensor parameters of the FSDP units, i.e. what
reshard_after_forward keeps; on a GPU this is the peak-memory difference) and, for (d), the gradients of the
first and last step gathered in full, compared with a 32-true run of the same dp job (relative L2 error).
Step-time ratios on this shared CPU machine are only meaningful beyond their min-max spread; gloo on CPU has
no separate communication stream, so prefetching cannot overlap communication with compute here as NCCL
does on GPUs. Writes ``benchmarks/results/fsdp_settings.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from peers import RESULTS, Case, print_table, run_case, summarize  # noqa: E402

MODEL = "bert-small"  # a preset of benchmarks/workload.py
BF16 = "bf16-mixed"
SETTINGS = {  # row label -> fsdp_settings; "ours" is the default (the ratios' denominator)
    "ours": {},
    "reshard-all": {"reshard_after_forward": "all"},
    "reshard-none": {"reshard_after_forward": "none"},
    "fwd-prefetch-1": {"forward_prefetch": 1},
    "fwd-prefetch-2": {"forward_prefetch": 2},
    "bwd-prefetch-1": {"backward_prefetch": 1},
    "bwd-prefetch-2": {"backward_prefetch": 2},
}
BF16_SETTINGS = {"ours": {}, "reduce-bf16": {"reduce_dtype": "bfloat16"}}


def cases(devices: int) -> list[tuple[Case, str]]:
    """(case, precision) pairs; each precision is its own layout, so its rows are divided by its own default."""
    def case(layout: str, label: str, settings: dict) -> Case:
        kwargs = {"data_parallel_size": devices, **({"fsdp_settings": settings} if settings else {})}
        return Case(layout, devices, "ours", kwargs, label=None if label == "ours" else label)

    fp32, bf16 = f"dp{devices}", f"dp{devices} {BF16}"
    return ([(case(fp32, label, s), "32-true") for label, s in SETTINGS.items()]
            + [(case(bf16, label, s), BF16) for label, s in BF16_SETTINGS.items()])


def probe_worker(args: argparse.Namespace) -> None:
    """A few steps: gathered parameter bytes when backward starts, full gradients of the first and last step."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import Callback
    from torch.distributed.tensor import DTensor
    from torch.utils.data import DataLoader
    from workload import lightning_module, synthetic_rows

    from lightning_mp import ModelParallelStrategy

    Module = lightning_module(MODEL)

    class Probe(Callback):
        def __init__(self) -> None:
            self.gathered: list[int] = []
            self.grads: dict[int, dict[str, torch.Tensor]] = {}

        def on_before_backward(self, trainer, pl_module, loss):
            self.gathered.append(sum(p.numel() * p.element_size() for p in pl_module.parameters()
                                     if not isinstance(p, DTensor)))

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step in (0, args.steps - 1):  # full_tensor is a collective: every rank calls it
                self.grads[trainer.global_step] = {
                    name: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).float().cpu()
                    for name, p in pl_module.named_parameters() if p.grad is not None}

    rows = synthetic_rows(MODEL, args.steps * args.batch, args.seq)
    probe = Probe()
    trainer = L.Trainer(accelerator=args.accelerator, devices=args.devices, precision=args.precision,
                        strategy=ModelParallelStrategy(**json.loads(args.kwargs)), max_steps=args.steps,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[probe])
    trainer.fit(Module(), DataLoader(rows, batch_size=args.batch // args.devices))
    if trainer.is_global_zero:
        torch.save({"gathered_bytes": max(probe.gathered), "grads": probe.grads}, args.out)


def run_probe(case: Case, precision: str, args: argparse.Namespace, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--probe-worker", "--devices", str(case.devices), "--precision", precision,
           "--kwargs", json.dumps(case.kwargs), "--out", str(out), "--steps", str(args.probe_steps),
           "--batch", str(args.batch), "--seq", str(args.seq), "--accelerator", args.accelerator]
    for attempt in (1, 2):
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if proc.returncode == 0 and out.exists():
            break
        print(f"probe {case.name} {precision} failed (attempt {attempt}, {proc.returncode}):\n{proc.stderr[-3000:]}",
              flush=True)
    else:
        raise RuntimeError(f"probe {case.name} {precision} failed twice")
    import torch

    result = torch.load(out)
    out.unlink()
    return result


def run_with_retry(c: Case, precision: str, args: argparse.Namespace, shared: list[str], failures: list) -> dict:
    """One timed job through peers.py's worker; a failed job (e.g. ended by the strategy's progress watch after
    a hang) is recorded with its output and run once more."""
    out = Path(args.json).with_suffix(f".{c.layout.replace(' ', '_')}.{c.name}.tmp")
    for attempt in (1, 2):
        try:
            return run_case(c, args, [*shared, "--precision", precision], out)
        except RuntimeError as error:
            failures.append({"case": c.name, "layout": c.layout, "attempt": attempt, "error": str(error)[-3000:]})
            print(f"{c.layout} {c.name} failed (attempt {attempt}):\n{str(error)[-1500:]}", flush=True)
    raise RuntimeError(f"{c.layout} {c.name} failed twice; see the failures above")


def relative_error(grads, reference) -> float:
    difference = sum(float((grads[k] - reference[k]).pow(2).sum()) for k in reference)
    return (difference / sum(float(reference[k].pow(2).sum()) for k in reference)) ** 0.5


def probe_all(args: argparse.Namespace) -> dict:
    """Gathered bytes of every fp32 setting that changes resharding; gradient errors of the bf16 rows."""
    chosen = {(c.name, precision): (c, precision) for c, precision in cases(args.devices)
              if precision == BF16 or c.name in ("ours", "reshard-all", "reshard-none")}
    results = {key: run_probe(c, precision, args, Path(args.json).with_suffix(f".probe.{c.name}.{precision}.tmp"))
               for key, (c, precision) in chosen.items()}
    reference = results[("ours", "32-true")]["grads"]
    probe = {"gathered_mib_at_backward": {name: r["gathered_bytes"] / 2**20
                                         for (name, precision), r in results.items() if precision == "32-true"},
             "grad_error_vs_fp32": {}}
    default_bf16 = results[("ours", BF16)]["grads"]
    for (name, precision), r in results.items():
        if precision != BF16:
            continue
        probe["grad_error_vs_fp32"][name] = {
            f"step {step + 1}": {"vs_32_true": relative_error(r["grads"][step], reference[step]),
                                 "vs_bf16_default": relative_error(r["grads"][step], default_bf16[step])}
            for step in sorted(r["grads"])}
    return probe


def print_probe(probe: dict) -> None:
    print("\nparameters still gathered when backward starts (rank 0):")
    for name, mib in probe["gathered_mib_at_backward"].items():
        print(f"  {name:14} {mib:7.2f} MiB")
    print(f"\n{BF16} gradients, relative L2 error against the 32-true job (and against the {BF16} default):")
    for name, steps in probe["grad_error_vs_fp32"].items():
        print(f"  {name:14} " + "   ".join(f"{step}: {e['vs_32_true']:.2e} ({e['vs_bf16_default']:.1e})"
                                          for step, e in steps.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--devices", type=int, default=2, help="data-parallel ranks (fully sharded)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--probe-steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16, help="global batch (sequences)")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--case-timeout", type=float, default=0, help="seconds one job may take (default: no limit)")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="for MFU on GPUs (see peers.py)")
    parser.add_argument("--skip-probe", action="store_true")
    parser.add_argument("--json", default=str(RESULTS / "fsdp_settings.json"))
    parser.add_argument("--probe-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    parser.add_argument("--kwargs", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe_worker:
        return probe_worker(args)

    pairs = cases(args.devices)
    shared = ["--accelerator", args.accelerator, "--steps", str(args.steps), "--warmup", str(args.warmup),
              "--batch", str(args.batch), "--seq", str(args.seq), "--model", MODEL, "--profile", ""]
    settings = {k: v for k, v in vars(args).items() if k not in ("probe_worker", "precision", "kwargs", "out")}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    probe = None if args.skip_probe else probe_all(args)
    if probe:
        print_probe(probe)
    runs: dict[Case, list[dict]] = {c: [] for c, _ in pairs}
    failures: list[dict] = []
    for round_index in range(args.repeats):
        shift = round_index % len(pairs)  # the default is not always the first job of a round
        for c, precision in pairs[shift:] + pairs[:shift]:
            runs[c].append(run_with_retry(c, precision, args, shared, failures))
        rows = summarize([c for c, _ in pairs], runs)
        Path(args.json).write_text(json.dumps({"settings": settings, "rounds": round_index + 1,
                                              "cases": [asdict(c) for c, _ in pairs], "rows": rows,
                                              "probe": probe, "failures": failures}, indent=2))
        print(f"round {round_index + 1}/{args.repeats} done after {time.perf_counter() - started:.0f} s", flush=True)
    print("\n'ours' is the default setting of each layout; ratios are to it, round by round.")
    print_table(rows)
    if probe:
        print_probe(probe)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
