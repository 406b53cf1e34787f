"""Per-rank random state in checkpoints: dropout masks differ by rank, so a resumed run must continue
every rank's own streams to draw what the interrupted one would have."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from lightning_mp._compat import collect_rng_states, set_rng_states

RNG_KEY = "rng_states_per_rank"


def rng_state() -> dict[str, Any]:
    """This process's random state (torch, CUDA, numpy, Python) in types ``torch.load(weights_only=True)``
    accepts, so a checkpoint stays loadable by ``LightningModule.load_from_checkpoint``."""
    state = collect_rng_states()
    if "numpy" in state:
        name, keys, position, has_gauss, cached = state["numpy"]
        state["numpy"] = (name, torch.from_numpy(keys.astype("int64")), int(position), int(has_gauss), float(cached))
    return state


def with_rng_states(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """``checkpoint`` plus every rank's random state (dropout masks differ by rank), so a resumed run draws
    what the interrupted one would have. Collective."""
    states: list[Any] = [rng_state()]
    if dist.is_initialized():
        states = [None] * dist.get_world_size()
        dist.all_gather_object(states, rng_state())
    return {**checkpoint, RNG_KEY: states}


def restore_rng_states(rest: dict[str, Any]) -> None:
    """Take this rank's random state out of a loaded checkpoint; applied when the world size is the same
    (another layout size has other streams: nothing to continue)."""
    states = rest.pop(RNG_KEY, None)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if states is not None and len(states) == world:
        set_rng_state(states[rank])


def set_rng_state(state: dict[str, Any]) -> None:
    state = dict(state)
    if "numpy" in state:
        import numpy as np

        name, keys, position, has_gauss, cached = state["numpy"]
        state["numpy"] = (name, keys.numpy().astype(np.uint32), position, has_gauss, cached)
    set_rng_states(state)
