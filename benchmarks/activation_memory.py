"""Activation memory per rank under sequence parallelism (SP), loss parallelism (LP) and selective activation
checkpointing (SAC), measured on CPU ranks and compared with Korthikanti et al. 2022's formulas redone for
this model (the planner's own count, ``lightning_mp/planner/shapes.py``).

    python benchmarks/activation_memory.py            # table, results/activation_memory.json and .png
    python benchmarks/activation_memory.py --layouts tp1 tp2_sp --steps 3

The model: a LlamaForCausalLM built from a tiny config (random weights): hidden h = 256, a = 4 heads (no
grouped-query attention: k = 4 KV heads of width d = 64), SwiGLU of width I = 704, RMSNorm, rotary
positions, no dropout, untied head over V = 32,000 tokens; batch b = 1 sequence of s = 512 tokens (no
padding, so no attention mask), fp32 (e = 4 bytes), trained a few AdamW steps through
``lightning.Trainer(strategy=ModelParallelStrategy(tensor_parallel_size=t, ...))`` on t CPU ranks (gloo).

What is measured (per rank, the largest rank reported): ``SavedActivationBytes``, the bytes autograd keeps
for backward, counted once per storage, parameters excluded (plus the outputs selective checkpointing
keeps); "per layer" is what the second decoder layer adds to it during its forward (the first also holds
the rotary tables); "logits" is the part of it in tensors whose last dimension is the vocabulary (local
width V/t under LP): the fp32 log-probabilities the cross-entropy keeps. The step time is the median of
the steps after the first, and only its ratio to the tp-only run of the same degree means anything.

The paper's per-layer count (eq. 2, GPT, 16-bit activations, 1-byte dropout masks, GeLU MLP of width 4h,
attention scores materialised) is ``s·b·h·(10 + 24/t + 5·a·s/(h·t))`` bytes with tensor parallelism and
``s·b·h/t·(34 + 5·a·s/h)`` with sequence parallelism. Redone term by term for this layer, n = s·b tokens:

  replicated over tensor ranks (what SP shards):
    input RMSNorm:    fp32 input n·h·4, normalised value n·h·e, rsqrt n·4     (the paper's LayerNorm input 2sbh)
    q/k/v input:      the weighted norm output n·h·e                          (the paper's QKV input 2sbh)
    post-attn norm + gate/up input: the same again                            (the paper's LN 2sbh + MLP input 2sbh)
  split over tensor ranks:
    attention:        rotated q n·a·d·e, rotated k n·k·d·e, v n·k·d·e        (the paper's Q, K 4sbh/t, V 2sbh/t)
                      SDPA output n·a·d·e (o_proj's input; the paper's 2sbh/t), fp32 log-sum-exp n·a·4
                      no s×s scores, softmax or dropout mask: without a mask and dropout, PyTorch's CPU SDPA
                      runs its flash kernel (``_scaled_dot_product_flash_attention_for_cpu``), which keeps only
                      output and log-sum-exp (the paper's 5·a·s/h term is 0; its math fallback, taken with
                      dropout or some masks, would keep the a·s²·b softmax like the paper)
    SwiGLU:           gate n·I·e, silu(gate) n·I·e, up n·I·e, their product n·I·e (down's input)
                      (the paper's 4h GeLU MLP: GeLU input 8sbh/t + second linear's input 8sbh/t)
    no dropout: the paper's 1-byte masks (two replicated s·b·h, the a·s²·b/t attention mask) are 0 here

  per layer:  2·(n·h·(4 + 2e) + 4n)  +  [n·e·(2·a·d + 2·k·d + 4·I) + 4·n·a] / t
  at e = 4, a·d = k·d = h:  24·n·h + 8n  +  (16·n·h + 16·n·I + 16·n) / t   bytes
  (the paper, same units: 10·sbh + 24·sbh/t + 5·a·s²·b/t at 2 bytes per element)

With SP as PyTorch implements it (``SequenceParallel`` norms, ``GatherSequence`` / row-wise reduce-scatter
around each tensor-parallel region), the norms keep their fp32 input, normalised value and rsqrt for n/t
tokens, but the all-gathered norm output that q/k/v (and gate/up) multiply is kept whole (n·h·e each):
PyTorch saves the gathered input of the column-wise matmul, where Megatron keeps the shard and gathers it
again in backward (the paper's 34/t assumes the latter):

  per layer with SP:  2·n·h·e  +  [2·(n·h·(4 + e) + 4n) + n·e·(2·a·d + 2·k·d + 4·I) + 4·n·a] / t

Beyond the layers (once per rank): the token ids (int64), the rotary cos/sin, the final norm (under SP on
n/t tokens, its gathered output kept by the head's matmul), the shifted labels, and the fp32
log-probabilities over the vocabulary, n·V·4 bytes, on every tensor rank, since the head's output is
gathered; with LP the head's output stays sharded and the cross-entropy keeps n·V·4/t.

Selective checkpointing keeps per layer its input and the outputs of the matmuls (q, k, v, gate, up split;
o and down whole partial sums), of the attention kernel, and of the tensor-parallel collectives
(``LayerActivations``' counterpart ``DecoderShape.selective_layer_bytes``); the element-wise tensors are
recomputed in backward one layer at a time (not visible to the measurement: checkpointing's own hooks hide
them).
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

RESULTS = Path(__file__).parent / "results"
MODEL = dict(family="llama", layers=2, hidden=256, heads=4, kv_heads=4, intermediate=704, vocab=32000)
SEQ, BATCH = 512, 1
# name -> (tensor ranks, strategy switches)
LAYOUTS = {
    "tp1": (1, {}),
    "tp2": (2, {}),
    "tp2_sp": (2, {"sequence_parallel": True}),
    "tp2_lp": (2, {"loss_parallel": True}),
    "tp4": (4, {}),
    "tp4_sp": (4, {"sequence_parallel": True}),
    "tp4_lp": (4, {"loss_parallel": True}),
    "tp4_sp_lp": (4, {"sequence_parallel": True, "loss_parallel": True}),
    "tp4_sp_lp_sac": (4, {"sequence_parallel": True, "loss_parallel": True, "activation_checkpointing": "selective"}),
}


def shape():
    from lightning_mp.planner import DecoderShape

    return DecoderShape(**MODEL)


def layout(name: str):
    from lightning_mp.planner import Layout

    t, switches = LAYOUTS[name]
    return Layout(1, t, 1, activation_checkpointing=switches.get("activation_checkpointing", False),
                  sequence_parallel=switches.get("sequence_parallel", False),
                  loss_parallel=switches.get("loss_parallel", False))


def predict(name: str) -> dict:
    """The planner's count (the formulas of the module docstring) and the paper's, for comparison."""
    from lightning_mp.planner import activation_bytes

    model, chosen = shape(), layout(name)
    t, sp, e, n, h = chosen.tensor, chosen.sequence_parallel, 4, BATCH * SEQ, MODEL["hidden"]
    if chosen.checkpointing == "selective":
        per_layer = model.selective_layer_bytes(BATCH, SEQ, t, e, sequence_parallel=sp)
    else:
        per_layer = model.layer_activations(BATCH, SEQ, t, e, sequence_parallel=sp).total
    a, s = MODEL["heads"], SEQ
    paper = n * h * (34 + 5 * a * s / h) / t if sp else n * h * (10 + 24 / t + 5 * a * s / (h * t))
    return {"per_layer": per_layer, "paper_per_layer_gpt_fp16": paper,
            "logits": n * MODEL["vocab"] * 4 / (t if chosen.loss_parallel else 1),
            "total": activation_bytes(model, chosen, BATCH, SEQ, "32-true")}


# ---------------------------------------------------------------- one job per layout
def worker(name: str, out: str, steps: int) -> None:
    import resource

    import lightning as L
    import torch
    from lightning.pytorch.callbacks import Callback
    from torch.utils.data import DataLoader
    from transformers import LlamaConfig, LlamaForCausalLM
    from workload import gather_per_rank

    from lightning_mp import ModelParallelStrategy
    from lightning_mp.planner.measure import SavedActivationBytes, _plain

    t, switches = LAYOUTS[name]
    vocab = MODEL["vocab"]

    class Measured(SavedActivationBytes):
        """Also the bytes of vocabulary-wide saved tensors (log-probabilities) and each layer's share."""

        def __init__(self) -> None:
            super().__init__()
            self.logits_live, self.logits_peak, self.layer_bytes, self.times = 0, 0, [], []
            self._logits: set[int] = set()

        def _pack(self, tensor):
            held = super()._pack(tensor)
            if held is tensor:  # a parameter (the head's transposed weight is V wide too): not an activation
                return held
            local = _plain(tensor)
            key = local.untyped_storage().data_ptr()
            if local.dim() >= 2 and local.shape[-1] in (vocab, vocab // t) and key not in self._logits:
                self._logits.add(key)
                self.logits_live += local.untyped_storage().nbytes()
                self.logits_peak = max(self.logits_peak, self.logits_live)
            return held

        def on_train_batch_start(self, trainer, pl_module, *args) -> None:
            self.logits_live, self._logits = 0, set()
            self._started = time.perf_counter()
            super().on_train_batch_start(trainer, pl_module, *args)

        def on_train_batch_end(self, *args) -> None:
            super().on_train_batch_end(*args)
            self.times.append(time.perf_counter() - self._started)

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            config = LlamaConfig(vocab_size=vocab, hidden_size=MODEL["hidden"], num_hidden_layers=MODEL["layers"],
                                 num_attention_heads=MODEL["heads"], num_key_value_heads=MODEL["kv_heads"],
                                 intermediate_size=MODEL["intermediate"], max_position_embeddings=SEQ,
                                 tie_word_embeddings=False)
            self.model = LlamaForCausalLM(config)

        def training_step(self, batch, batch_idx):
            return self.model(**batch).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-4)

    class LayerShare(Callback):
        """What the second layer adds to the saved bytes during its forward."""

        def setup(self, trainer, pl_module, stage) -> None:
            layer = pl_module.model.model.layers[1]
            layer.register_forward_pre_hook(lambda *_: setattr(self, "before", measured.live))
            layer.register_forward_hook(lambda *_: measured.layer_bytes.append(measured.live - self.before))

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (steps * BATCH, SEQ), generator=g)
    rows = [{"input_ids": row, "labels": row} for row in ids]  # no padding: no attention mask, flash SDPA
    measured = Measured()
    trainer = L.Trainer(accelerator="cpu", devices=t, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[measured, LayerShare()],
                        strategy=ModelParallelStrategy(tensor_parallel_size=t, data_parallel_size=1, **switches))
    trainer.fit(Module(), DataLoader(rows, batch_size=BATCH))
    mine = {"activations": measured.peak, "logits": measured.logits_peak, "held": measured.held_between_steps,
            "per_layer": measured.layer_bytes[-1], "step_s": statistics.median(measured.times[1:] or measured.times),
            "max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    ranks = gather_per_rank(trainer, mine)
    if trainer.is_global_zero:
        Path(out).write_text(json.dumps(ranks))


def measure(name: str, steps: int) -> dict:
    out = RESULTS / f".activation_memory.{name}.tmp"
    RESULTS.mkdir(exist_ok=True)
    launch = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "MASTER_ADDR",
              "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launch}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, __file__, "--worker", name, "--out", str(out), "--steps", str(steps)],
                          capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    ranks = json.loads(out.read_text())
    out.unlink()
    pick = lambda key: max(r[key] for r in ranks)  # noqa: E731
    return {key: pick(key) for key in ("activations", "logits", "held", "per_layer", "step_s", "max_rss")}


# ---------------------------------------------------------------- report
def table(rows: list[dict]) -> str:
    mib = lambda n: f"{n / 2**20:8.2f}"  # noqa: E731
    lines = [f"{'layout':15} {'per layer MiB: meas':>19} {'formula':>8} {'ratio':>6} {'paper*':>8}"
             f" {'total: meas':>11} {'formula':>8} {'ratio':>6} {'logits: meas':>12} {'formula':>8} {'ratio':>6}"
             f" {'step vs tp-only':>15}"]
    for r in rows:
        m, p = r["measured"], r["predicted"]
        lines.append(f"{r['layout']:15} {mib(m['per_layer']):>19} {mib(p['per_layer'])} {r['layer_ratio']:6.3f}"
                     f" {mib(p['paper_per_layer_gpt_fp16'])} {mib(m['activations']):>11} {mib(p['total'])}"
                     f" {r['total_ratio']:6.3f} {mib(m['logits']):>12} {mib(p['logits'])} {r['logits_ratio']:6.3f}"
                     f" {r['step_ratio']:15.2f}")
    lines.append("* the paper's eq. 2 as published (GPT, 16-bit activations, dropout masks, s×s scores), for scale")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["layout"] for r in rows]
    x = range(len(rows))
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    panels = [("per_layer", "per layer (MiB per rank)"), ("activations", "all saved activations (MiB per rank)"),
              ("logits", "log-probabilities (MiB per rank)")]
    for ax, (key, title) in zip(axes, panels):
        formula = "total" if key == "activations" else key
        ax.bar([i - 0.2 for i in x], [r["measured"][key] / 2**20 for r in rows], 0.4, label="measured")
        ax.bar([i + 0.2 for i in x], [r["predicted"][formula] / 2**20 for r in rows], 0.4, label="formula")
        ax.set_xticks(list(x), names, rotation=45, ha="right")
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"Llama h={MODEL['hidden']}, {MODEL['layers']} layers, V={MODEL['vocab']}, b={BATCH}, s={SEQ}, fp32,"
                 " CPU ranks: sequence / loss parallelism, selective checkpointing")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--layouts", nargs="*", default=list(LAYOUTS))
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.out, args.steps)
        return
    rows = []
    for name in args.layouts:
        start = time.perf_counter()
        measured, predicted = measure(name, args.steps), predict(name)
        print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
        rows.append({"layout": name, "tensor": LAYOUTS[name][0], "switches": LAYOUTS[name][1],
                     "measured": measured, "predicted": predicted,
                     "layer_ratio": measured["per_layer"] / predicted["per_layer"],
                     "total_ratio": measured["activations"] / predicted["total"],
                     "logits_ratio": measured["logits"] / predicted["logits"]})
    base = {r["tensor"]: r["measured"]["step_s"] for r in rows if not r["switches"]}
    for r in rows:
        r["step_ratio"] = r["measured"]["step_s"] / base.get(r["tensor"], r["measured"]["step_s"])
    print(table(rows))
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "activation_memory.json"
    path.write_text(json.dumps({"model": MODEL, "seq": SEQ, "batch": BATCH, "precision": "32-true", "rows": rows},
                               indent=1))
    png = RESULTS / "activation_memory.png"
    print(f"wrote {path}" + (f" and {png}" if plot(rows, png) else " (install the 'bench' extra for the plot)"))


if __name__ == "__main__":
    main()
