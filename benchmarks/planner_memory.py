"""The planner's memory model against measurement, per rank, on CPU processes.

    python benchmarks/planner_memory.py                  # BERT: table, benchmarks/results/planner_memory.json
    python benchmarks/planner_memory.py --family llama   # tiny Llama (GQA): planner_memory_llama.json

For several layouts of a small BERT token classifier or a small Llama causal LM (4 heads / 2 KV heads,
SwiGLU, RMSNorm, rotary, untied head), a real job under ModelParallelStrategy trains a few steps and
every rank measures:

- parameter, gradient and AdamW bytes it holds (its local shards) — must equal the prediction exactly;
- the peak bytes autograd keeps for backward during a step (``saved_tensors_hooks``, counted once per
  storage, parameters excluded) — the activation memory the planner's formula estimates.

"peak" below is parameters + gradients + optimizer state + peak saved activations on the fullest rank,
predicted vs measured. Transient buffers (FSDP all-gather buffers, temporaries inside one op) are not in
either: CPU tensors have no allocator statistics to measure them with. The Llama layouts include sequence
parallelism, loss parallelism and selective checkpointing (what its policy keeps is reported to the
measurement); full checkpointing is not in the table, and no layout measures a block's recomputation in
backward: checkpointing keeps those tensors through saved-tensor hooks of its own, which hide them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
# Dropout off: on CPU, attention dropout sends PyTorch to the math attention kernel, which stores the s × s
# scores that GPU (fused) attention never keeps; the memory model targets the GPU path.
SHAPE = dict(layers=4, hidden=64, heads=4, intermediate=128, vocab=1000, positions=64, labels=9, dropout=False)
# Grouped-query attention (2 KV heads for 4 heads: tp2 splits both), FFN width not a multiple of the hidden.
LLAMA = dict(family="llama", layers=4, hidden=64, heads=4, kv_heads=2, intermediate=160, vocab=1000)
SEQ, BATCH = 32, 8
LAYOUTS = {
    "single": (1, {}),
    "dp2": (2, {"data_parallel_size": 2}),
    "tp2": (2, {"tensor_parallel_size": 2, "data_parallel_size": 1}),
    "dp2xtp2": (4, {"data_parallel_size": 2, "tensor_parallel_size": 2}),
    "hybrid2x2": (4, {"data_parallel_size": 4, "data_parallel_mode": "hybrid", "data_parallel_replicate_size": 2}),
    "pp2": (2, {"pipeline_parallel_size": 2, "data_parallel_size": 1, "microbatches": 4}),
    "pp2_gpipe": (2, {"pipeline_parallel_size": 2, "data_parallel_size": 1, "microbatches": 4,
                      "pipeline_schedule": "gpipe"}),
    "pp2_m8": (2, {"pipeline_parallel_size": 2, "data_parallel_size": 1, "microbatches": 8}),
    "pp2xdp2": (4, {"pipeline_parallel_size": 2, "data_parallel_size": 2, "microbatches": 2}),
    # Decoders only: sequence parallelism, loss parallelism, selective activation checkpointing.
    "tp2_sp": (2, {"tensor_parallel_size": 2, "data_parallel_size": 1, "sequence_parallel": True}),
    "tp2_lp": (2, {"tensor_parallel_size": 2, "data_parallel_size": 1, "loss_parallel": True}),
    "single_sac": (1, {"activation_checkpointing": "selective"}),
    "tp2_sac": (2, {"tensor_parallel_size": 2, "data_parallel_size": 1, "activation_checkpointing": "selective"}),
    "dp2xtp2_sp_lp_sac": (4, {"data_parallel_size": 2, "tensor_parallel_size": 2, "sequence_parallel": True,
                              "loss_parallel": True, "activation_checkpointing": "selective"}),
}
LLAMA_LAYOUTS = ["single", "dp2", "tp2", "dp2xtp2", "pp2", "pp2xdp2", "tp2_sp", "tp2_lp", "single_sac", "tp2_sac",
                 "dp2xtp2_sp_lp_sac"]


def layout_of(kwargs: dict, devices: int):
    from lightning_mp.planner import Layout

    tp, pp = kwargs.get("tensor_parallel_size", 1), kwargs.get("pipeline_parallel_size", 1)
    dp = kwargs.get("data_parallel_size", devices // (tp * pp))
    mode = kwargs.get("data_parallel_mode", "fully_sharded")
    return Layout(dp, tp, pp, mode, kwargs.get("data_parallel_replicate_size", 1), kwargs.get("microbatches", 1),
                  kwargs.get("pipeline_schedule", "1f1b"), kwargs.get("activation_checkpointing", False),
                  kwargs.get("sequence_parallel", False), kwargs.get("loss_parallel", False))


def shape_of(family: str):
    from lightning_mp.planner import DecoderShape, ModelShape

    return ModelShape(**SHAPE) if family == "bert" else DecoderShape(**LLAMA)


def predict(name: str, family: str = "bert") -> dict:
    from lightning_mp.planner import activation_bytes_per_rank, memory, state_bytes

    devices, kwargs = LAYOUTS[name]
    model, layout = shape_of(family), layout_of(kwargs, devices)
    states = state_bytes(model, layout)
    activations = activation_bytes_per_rank(model, layout, BATCH // layout.data, SEQ)
    if family == "bert":  # as first published: the fullest state plus the fullest activations
        fullest = max(states, key=lambda r: r["parameters"])
        peak = fullest["parameters"] * 4 + max(activations)
    else:  # what the planner uses: the fullest pipeline rank's own state + activations
        peak = memory(model, layout, BATCH, SEQ).total
    return {"state_per_rank": [r["parameters"] + r["gradients"] + r["optimizer"] for r in states],
            "activations": max(activations), "peak": peak}


# ---------------------------------------------------------------- measuring (one job per world size)
def worker(names: list[str], out: str, family: str = "bert") -> None:
    """Every layout of ``names`` (all of one world size) in turn, one Trainer each, in the same processes:
    starting the ranks costs more than measuring a tiny model. Rank 0 writes {layout: per-rank bytes}."""
    measured = {}
    for name in names:
        print(f"[planner_memory] {name}", file=sys.stderr, flush=True)  # which layout a failure belongs to
        measured[name], global_zero = measure_in_this_process(name, family)
    if global_zero:
        Path(out).write_text(json.dumps(measured))


def measure_in_this_process(name: str, family: str) -> tuple[list[dict], bool]:
    import lightning as L
    import torch
    from torch.distributed.tensor import DTensor
    from torch.utils.data import DataLoader
    from transformers import BertConfig, BertForTokenClassification
    from workload import gather_per_rank

    from lightning_mp import ModelParallelStrategy
    from lightning_mp.planner.measure import SavedActivationBytes, local_state_bytes

    devices, kwargs = LAYOUTS[name]
    if family == "bert":
        config = BertConfig(vocab_size=SHAPE["vocab"], hidden_size=SHAPE["hidden"], num_hidden_layers=SHAPE["layers"],
                            num_attention_heads=SHAPE["heads"], intermediate_size=SHAPE["intermediate"],
                            max_position_embeddings=SHAPE["positions"], num_labels=SHAPE["labels"],
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        build, vocab, labels_up_to = (lambda: BertForTokenClassification(config)), SHAPE["vocab"], SHAPE["labels"]
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(vocab_size=LLAMA["vocab"], hidden_size=LLAMA["hidden"], num_hidden_layers=LLAMA["layers"],
                             num_attention_heads=LLAMA["heads"], num_key_value_heads=LLAMA["kv_heads"],
                             intermediate_size=LLAMA["intermediate"], max_position_embeddings=SEQ,
                             tie_word_embeddings=False)
        build, vocab, labels_up_to = (lambda: LlamaForCausalLM(config)), LLAMA["vocab"], LLAMA["vocab"]

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = build()

        def training_step(self, batch, batch_idx):
            return self.model(**batch).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-4)

    torch.manual_seed(0)
    tp, pp = kwargs.get("tensor_parallel_size", 1), kwargs.get("pipeline_parallel_size", 1)
    data = kwargs.get("data_parallel_size", devices // (tp * pp))
    g = torch.Generator().manual_seed(0)
    # No attention mask (no padding): transformers then runs SDPA with is_causal / enable_gqa, as on GPUs.
    ids = torch.randint(1, vocab, (4 * BATCH, SEQ), generator=g)
    labels = torch.randint(0, labels_up_to, (4 * BATCH, SEQ), generator=g)
    module = Module()
    saved = SavedActivationBytes()
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=ModelParallelStrategy(**kwargs), max_steps=3,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[saved])
    rows = [{"input_ids": ids[i], "labels": labels[i]} for i in range(len(ids))]  # dict batches (pipelines need names)
    trainer.fit(module, DataLoader(rows, batch_size=BATCH // data))
    local = local_state_bytes(module, trainer.optimizers[0])
    grads = sum((p.grad._local_tensor if isinstance(p.grad, DTensor) else p.grad).nbytes
                for p in module.parameters() if p.grad is not None)
    mine = {"parameters": local["parameters"], "gradients": grads,
            "optimizer": local["optimizer"], "activations": saved.peak,
            "held_between_steps": saved.held_between_steps}
    ranks = gather_per_rank(trainer, mine)
    return ranks, trainer.is_global_zero


def measure(names: list[str], family: str = "bert") -> dict[str, dict]:
    """One job for layouts of one world size: {layout: measured}."""
    assert len({LAYOUTS[name][0] for name in names}) == 1, f"one world size per job: {names}"
    out = RESULTS / f".planner_memory.{family}.{names[0]}.tmp"
    RESULTS.mkdir(exist_ok=True)
    # A clean launch: variables left by an earlier in-process Trainer would make the job think torchrun
    # started it as one rank of a bigger world, and wait for the others forever.
    launch = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "MASTER_ADDR",
              "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launch}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, __file__, "--worker", ",".join(names), "--family", family,
                           "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300 * len(names))
    if proc.returncode != 0:
        raise RuntimeError(f"{','.join(names)} failed:\n{proc.stderr[-3000:]}")
    by_layout = json.loads(out.read_text())
    out.unlink()
    return {name: {"state_per_rank": [r["parameters"] + r["gradients"] + r["optimizer"] for r in ranks],
                   "activations": max(r["activations"] for r in ranks),
                   "held_between_steps": max(r["held_between_steps"] for r in ranks),
                   "peak": max(r["parameters"] + r["gradients"] + r["optimizer"] + r["activations"] for r in ranks)}
            for name, ranks in by_layout.items()}


def compare(names: list[str], family: str = "bert") -> list[dict]:
    """Rows in the order of ``names``; one job per world size among them."""
    by_world: dict[int, list[str]] = {}
    for name in names:
        by_world.setdefault(LAYOUTS[name][0], []).append(name)
    measured_all = {}
    for group in by_world.values():
        measured_all.update(measure(group, family))
    rows = []
    for name in names:
        predicted, measured = predict(name, family), measured_all[name]
        rows.append({"layout": name, "predicted": predicted, "measured": measured,
                     "state_exact": sorted(predicted["state_per_rank"]) == sorted(measured["state_per_rank"]),
                     "activation_ratio": predicted["activations"] / measured["activations"],
                     "peak_ratio": predicted["peak"] / measured["peak"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--family", choices=("bert", "llama"), default="bert")
    parser.add_argument("--layouts", nargs="*", default=None)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker.split(","), args.out, args.family)
        return
    rows = compare(args.layouts or list(LAYOUTS if args.family == "bert" else LLAMA_LAYOUTS), args.family)
    print(f"{'layout':18} {'state/rank KiB (pred=meas)':>28} {'act KiB pred':>12} {'meas':>8} {'ratio':>6}"
          f" {'peak KiB pred':>13} {'meas':>8} {'ratio':>6} {'held between steps KiB':>22}")
    for row in rows:
        p, m = row["predicted"], row["measured"]
        state = "/".join(f"{b / 1024:.0f}" for b in sorted(set(m["state_per_rank"])))
        print(f"{row['layout']:18} {state + (' ok' if row['state_exact'] else ' DIFFERS'):>28}"
              f" {p['activations'] / 1024:12.0f} {m['activations'] / 1024:8.0f} {row['activation_ratio']:6.2f}"
              f" {p['peak'] / 1024:13.0f} {m['peak'] / 1024:8.0f} {row['peak_ratio']:6.2f}"
              f" {m.get('held_between_steps', 0) / 1024:22.0f}")
    path = RESULTS / ("planner_memory.json" if args.family == "bert" else f"planner_memory_{args.family}.json")
    shape = SHAPE if args.family == "bert" else LLAMA
    path.write_text(json.dumps({"shape": shape, "seq": SEQ, "batch": BATCH, "rows": rows}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
