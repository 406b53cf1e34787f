"""Time per step (documented estimates, for ranking, not promises): compute ``6·N·T`` FLOPs (+ ``12·L·s²·h``
per sequence for attention; ``8·`` instead of ``6·`` with full activation checkpointing, ``6.2·`` with
selective checkpointing: it recomputes only memory-bound element-wise ops, a guess) split over all
devices at ``flops × mfu × efficiency``, where efficiency = tokens / (tokens + 2048) for one device's
share of a microbatch (small matrix products run far below peak), stretched by the pipeline bubble
``(p-1)/(v·m+p-1)``; tensor parallelism adds 4 ring all-reduces of ``s·b·h`` per layer and microbatch
inside a node (sequence parallelism: the same volume as all-gathers and reduce-scatters, twice the calls)
and, for a vocabulary-sharded head without loss parallelism, the all-gather of the logits (``s·b·V``;
loss parallelism replaces it by three all-reduces of ``s·b`` numbers); pipeline parallelism sends activations
and their gradients across each stage boundary;
FSDP adds an all-gather in forward and backward and a reduce-scatter of every parameter shard, over the
link the data-parallel group spans (hybrid: shard inside a node, all-reduce across nodes); the replicated
mode one bucketed all-reduce of the gradients (``data_parallel_time``). Every
collective or send also pays a fixed latency (10 µs in a node, 30 µs across nodes). Communication is not
assumed to overlap compute. Tensor parallelism is kept inside a node.
"""

from __future__ import annotations

import math
from dataclasses import astuple, dataclass, replace
from typing import Any

from lightning_mp.config import stages_per_rank
from lightning_mp.parallel.replicate import BUCKET_BYTES, FIRST_BUCKET_BYTES
from lightning_mp.planner.inputs import BYTES, PARAM_BYTES, Cluster, Layout
from lightning_mp.planner.memory import fullest_state_bytes, stage_parts


@dataclass
class StepTime:
    """Estimated seconds of one optimizer step, by cause; ``total`` is their sum (nothing overlaps)."""

    compute: float = 0.0
    bubble: float = 0.0
    tensor_comm: float = 0.0
    pipeline_comm: float = 0.0
    data_comm: float = 0.0

    @property
    def total(self) -> float:
        return sum(astuple(self))


def bubble_fraction(layout: Layout) -> float:
    if layout.pipeline == 1:
        return 0.0
    v = stages_per_rank(layout.schedule)
    return (layout.pipeline - 1) / (v * layout.microbatches + layout.pipeline - 1)


# Kernels on few tokens run far below peak: efficiency tokens / (tokens + HALF_EFFICIENCY_TOKENS) per device
# and microbatch (half of peak at 2,048 tokens of one device's share). Fixed cost per collective / send.
HALF_EFFICIENCY_TOKENS = 2048
LATENCY_INTRA_S = 10e-6
LATENCY_INTER_S = 30e-6


def step_time(model: Any, layout: Layout, cluster: Cluster, global_batch: int, seq: int,
              precision: str = "bf16-mixed") -> StepTime:
    tokens = global_batch * seq
    factor = {None: 6.0, "full": 8.0, "selective": 6.2}[layout.checkpointing]
    flops = factor * model.parameters() * tokens + 12 * model.layers * seq * seq * model.attention_width * global_batch
    local_batch = global_batch // layout.data
    microbatch_tokens = local_batch / layout.microbatches * seq / layout.tensor  # one device's share
    efficiency = microbatch_tokens / (microbatch_tokens + HALF_EFFICIENCY_TOKENS)
    compute = flops / (cluster.world_size * cluster.flops * cluster.mfu * efficiency)
    bubble = compute * bubble_fraction(layout) / (1 - bubble_fraction(layout))
    element = BYTES[precision]
    layers_here = max(p["layers"] for p in stage_parts(model, layout))
    tensor_comm = 0.0
    if layout.tensor > 1:  # 2 all-reduces forward, 2 backward per layer and microbatch, inside a node
        volume = 4 * layers_here * local_batch * seq * model.hidden * element
        calls = 4 * layers_here * layout.microbatches * (2 if layout.sequence_parallel else 1)
        if model.vocabulary_sharded_head:  # the logits' gather, or the loss's all-reduces
            volume += 0 if layout.loss_parallel else local_batch * seq * model.vocab * element / 2  # gather = AR / 2
            calls += layout.microbatches * (3 if layout.loss_parallel else 1)
        tensor_comm = (2 * (layout.tensor - 1) / layout.tensor * volume / (cluster.intra_node_gbps * 1e9)
                       + calls * LATENCY_INTRA_S)
    pipeline_comm = 0.0
    if layout.pipeline > 1:  # activations forward, their gradients backward, at every stage boundary
        stages_here = 1 if layout.schedule in ("gpipe", "1f1b") else 2
        crosses = layout.tensor * layout.pipeline > cluster.devices_per_node
        link, latency = ((cluster.inter_node_gbps, LATENCY_INTER_S) if crosses
                         else (cluster.intra_node_gbps, LATENCY_INTRA_S))
        volume = 2 * stages_here * local_batch * seq * model.hidden * element / layout.tensor
        pipeline_comm = volume / (link * 1e9) + 2 * stages_here * layout.microbatches * latency
    data_comm = data_parallel_time(model, layout, cluster, precision, layers_here) if layout.data > 1 else 0.0
    return StepTime(compute, bubble, tensor_comm, pipeline_comm, data_comm)


def data_parallel_time(model: Any, layout: Layout, cluster: Cluster, precision: str, layers_here: int) -> float:
    """Seconds of data-parallel traffic per step. Parameters are gathered in the compute dtype; gradients are
    reduced in the dtype the parameters are stored in (fp32 under "-mixed": FSDP's ``reduce_dtype`` and the
    replicated mode's plain gradients), so ``reduced`` is the stored parameter bytes.

    - fully sharded / hybrid: per block, an all-gather in forward and in backward and a reduce-scatter of the
      gradients over the shard group; hybrid adds an all-reduce of each shard across the replicas (across
      nodes), once per block;
    - replicated (``parallel/replicate.py``): one all-reduce of all gradients, in buckets (the first 1 MiB, then
      25 MiB), over the link the data-parallel group spans."""
    reduced = max(r["parameters"] for r in fullest_state_bytes(model, replace(layout, mode="replicated"), precision))
    gathered = reduced * BYTES[precision] // PARAM_BYTES[precision]
    spans_nodes = layout.data * layout.tensor * layout.pipeline > cluster.devices_per_node
    inter = spans_nodes and layout.mode != "hybrid"
    link, latency = (cluster.inter_node_gbps, LATENCY_INTER_S) if inter else (cluster.intra_node_gbps, LATENCY_INTRA_S)
    if layout.mode == "replicated":
        buckets = 1 + math.ceil(max(0, reduced - FIRST_BUCKET_BYTES) / BUCKET_BYTES)
        return 2 * (layout.data - 1) / layout.data * reduced / (link * 1e9) + buckets * latency
    seconds = ((2 * gathered + reduced) * (layout.shard - 1) / layout.shard / (link * 1e9)
               + 3 * (layers_here + 1) * latency)
    replicas = layout.data // layout.shard
    if replicas > 1:
        seconds += (2 * (replicas - 1) / replicas * reduced / layout.shard / (cluster.inter_node_gbps * 1e9)
                    + (layers_here + 1) * LATENCY_INTER_S)
    return seconds
