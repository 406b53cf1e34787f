"""torch.compile, one block at a time.

Each block of the plan (the unit of FSDP and activation checkpointing) gets its own compiled call, applied
after activation checkpointing and before FSDP (torchtitan's order, where tensor parallelism comes first):

- after activation checkpointing, so the recompute region is traced into the graph (see
  ``parallel/activation_checkpointing.py``: under compile the block's forward calls
  ``torch.utils.checkpoint``, which the compiler turns into a recompute in its own backward graph);
- before FSDP, so FSDP's hooks, which all-gather and free the parameters, stay outside the graph: torch
  runs them eagerly around it (dynamo's ``skip_fsdp_hooks``), and the graph sees whole parameters.

Tensor parallelism is refused with compile (``config.py``). Tried with torch 2.13 on CPU (README, "Compiling blocks"):

- symbolic sizes (``dynamic=True``, or ``dynamic=None`` from the second width on, sequence dim only): tracing the
  backward of a tensor-parallel ``nn.Linear`` on 3-D input never ends (RecursionError). DTensor's linear
  flattens the input with a view; the C++ ``ViewBackward0`` takes ``max(size, 1)`` of a size whose symbol the
  tracer never recorded, the result has the same expression, and its proxy then refers to itself
  (pytorch#152954). Inductor fails as aot_eager does, and so does sequence parallelism; a raised recursion
  limit only recurses deeper.
- fixed sizes (``dynamic=False``, torchtitan's choice at its fixed sequence length) trace, but compile once
  per new width; and the first block's input, a view made by ``DTensor.to_local`` in the embedding's output
  hook, sends its gradient past ``to_local``'s backward (a plain tensor reaches DTensor's redistribution).
- unbacked sizes (``automatic_dynamic_shapes_mark_as="unbacked"``) avoid the recursion but break the graph
  inside attention (``q_length > 1``) and still compile once per width.
- a lead for later: forward hooks that flatten each tensor-parallel linear's input to 2-D (before the
  style's hook) and unflatten its local output, plus a copy of the first block's input, traced with symbolic
  sizes and matched eager with one graph for every width; but the shape the pre-hook leaves for the post-hook
  is a side effect, which breaks the graph inside traced activation checkpointing (nothing compiled), and with
  ``skip_fwd_side_effects_in_bwd_under_checkpoint`` tracing then failed on a DeviceMesh saved for backward.

``Module.compile`` compiles in place: the block keeps its class and its parameter names, so checkpoints,
optimizers and the pipeline split see the same model as without compile.

Blocks compile once, not once each: blocks of one class share the code that runs them, and dynamo guards on
what that code reads, not on which module instance runs it (parameters are graph inputs), so the second block
reuses the first block's graph. A forward that reads a per-block number gets one graph per block instead:
Hugging Face decoders do when they write their KV cache (``cache.layers[self.layer_idx]``), so the module that
calls the blocks runs without a cache while training (nothing reads it back). Generation with a cache compiles
once per block, up to torch's ``recompile_limit`` (8 graphs for the shared code); further blocks then run eagerly.

New sequence lengths: batches padded to their own longest row have a new width nearly every step. Blocks
compile with ``dynamic=True``: the first graph already treats batch and sequence sizes as symbols, so a new
width runs the same kernels without a recompile. (torch's default, ``dynamic=None``, compiles the first width
statically and recompiles once, with symbols, at the first change: two compiles where padded data needs one.)
Sizes 0 and 1 stay specialized: a one-row batch or a one-token sequence compiles once more. Evaluation
(no gradients) and training compile separately. See the README ("Compiling blocks") for the numbers.
"""

from __future__ import annotations

from typing import Iterable, Optional

from torch import nn

from lightning_mp._compat import dynamo_counters
from lightning_mp.parallel.activation_checkpointing import train_without_cache

# One graph serves every width (see the module docstring); measured in benchmarks/peers.py (the "ours+compile" rows).
DYNAMIC_SHAPES = True


def apply_compile(blocks: Iterable[nn.Module], owner: Optional[nn.Module] = None, backend: str = "inductor") -> None:
    """Compile each block's call in place (its hooks included; FSDP's run outside the graph). ``owner`` is the
    module that calls the blocks (e.g. a Hugging Face ``LlamaModel``); ``backend``: torch.compile's."""
    if owner is not None:
        # A Hugging Face decoder writes its KV cache at ``cache.layers[self.layer_idx]``: a per-block number the
        # graph would be specialized on, one compile per block. Training never reads the cache back.
        train_without_cache(owner)
    for block in blocks:
        block.compile(backend=backend, dynamic=DYNAMIC_SHAPES)


def compile_counts() -> dict[str, int]:
    """How much this process compiled so far: ``graphs`` (graphs dynamo captured, recompiles included) and
    ``frames`` (Python frames it tried to compile). For tests and benchmarks: a bounded count is the
    evidence that new widths and further blocks reuse the first graphs."""
    return {"graphs": int(dynamo_counters["stats"]["unique_graphs"]),
            "frames": int(dynamo_counters["frames"]["total"])}
