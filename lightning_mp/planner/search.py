"""Enumerate layouts, reject those that cannot work or do not fit, rank the rest by estimated step time."""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Any, Iterable, Optional

from lightning_mp.compile_limits import compile_problem
from lightning_mp.config import divisors, too_few_blocks
from lightning_mp.planner.inputs import Cluster, Layout, device_memory_gb
from lightning_mp.planner.memory import Memory, Shape, memory
from lightning_mp.planner.shapes import FAMILIES, shape_from_config
from lightning_mp.planner.time import StepTime, step_time


@dataclass
class Candidate:
    layout: Layout
    memory: Memory
    time: StepTime
    rejected: Optional[str] = None

    def summary(self) -> str:
        return (f"{self.layout.describe()} (estimated {self.memory.total / 2**30:.2f} GiB per device,"
                f" {self.time.total * 1e3:.1f} ms per step)")


def candidates(model: Shape, cluster: Cluster, global_batch: int, seq: int,
               precision: str = "bf16-mixed", loss_parallel: bool = True, compile: bool = False,
               replicated: bool = True) -> list[Candidate]:
    """Every layout worth considering, each with its memory, time and (if any) why it is rejected.
    ``loss_parallel``: whether it may be used (it turns the model's ``.logits`` into a sharded DTensor);
    ``compile``: the blocks will be compiled, which the strategy refuses with tensor parallelism together with
    sequence parallelism, activation checkpointing or FSDP (``compile_limits.py``);
    ``replicated``: whether the replicated data-parallel mode may be used (not with FSDP settings)."""
    limit = cluster.device_memory_gb * 2**30 * cluster.usable_fraction
    found = []
    for tp, pp in itertools.product(divisors(cluster.world_size), repeat=2):
        if cluster.world_size % (tp * pp):
            continue
        dp = cluster.world_size // (tp * pp)
        reason = None
        if tp > cluster.devices_per_node:
            reason = f"tensor parallelism over {tp} devices would cross nodes ({cluster.devices_per_node} per node)"
        elif model.tensor_parallel_problem(tp):
            reason = model.tensor_parallel_problem(tp)
        elif too_few_blocks(pp, model.layers):
            reason = too_few_blocks(pp, model.layers)
        elif global_batch % dp:
            reason = f"global batch {global_batch} is not divisible by dp={dp}"
        for layout in _variants(dp, tp, pp, max(1, global_batch // dp), model, cluster, loss_parallel, replicated):
            mem = memory(model, layout, global_batch, seq, precision) if reason is None else Memory()
            time = step_time(model, layout, cluster, global_batch, seq, precision) if reason is None else StepTime()
            why = reason or compile_problem(compile, layout.tensor, layout.shard, layout.sequence_parallel,
                                            layout.activation_checkpointing)
            if why is None and mem.total > limit:
                why = (f"needs {mem.total / 2**30:.1f} GiB per device, more than {cluster.usable_fraction:.0%} of"
                       f" {cluster.device_memory_gb:g} GB")
            found.append(Candidate(layout, mem, time, why))
    return found


def _variants(dp: int, tp: int, pp: int, local_batch: int, model: Shape, cluster: Cluster,
              loss_parallel: bool = True, replicated: bool = True) -> Iterable[Layout]:
    counts = [1]
    if pp > 1:  # from one microbatch per stage to 8 (bubble against per-microbatch efficiency), whole sequences
        counts = [m for m in divisors(local_batch) if pp <= m <= 8 * pp] or [pp]
    modes = [("fully_sharded", 1)]
    if dp > 1 and replicated:  # every rank holds the whole model (DDP's trade): less traffic per step where it fits
        modes.append(("replicated", 1))
    # Across nodes: shard inside a node, replicate across nodes (FSDP traffic stays on the fast links).
    shard = cluster.devices_per_node // (tp * pp) if cluster.devices_per_node % (tp * pp) == 0 else 0
    if cluster.num_nodes > 1 and 1 < shard < dp and dp % shard == 0:
        modes.append(("hybrid", dp // shard))
    schedules = ["1f1b"] + (["interleaved_1f1b"] if pp > 1 and model.layers >= 2 * pp else [])
    checkpointing = [False, True] + (["selective"] if model.switch_problem("selective", tp, pp) is None else [])
    sequence_parallel = [False] + ([True] if model.switch_problem("sequence_parallel", tp, pp) is None else [])
    # Loss parallelism is never worse in the model (less memory, less traffic): on wherever it applies.
    loss = loss_parallel and model.switch_problem("loss_parallel", tp, pp) is None
    for (mode, replicate), m, schedule, ac, sp in itertools.product(modes, counts, schedules, checkpointing,
                                                                    sequence_parallel):
        if schedule == "interleaved_1f1b" and m % pp:
            continue
        yield Layout(dp, tp, pp, mode, replicate, m, schedule, ac, sp, loss)


def choose(model: Shape, cluster: Cluster, global_batch: int, seq: int, precision: str = "bf16-mixed",
           loss_parallel: bool = True, compile: bool = False,
           replicated: bool = True) -> tuple[Candidate, list[Candidate]]:
    """The fastest layout that fits, and every candidate ranked (fitting ones first, by time)."""
    # Fitting layouts by estimated time; then those rejected for memory (closest to fitting first), which
    # say the most about the model; then structurally impossible ones.
    ranked = sorted(candidates(model, cluster, global_batch, seq, precision, loss_parallel, compile, replicated),
                    key=lambda c: (c.rejected is not None, c.memory.total == 0,
                                   c.time.total if c.rejected is None else c.memory.total))
    fitting = [c for c in ranked if c.rejected is None]
    if not fitting:
        reasons = "; ".join(f"{c.layout.describe()}: {c.rejected}" for c in ranked[:5])
        raise ValueError(f"no layout of {cluster.world_size} devices fits this model: {reasons}")
    return fitting[0], ranked


def format_table(ranked: list[Candidate], show: int = 12) -> str:
    """The ranked candidates as a text table: fitting layouts (fastest first), then the rejected ones."""
    gib = lambda n: f"{n / 2**30:8.2f}"  # noqa: E731
    lines = [f"{'layout':46} {'params':>8} {'grads':>8} {'optim':>8} {'activ':>8} {'total':>8} {'step ms':>9}  note",
             f"{'':46} {'GiB per device':^44}"]
    fitting = [c for c in ranked if c.rejected is None]
    rejected = [c for c in ranked if c.rejected is not None]
    # One example of every kind of rejection (the reason with its numbers blanked), memory first.
    kinds: dict[str, Candidate] = {}
    for c in rejected:
        kinds.setdefault(re.sub(r"[\d.]+", "#", c.rejected or ""), c)
    for c in fitting[:show] + list(kinds.values()):
        m = c.memory
        time = f"{c.time.total * 1e3:9.1f}" if c.rejected is None or m.total else f"{'-':>9}"
        lines.append(f"{c.layout.describe():46} {gib(m.parameters)} {gib(m.gradients)} {gib(m.optimizer)}"
                     f" {gib(m.activations)} {gib(m.total)} {time}  {c.rejected or ''}")
    lines.append(f"({len(fitting)} layouts fit, {len(rejected)} rejected)")
    return "\n".join(lines)


@dataclass(frozen=True)
class AutoLayout:
    """``ModelParallelStrategy(layout="auto", ...)``: what the planner needs beyond the model and the
    world size, which the strategy knows when the model is connected (before any process starts)."""

    global_batch_size: int
    sequence_length: int
    device_memory_gb: Optional[float] = None
    loss_parallel: bool = False  # may the planner shard the logits (the model's ``.logits`` become a DTensor)
    compile: bool = False  # compiled blocks: with tensor parallelism, no SP, checkpointing or FSDP (compile_limits.py)
    replicated: bool = True  # may pick data_parallel_mode="replicated" (False when FSDP settings were given)

    def __post_init__(self) -> None:
        for name in ("global_batch_size", "sequence_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"layout='auto' needs {name} (a positive int) to plan memory and time; got {value!r}.")

    def choose_for(self, module: Any, devices_per_node: int, num_nodes: int, precision: str,
                   accelerator: str = "auto") -> Candidate:
        from lightning.pytorch.utilities.model_helpers import is_overridden

        from lightning_mp.plans import find_plan

        if is_overridden("configure_model", module):
            raise ValueError("layout='auto' reads the model's shape before processes start: build the model in"
                             f" {type(module).__name__}.__init__, not in configure_model, or pass the degrees.")
        found = find_plan(module)
        config = getattr(found[1], "config", None) if found else None
        if config is None or not hasattr(config, "num_hidden_layers"):
            raise ValueError(
                f"layout='auto' plans transformers models (BERT token classifiers, {', '.join(FAMILIES)} causal"
                f" LMs) from their config; no such model was found in {type(module).__name__}. Pass the degrees"
                " instead (data_parallel_size=..., tensor_parallel_size=..., pipeline_parallel_size=...)."
            )
        cluster = Cluster(devices_per_node, num_nodes, self.device_memory_gb or device_memory_gb(accelerator))
        best, _ = choose(shape_from_config(config), cluster, self.global_batch_size, self.sequence_length, precision,
                         loss_parallel=self.loss_parallel, compile=self.compile, replicated=self.replicated)
        return best
