"""Export a (possibly sharded) Hugging Face model inside a LightningModule as an HF directory, from any
layout, without the full model on any rank.

Each rank writes the chunks it holds (``torch.distributed.checkpoint`` with torch's
``HuggingFaceStorageWriter``: safetensors files with their offsets; chunks replicated on several ranks are
written once), then every rank merges one output file (``model-0000i-of-0000N.safetensors``) from those
pieces, one tensor at a time; rank 0 writes the index, config and tokenizer. Peak memory per rank: its
own shards plus the largest single tensor. Everything is written into a hidden ``.NAME.partial``
sibling and renamed into place when complete, so a crash never leaves a half-written export where a
user expects a model.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import HuggingFaceStorageWriter
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from lightning_mp._compat import consolidate_safetensors_files_on_every_rank
from lightning_mp.checkpoint.io import without_single_process_warning
from lightning_mp.checkpoint.pretrained import INDEX_NAME, WEIGHTS_NAME

_PIECES = "sharded"  # where HuggingFaceStorageWriter puts the per-rank files inside the staging directory


def export_hf_model(module: nn.Module, attribute: str, out_dir: str | Path, tokenizer: Any = None) -> Path | None:
    """Write ``module.<attribute>`` as a Hugging Face directory (safetensors + index, config, tokenizer) that
    ``AutoModel*.from_pretrained`` loads. Collective: every rank calls it. Returns the path on rank 0."""
    out_dir = Path(out_dir).resolve()
    hf_model = module.get_submodule(attribute)
    distributed = dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    state = get_model_state_dict(hf_model, options=StateDictOptions())  # this rank's shards, unsplit FQNs
    tied = set(getattr(hf_model, "all_tied_weights_keys", None) or {})  # save_pretrained writes the source only
    state = {key: value for key, value in state.items() if key not in tied}
    files = _assign_files(_global_sizes(state, distributed), world)
    staging = out_dir.parent / f".{out_dir.name}.partial"
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    _barrier(distributed)
    with without_single_process_warning():
        # No consolidation by the writer: its finish() would merge every file on rank 0 alone.
        dcp.save(state, storage_writer=HuggingFaceStorageWriter(str(staging / _PIECES), fqn_to_index_mapping=files,
                                                                save_distributed=True))
    del state
    consolidate_safetensors_files_on_every_rank(str(staging / _PIECES), str(staging), files)
    if rank == 0:
        shutil.rmtree(staging / _PIECES)
        _name_like_save_pretrained(staging, max(files.values()))
        config = hf_model.config
        config.architectures = [type(hf_model).__name__]
        config.save_pretrained(staging)
        generation = getattr(hf_model, "generation_config", None)
        if generation is not None and getattr(hf_model, "can_generate", lambda: False)():
            generation.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    _barrier(distributed)
    return out_dir if rank == 0 else None


def _barrier(distributed: bool) -> None:
    if distributed:
        dist.barrier()


def _global_sizes(state: dict[str, Any], distributed: bool) -> dict[str, int]:
    """Bytes of every full tensor, over all ranks (pipeline ranks hold different parameters)."""
    mine = {key: value.numel() * value.element_size() for key, value in state.items()
            if isinstance(value, torch.Tensor)}  # a DTensor's numel is its global one
    if not distributed:
        return mine
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    return {key: size for part in parts for key, size in part.items()}


def _assign_files(sizes: dict[str, int], world: int) -> dict[str, int]:
    """Tensor -> output file (1-based), one file per rank at most, balanced by bytes (largest first into
    the lightest file), so that merging takes about the same time and memory on every rank."""
    count = max(1, min(world, len(sizes)))
    load = [0] * count
    files: dict[str, int] = {}
    for key in sorted(sizes, key=lambda k: (-sizes[k], k)):
        lightest = min(range(count), key=lambda i: (load[i], i))
        files[key] = lightest + 1
        load[lightest] += sizes[key]
    return files


def _name_like_save_pretrained(directory: Path, count: int) -> None:
    """One output file is ``model.safetensors`` without an index, as ``save_pretrained`` writes it."""
    if count > 1:
        return
    (directory / "model-00001-of-00001.safetensors").rename(directory / WEIGHTS_NAME)
    (directory / INDEX_NAME).unlink(missing_ok=True)  # written by the merge; a single file needs none
