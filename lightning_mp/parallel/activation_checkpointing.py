"""Activation checkpointing: recompute each block's forward in backward instead of storing its activations."""

from __future__ import annotations

from typing import Iterable

from torch import nn

from lightning_mp._compat import composable_checkpoint


def apply_activation_checkpointing(blocks: Iterable[nn.Module]) -> None:
    # The composable API recomputes a block's forward in backward without wrapping it in a new
    # module, so parameter names (and checkpoints) stay those of the unwrapped model.
    for block in blocks:
        composable_checkpoint(block)
