"""Memory per device (the fullest rank decides whether a layout fits): state + activations of each rank.

- parameters, gradients, optimizer state: exact. Every tensor of the model (the shape's
  ``layer_tensors`` / ``embedding_tensors`` / ``head_tensors``) is cut as the strategy cuts it: tensor
  parallelism splits column-wise tensors (and their biases) on dim 0 and row-wise weights on dim 1 (BERT:
  ``plans/bert.py``; decoders: transformers' tp plans through ``plans/hf.py``); FSDP then splits each
  rank's piece on dim 0 over the data-parallel shard ranks, with ``torch.chunk`` sizes (the last chunks
  may be smaller or empty); a pipeline rank holds only its stages (split by
  ``pipeline.split.balance_split`` on parameter counts, as the strategy does), and a head tied to the
  embedding is a second copy on the last stage when the model is pipelined (``pipeline/tied.py``).
  Gradients match parameters (except a vocabulary-parallel embedding's without FSDP: whole, see
  ``_rank_elements``); AdamW keeps two tensors per parameter.
- activations: what autograd keeps for backward, per layer and microbatch, counted by the shape
  (``layer_activations``: BERT below, decoders in ``planner/shapes.py``), plus what the embeddings /
  head / rotary tables keep on the stages that hold them (``stage_activation_bytes``).

  BERT (a layer with PyTorch's fused attention: SDPA keeps q, k, v, its output and the log-sum-exp,
  never the s × s score matrix), in elements of b sequences of s tokens, hidden h, FFN width i, a
  heads, tensor-parallel size t:

      layer(b, s) = s·b·h·(4 + 4/t) + 2·s·b·i/t + s·b·a/t   (+ 4·s·b fp32 LayerNorm statistics)

  replicated over tensor ranks: the layer input (shared by q, k, v), two LayerNorm inputs and the FFN
  input; split over tensor ranks: q, k, v and the attention output (whose head-merged view is the
  attention-out input: same storage), the FFN activation's input and output, and the log-sum-exp.
  This is Korthikanti et al. 2022 ("Reducing
  Activation Recomputation in Large Transformer Models", eq. 2: ``s·b·h·(10 + 24/t + 5·a·s/(h·t))``
  bytes at 16 bits) adjusted for BERT: post-LN, GELU FFN of width i, no stored attention scores with
  fused attention, and the element size of the compute dtype. Dropout (p > 0) adds one byte per element
  for its masks: ``2·s·b·h`` per layer (on CUDA; PyTorch's CPU dropout keeps a mask in the compute dtype,
  and with attention dropout CPU attention falls back to the math kernel, which stores the s × s scores:
  neither is modelled, the target is the GPU). The embeddings keep their LayerNorm input and two int64
  index tensors, the head its input, fp32 log-probabilities and the int64 labels.

  With full activation checkpointing a layer keeps only its input, ``s·b·h`` elements; with selective
  checkpointing its input and the outputs of its matmuls, attention and collectives (decoders only,
  ``planner/shapes.py``). In backward one layer at a time is recomputed: its full activations (full) or
  the element-wise rest (selective) exist again. The peak is the larger of the forward's end and that
  recomputation, on the last stage after the head's tensors (log-probabilities) are freed.
  Sequence and loss parallelism (decoders, tensor > 1, no pipeline, untied head: ``switch_problems``
  says why not otherwise) change the per-layer and head counts as ``planner/shapes.py`` documents.
  Layers in flight: every layer of the rank's stages holds one microbatch's activations per microbatch
  in flight: all ``m`` for GPipe, ``min(m, p - r)`` on stage r for 1F1B, ``min(m, p)·(1 + (p-1)/(p·v))``
  for interleaved schedules with v stages per rank (Narayanan et al. 2021), the local batch without
  a pipeline.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import astuple, dataclass
from typing import Any, Union

from lightning_mp.config import stages_per_rank
from lightning_mp.pipeline.runtime import stage_indices
from lightning_mp.pipeline.split import balance_split
from lightning_mp.planner.inputs import BYTES, PARAM_BYTES, Layout, ModelShape
from lightning_mp.planner.shapes import DecoderShape

Shape = Union[ModelShape, DecoderShape]


def chunk_size(n: int, parts: int, index: int) -> int:
    """Size of ``torch.chunk(range(n), parts)[index]`` (0 when chunking yields fewer pieces)."""
    size = -(-n // parts) if n else 0
    return max(0, min(size, n - size * index)) if size else 0


def _local_elements(shape: tuple[int, ...], style: str, tensor: int, t: int, shard: int, d: int) -> int:
    dims = list(shape)
    if tensor > 1 and style in ("colwise", "vocab"):  # vocab: an embedding's rows (vocabulary-parallel lookup)
        dims[0] = chunk_size(dims[0], tensor, t)
    elif tensor > 1 and style == "rowwise" and len(dims) > 1:
        dims[1] = chunk_size(dims[1], tensor, t)
    if shard > 1:
        dims[0] = chunk_size(dims[0], shard, d)
    return math.prod(dims)


def stage_parts(model: Shape, layout: Layout) -> list[dict[str, Any]]:
    """Per pipeline rank: which layers it holds and whether it holds the embeddings / the head, split as
    the strategy splits (balanced by parameter counts, a tied head counted on the last stage as the
    strategy's cost estimate counts it)."""
    schedule = layout.schedule if layout.pipeline > 1 else "1f1b"
    return _stage_parts(model, layout.pipeline, schedule)


@functools.lru_cache(maxsize=4096)
def _stage_parts(model: Shape, pipeline: int, schedule: str) -> list[dict[str, Any]]:
    # Cached: the exact split is a dynamic program over layers × stages, and the search asks for the same
    # (model, pipeline, schedule) for every microbatch count, FSDP mode and checkpointing choice.
    stages = pipeline * stages_per_rank(schedule)
    count = lambda tensors: float(sum(math.prod(s) for s, _ in tensors))  # noqa: E731
    points = balance_split([count(model.layer_tensors())] * model.layers, stages,
                           count(model.embedding_tensors()), count(model.head_tensors(pipelined=True)))
    bounds = [*points, model.layers]
    ranks = []
    for rank in range(pipeline):
        held = stage_indices(rank, pipeline, schedule)
        ranks.append({"layers": sum(bounds[s + 1] - bounds[s] for s in held), "first": 0 in held,
                      "last": stages - 1 in held, "stages": len(held)})
    return ranks


@dataclass
class Memory:
    """Bytes on the fullest device."""

    parameters: int = 0
    gradients: int = 0
    optimizer: int = 0
    activations: int = 0

    @property
    def state(self) -> int:
        return self.parameters + self.gradients + self.optimizer

    @property
    def total(self) -> int:
        return sum(astuple(self))


def _part_tensors(model: Shape, layout: Layout, part: dict[str, Any]) -> list[tuple[list, int]]:
    """(tensors, how many times) a pipeline rank holds: its layers, embeddings on the first stage, the
    head on the last (with the tied copy when pipelined)."""
    held = [(model.layer_tensors(), part["layers"])]
    held += [(model.embedding_tensors(), 1)] if part["first"] else []
    held += [(model.head_tensors(pipelined=layout.pipeline > 1), 1)] if part["last"] else []
    return held


def _rank_elements(held: list[tuple[list, int]], layout: Layout, t: int, d: int, gradient: bool = False) -> int:
    def style_of(style: str) -> str:
        # Without FSDP (one data-parallel rank) nothing reshapes gradients: a vocabulary-parallel embedding's
        # gradient comes out of DTensor's embedding backward replicated, the whole table on every tensor
        # rank (measured). FSDP's reduce-scatter gives it the parameter's sharding.
        return "replicated" if gradient and style == "vocab" and layout.data == 1 else style

    return sum(times * sum(_local_elements(shape, style_of(style), layout.tensor, t, layout.shard, d)
                           for shape, style in tensors)
               for tensors, times in held)


def _state(held: list[tuple[list, int]], layout: Layout, t: int, d: int, per_element: int) -> dict[str, int]:
    elements = _rank_elements(held, layout, t, d)
    return {"parameters": elements * per_element, "gradients": _rank_elements(held, layout, t, d, True) * per_element,
            "optimizer": 2 * elements * per_element}


def state_bytes(model: Shape, layout: Layout, precision: str = "32-true") -> list[dict[str, int]]:
    """Exact parameter / gradient / AdamW bytes of every rank (replicas of a shard repeated), by pipeline rank,
    data shard, tensor rank."""
    per_element = PARAM_BYTES[precision]
    ranks = []
    replicas = layout.data // layout.shard if layout.shard else layout.data
    for part in stage_parts(model, layout):
        held = _part_tensors(model, layout, part)
        for d, t in itertools.product(range(layout.shard), range(layout.tensor)):
            ranks += [_state(held, layout, t, d, per_element)] * replicas
    return ranks


def fullest_state_bytes(model: Shape, layout: Layout, precision: str = "32-true") -> list[dict[str, int]]:
    """Per pipeline rank, the state of its fullest rank: data shard 0, tensor rank 0 (``torch.chunk`` gives
    the first piece the largest size of every tensor), without enumerating every rank of a large world."""
    return [_state(_part_tensors(model, layout, part), layout, 0, 0, PARAM_BYTES[precision])
            for part in stage_parts(model, layout)]


def in_flight(layout: Layout, pipeline_rank: int = 0) -> float:
    """Microbatches whose activations pipeline rank ``pipeline_rank`` holds at its peak."""
    m, p = layout.microbatches, layout.pipeline
    if p == 1 or layout.schedule == "gpipe":
        return m
    if layout.schedule == "1f1b":  # stage r runs p - r forwards before its first backward
        return min(m, p - pipeline_rank)
    return min(m, p) * (1 + (p - 1) / (p * 2))  # interleaved (Narayanan et al. 2021), every rank alike


def switch_problems(model: Shape, layout: Layout) -> list[str]:
    """Why the layout's sequence / loss parallelism or selective checkpointing cannot apply to the model."""
    asked = [name for name, on in (("sequence_parallel", layout.sequence_parallel),
                                   ("loss_parallel", layout.loss_parallel),
                                   ("selective", layout.checkpointing == "selective")) if on]
    return [p for p in (model.switch_problem(name, layout.tensor, layout.pipeline) for name in asked) if p]


def activation_bytes_per_rank(model: Shape, layout: Layout, local_batch: int, seq: int,
                             precision: str = "32-true") -> list[int]:
    """Peak bytes autograd keeps for backward on every pipeline rank (see the module docstring)."""
    problems = switch_problems(model, layout)
    if problems:
        raise ValueError(f"{layout.describe()}: {'; '.join(problems)}.")
    b = local_batch / layout.microbatches  # sequences per microbatch
    t, element, sp = layout.tensor, BYTES[precision], layout.sequence_parallel
    full_layer = model.layer_activations(b, seq, t, element, sequence_parallel=sp).total
    kept_layer, recompute = full_layer, 0.0
    if layout.checkpointing == "full":
        kept_layer = model.checkpointed_layer_bytes(b, seq, t, element, sequence_parallel=sp)
        recompute = full_layer
    elif layout.checkpointing == "selective":
        kept_layer = model.selective_layer_bytes(b, seq, t, element, sequence_parallel=sp)
        recompute = max(0.0, full_layer - kept_layer)  # the element-wise part, recomputed one layer at a time
    switches = dict(sequence_parallel=sp, loss_parallel=layout.loss_parallel)
    ranks = []
    for rank, part in enumerate(stage_parts(model, layout)):
        flight = in_flight(layout, rank)
        end_of_forward = (part["layers"] * kept_layer
                          + model.stage_activation_bytes(b, seq, t, element, part["first"], part["last"], **switches)
                          ) * flight
        total = end_of_forward
        if layout.checkpointing:
            # Backward recomputes one layer at a time; on the last stage the head's tensors (log-probabilities)
            # of the microbatch being differentiated are already freed when its last layer is recomputed.
            head = model.head_activation_bytes(b, seq, t, element, **switches) if part["last"] else 0.0
            total = max(end_of_forward, end_of_forward - head + recompute)
        ranks.append(int(total))
    return ranks


def activation_bytes(model: Shape, layout: Layout, local_batch: int, seq: int, precision: str = "32-true") -> int:
    """Peak bytes autograd keeps for backward on the fullest pipeline rank."""
    return max(activation_bytes_per_rank(model, layout, local_batch, seq, precision))


def memory(model: Shape, layout: Layout, global_batch: int, seq: int, precision: str = "32-true") -> Memory:
    """The fullest rank's memory: each pipeline rank's fullest state plus its own activations (the stage
    with the embeddings and the one with the head differ in both)."""
    states = fullest_state_bytes(model, layout, precision)
    activations = activation_bytes_per_rank(model, layout, global_batch // layout.data, seq, precision)
    worst = max(range(len(states)), key=lambda r: (sum(states[r].values()) + activations[r], r))
    state = states[worst]
    return Memory(state["parameters"], state["gradients"], state["optimizer"], activations[worst])
