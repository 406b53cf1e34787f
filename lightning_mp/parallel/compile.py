"""torch.compile, one block at a time.

Each block of the plan (the unit of FSDP and activation checkpointing) gets its own compiled call, applied
after activation checkpointing and before FSDP (torchtitan's order, where tensor parallelism comes first):

- after activation checkpointing, so the recompute region is traced into the graph (see
  ``parallel/activation_checkpointing.py``: under compile the block's forward calls
  ``torch.utils.checkpoint``, which the compiler turns into a recompute in its own backward graph);
- before FSDP, so FSDP's hooks, which all-gather and free the parameters, stay outside the graph: torch
  runs them eagerly around it (dynamo's ``skip_fsdp_hooks``), and the graph sees whole parameters.

With tensor parallelism (torch 2.13, CPU; README, "Compiling blocks"), tracing the backward of a view of a
DTensor whose sizes are symbols never ends (pytorch#152954: the C++ ``ViewBackward0`` takes ``max(size, 1)`` of
a size, gets the same expression back, and its proxy refers to itself), and DTensor's ``linear`` views every
3-D input. So the tensor-parallel linears in the blocks get 2-D inputs (``parallel/tensor.py``,
``prepare_for_compile``): one graph for every width, as without tensor parallelism (loss parallelism included:
the head stays eager). Still refused
(``compile_limits.py``), each failing inside torch:

- sequence parallelism: the linears' inputs are sharded on the sequence dimension, which flattening merges;
- activation checkpointing: the traced recompute saves the DeviceMesh among its tensors (AssertionError in the
  first compiled forward);
- FSDP (data-parallel sharding) of the tensor-parallel parameters: the backward view's size is a product of
  three factors, for which torch's proxy calls a two-argument ``mul`` (TypeError). Replicated data parallelism
  works. With ``dynamic=None`` FSDP compiled, but once more per width (3 graphs after 3 widths).

Tried before and dropped: fixed sizes (``dynamic=False``) compile once per width; unbacked sizes break the graph
inside attention; flattening inside the linear's forward views the DTensor (the same RecursionError); hooks that
kept the shape on the module broke the graph inside traced activation checkpointing.

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

from lightning_mp._compat import dynamo_config, dynamo_counters
from lightning_mp.parallel.activation_checkpointing import train_without_cache

# One graph serves every width (see the module docstring); measured in benchmarks/peers.py (the "ours+compile" rows).
DYNAMIC_SHAPES = True


def apply_compile(blocks: Iterable[nn.Module], owner: Optional[nn.Module] = None, backend: str = "inductor",
                  checkpointed: bool = False) -> None:
    """Compile each block's call in place (its hooks included; FSDP's run outside the graph). ``owner`` is the
    module that calls the blocks (e.g. a Hugging Face ``LlamaModel``); ``backend``: torch.compile's;
    ``checkpointed``: the blocks' forward calls ``torch.utils.checkpoint`` (traced activation checkpointing)."""
    if checkpointed:
        # transformers >= 5.25 routes attention through the ``kernels`` package, whose forward wrapper sets and
        # restores a module-level variable. Inside a traced checkpoint that write is a side effect dynamo refuses
        # (graph break), and the whole block then runs eagerly: nothing compiled. The write only selects which
        # attention function the forward calls; the recompute in backward does not need it replayed.
        dynamo_config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
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
