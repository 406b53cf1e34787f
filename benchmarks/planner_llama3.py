"""The planner's choices for Llama-3 8B / 70B / 405B from 8 to 1024 GPUs (8 per node), as markdown rows for
docs/planner.md, and its verdict on the layouts published runs used. Nothing runs; seconds per model.

    python benchmarks/planner_llama3.py          # prints the tables
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lightning_mp.planner import Cluster, Layout, choose, memory, shape_from_config, step_time  # noqa: E402

SEQ = 8192
GPUS = (8, 64, 256, 512, 1024)
# Global batch (sequences of 8192 tokens) per model: what torchtitan's published runs used.
MODELS = {
    "llama3-8b": (dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32), 256),
    "llama3-70b": (dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64), 512),
    "llama3-405b": (dict(hidden_size=16384, intermediate_size=53248, num_hidden_layers=126, num_attention_heads=128),
                    256),
}
# (model, GPUs, memory per GPU, layout) of published runs (torchtitan docs/performance.md, Float8 + compile).
# torchtitan's tensor parallelism always runs sequence parallelism, and loss parallelism by default; the strategy
# has neither with a pipeline (405B's runs are modelled without them).
PUBLISHED = [
    ("llama3-70b", 256, 96, Layout(32, 8, 1, activation_checkpointing=True)),
    ("llama3-70b", 256, 96, Layout(32, 8, 1, activation_checkpointing=True, sequence_parallel=True,
                                   loss_parallel=True)),
    ("llama3-405b", 512, 96, Layout(8, 8, 8, microbatches=32, schedule="interleaved_1f1b",
                                    activation_checkpointing=True)),
    ("llama3-405b", 512, 96, Layout(8, 8, 8, microbatches=32, schedule="1f1b", activation_checkpointing=True)),
]


def shape(name: str):
    from transformers import LlamaConfig

    sizes, _ = MODELS[name]
    return shape_from_config(LlamaConfig(vocab_size=128256, num_key_value_heads=8, **sizes))


def gib(n: float) -> str:
    return f"{n / 2**30:.1f}"


def rows(name: str, memory_gb: float = 80.0) -> list[str]:
    model, batch = shape(name), MODELS[name][1]
    lines = []
    for gpus in GPUS:
        cluster = Cluster(devices_per_node=8, num_nodes=gpus // 8, device_memory_gb=memory_gb)
        try:
            best, ranked = choose(model, cluster, batch, SEQ)
        except ValueError:
            smallest = memory(model, Layout(gpus, 1, 1), batch, SEQ, "bf16-mixed").state
            lines.append(f"| {gpus} | nothing fits (state alone {gib(smallest)} GiB per GPU fully sharded)"
                         " | | | | | | |")
            continue
        fits = [c for c in ranked if c.rejected is None]
        m = best.memory
        runner = fits[1] if len(fits) > 1 else None
        lines.append(f"| {gpus} | {best.layout.describe()} | {gib(m.state)} | {gib(m.activations)} | {gib(m.total)}"
                     f" | {best.time.total:.1f} s"
                     f" | {runner.layout.describe() + f' ({runner.time.total:.1f} s)' if runner else '-'}"
                     f" | {len(fits)} / {len(ranked)} |")
    return lines


def published() -> list[str]:
    lines = []
    for name, gpus, memory_gb, layout in PUBLISHED:
        model, batch = shape(name), MODELS[name][1]
        cluster = Cluster(devices_per_node=8, num_nodes=gpus // 8, device_memory_gb=memory_gb)
        m = memory(model, layout, batch, SEQ, "bf16-mixed")
        t = step_time(model, layout, cluster, batch, SEQ)
        best, ranked = choose(model, cluster, batch, SEQ)
        rank = next((i for i, c in enumerate(ranked) if c.layout == layout), None)
        lines.append(f"| {name} on {gpus} ({memory_gb} GB) | {layout.describe()}"
                     f" | {gib(m.state)} + {gib(m.activations)}"
                     f" = {gib(m.total)} | {t.total:.1f} s | {best.layout.describe()} ({best.time.total:.1f} s,"
                     f" {gib(best.memory.total)} GiB) | {rank + 1 if rank is not None else '-'} |")
    return lines


def main() -> None:
    header = ("| GPUs | chosen layout | state GiB | activ GiB | total GiB | est. step | runner-up"
              " | fit / considered |\n"
              "|---:|---|---:|---:|---:|---:|---|---:|")
    for name in MODELS:
        print(f"\n### {name}, global batch {MODELS[name][1]} × {SEQ} tokens, bf16-mixed, 80 GB per GPU\n\n{header}")
        print("\n".join(rows(name)))
    print("\n### Published layouts under the planner's model\n\n| run | layout | state + activ = GiB | est. step |"
          " planner's choice | rank of the published layout |\n|---|---|---|---:|---|---:|")
    print("\n".join(published()))


if __name__ == "__main__":
    main()
