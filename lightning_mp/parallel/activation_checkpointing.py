"""Activation checkpointing: recompute each block's forward in backward instead of storing its activations.

``"full"`` keeps only each block's input and recomputes the whole block in backward (the least memory,
one extra forward). ``"selective"`` keeps the outputs of the expensive ops (matrix multiplications,
attention kernels, and the tensor-parallel collectives, so no communication is repeated) and recomputes
only the cheap element-wise ones (norms, activations, dropout with its saved RNG state, residual adds):
most of the memory of the element-wise intermediates goes, almost none of the compute comes back
(torchtitan's op-level policy, without its "every second matmul" refinement).
"""

from __future__ import annotations

import inspect
import types
import weakref
from functools import partial
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from lightning_mp._compat import composable_checkpoint, functional_collectives

_aten = torch.ops.aten
# The default overloads: what autograd dispatches to during a forward.
KEPT_OPS = frozenset(op.default for op in (
    _aten.mm, _aten.addmm, _aten.bmm, _aten.baddbmm,
    # scaled_dot_product_attention's kernels (CPU, flash, memory-efficient, cuDNN)
    _aten._scaled_dot_product_flash_attention_for_cpu,
    _aten._scaled_dot_product_flash_attention,
    _aten._scaled_dot_product_efficient_attention,
    _aten._scaled_dot_product_cudnn_attention,
    functional_collectives.all_reduce, functional_collectives.reduce_scatter_tensor,
    functional_collectives.all_gather_into_tensor,
))


# Called with every output selective checkpointing keeps (in forward): torch stores those outside autograd's
# saved tensors, where saved-tensor hooks cannot see them; ``planner.measure.SavedActivationBytes`` counts them.
kept_output_watchers: list[Callable[[Any], None]] = []


def _keep_expensive_ops(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    if op not in KEPT_OPS:
        return CheckpointPolicy.PREFER_RECOMPUTE
    if kept_output_watchers and not ctx.is_recompute:
        for watch in kept_output_watchers:
            watch(ctx.op_output)
    return CheckpointPolicy.MUST_SAVE


def apply_activation_checkpointing(blocks: Iterable[nn.Module], mode: str = "full",
                                   owner: Optional[nn.Module] = None, traced: bool = False) -> None:
    """Checkpoint each block; ``owner`` is the module that calls them (e.g. a Hugging Face ``LlamaModel``).
    ``traced``: the blocks are compiled next (``parallel/compile.py``); their forward then calls
    ``torch.utils.checkpoint`` itself, which the compiler traces into one graph with the recompute in its
    backward, instead of the composable hooks, which enter autograd's saved-tensor hooks from outside the graph."""
    if owner is not None:
        # A KV cache written in a block's forward would be written again when backward replays the block (keys
        # twice as long: a shape error, or wrong attention where shapes happen to fit). Hugging Face's own
        # gradient checkpointing turns the cache off for the same reason.
        train_without_cache(owner)
    # The composable API recomputes a block's forward in backward without wrapping it in a new
    # module, so parameter names (and checkpoints) stay those of the unwrapped model.
    options = {} if mode == "full" else {"context_fn": partial(create_selective_checkpoint_contexts,
                                                               _keep_expensive_ops)}
    for block in blocks:
        if traced:
            # Bound to the block, so a deep copy of the block calls its own forward.
            block.forward = types.MethodType(_checkpointed_forward(options), block)
        else:
            composable_checkpoint(block, **options)


def _checkpointed_forward(options: dict[str, Any]) -> Callable[..., Any]:
    def forward(block: nn.Module, *args: Any, **kwargs: Any) -> Any:
        # The class's forward: hooks (FSDP's all-gather) stay outside the recomputed region, as with the hooks.
        return checkpoint(type(block).forward, block, *args, use_reentrant=False, **options, **kwargs)

    return forward


_WITHOUT_CACHE: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def train_without_cache(owner: nn.Module) -> None:
    """Call ``owner`` (the module that runs the blocks, e.g. a Hugging Face ``LlamaModel``) with ``use_cache=False``
    whenever it trains with gradients: a training forward never reads a KV cache back. Once per owner; a no-op
    for modules without a ``use_cache`` argument."""
    if owner in _WITHOUT_CACHE or "use_cache" not in inspect.signature(owner.forward).parameters:
        return
    owner.register_forward_pre_hook(_no_cache_while_training, with_kwargs=True)
    _WITHOUT_CACHE.add(owner)


def _no_cache_while_training(module: nn.Module, args: tuple, kwargs: dict) -> Optional[tuple[tuple, dict]]:
    if module.training and torch.is_grad_enabled() and kwargs.get("use_cache") is not False:
        return args, {**kwargs, "use_cache": False}
    return None
