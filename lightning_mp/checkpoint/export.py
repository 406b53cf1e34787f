"""Export a (possibly sharded) Hugging Face model inside a LightningModule as an HF directory, from any
layout, with no more than one rank's own shards in memory on any rank.

The output files are laid out first (which tensor goes into which ``model-0000i-of-0000N.safetensors`` at
which byte offset: standard safetensors headers, computed from the global shapes every rank reports);
rank 0 creates them at their final size, then every rank writes the chunks it holds straight to their
bytes in those files (a chunk held by several ranks, e.g. replicated over tensor-parallel peers, is
written by the lowest of them). No tensor is gathered: peak memory is the rank's shards plus one chunk
copied to the host. torch's ``HuggingFaceStorageWriter`` (used in the first version) is not used: its
writer builds each rank's whole file as one bytes object (``safetensors.torch.save``: another copy of all
its shards) and its merge step (``consolidate_safetensors_files``) holds each full tensor in turn.

Everything is written into a hidden ``.NAME.partial`` sibling and renamed into place when complete, so a
crash never leaves a half-written export where a user expects a model. The directory needs to be on a
filesystem every rank sees (as for distributed checkpoints).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

from lightning_mp.checkpoint.safetensors_files import INDEX_NAME, SAFETENSORS_DTYPES, WEIGHTS_NAME


def export_hf_model(module: nn.Module, attribute: str, out_dir: str | Path, tokenizer: Any = None) -> Path | None:
    """Write ``module.<attribute>`` as a Hugging Face directory (safetensors, index when several files,
    config, tokenizer) that ``AutoModel*.from_pretrained`` loads. Collective: every rank calls it. Returns
    the path on rank 0, None elsewhere."""
    out_dir = Path(out_dir).resolve()
    hf_model = module.get_submodule(attribute)
    distributed = dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    state = get_model_state_dict(hf_model, options=StateDictOptions())  # this rank's shards, unsplit FQNs
    tied = set(getattr(hf_model, "all_tied_weights_keys", None) or {})  # save_pretrained writes the source only
    state = {key: value for key, value in state.items() if key not in tied and isinstance(value, Tensor)}
    chunks = {key: _chunk(value) for key, value in state.items()}  # key -> (global shape, dtype, offsets, sizes)
    everyone = _all_gather(chunks, distributed, world)
    shapes = {key: (shape, dtype) for part in everyone for key, (shape, dtype, _, _) in part.items()}
    writer = {}  # (key, offsets, sizes) -> the lowest rank holding that chunk; empty chunks (an FSDP rank
    for holder, part in enumerate(everyone):  # past the end of a short tensor) have nothing to write
        for key, (_, _, offsets, sizes) in part.items():
            if math.prod(sizes):
                writer.setdefault((key, offsets, sizes), holder)
    layout = _layout(shapes, world)
    staging = out_dir.parent / f".{out_dir.name}.partial"
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for name, (header, size) in layout.files.items():
            with open(staging / name, "wb") as handle:
                handle.write(header)
                handle.truncate(size)  # sparse until every rank has written its chunks
    _barrier(distributed)
    for key, value in state.items():
        shape, dtype, offsets, sizes = chunks[key]
        if writer.get((key, offsets, sizes)) == rank:
            _write_chunk(staging, layout, key, value, (shape, dtype, offsets))
    del state
    _barrier(distributed)
    if rank == 0:
        _finish(staging, layout, hf_model, tokenizer)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    _barrier(distributed)
    return out_dir if rank == 0 else None


def _barrier(distributed: bool) -> None:
    if distributed:
        dist.barrier()


def _all_gather(mine: Any, distributed: bool, world: int) -> list[Any]:
    if not distributed:
        return [mine]
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, mine)
    return parts


def _chunk(value: Tensor) -> tuple[tuple[int, ...], torch.dtype, tuple[int, ...], tuple[int, ...]]:
    """(global shape, dtype, offsets and sizes of this rank's chunk in the global tensor)."""
    if isinstance(value, DTensor):
        # The DTensor's own description of its local chunk (the protocol torch.distributed.checkpoint uses),
        # right for every placement, including FSDP's strided shards over tensor parallelism.
        (chunk,) = value.__create_chunk_list__()
        return tuple(value.shape), value.dtype, tuple(chunk.offsets), tuple(chunk.sizes)
    return tuple(value.shape), value.dtype, (0,) * value.ndim, tuple(value.shape)


class _Layout:
    """Which file and byte offset every tensor has; each file's header and total size."""

    def __init__(self) -> None:
        self.place: dict[str, tuple[str, int]] = {}  # key -> (file name, absolute offset of its first byte)
        self.files: dict[str, tuple[bytes, int]] = {}  # file name -> (header bytes, file size)


def _layout(shapes: dict[str, tuple[tuple[int, ...], torch.dtype]], world: int) -> _Layout:
    """One file per rank at most, balanced by bytes (largest tensor first into the lightest file), in
    ``save_pretrained``'s naming: ``model.safetensors`` when there is one file."""
    for key, (_, dtype) in shapes.items():
        if dtype not in SAFETENSORS_DTYPES:
            raise TypeError(f"cannot export {key}: dtype {dtype} has no safetensors code.")
    nbytes = {key: math.prod(shape) * dtype.itemsize for key, (shape, dtype) in shapes.items()}
    count = max(1, min(world, len(shapes)))
    groups: list[list[str]] = [[] for _ in range(count)]
    load = [0] * count
    for key in sorted(nbytes, key=lambda k: (-nbytes[k], k)):
        lightest = min(range(count), key=lambda i: (load[i], i))
        groups[lightest].append(key)
        load[lightest] += nbytes[key]
    layout = _Layout()
    for index, keys in enumerate(groups, start=1):
        name = WEIGHTS_NAME if count == 1 else f"model-{index:05d}-of-{count:05d}.safetensors"
        entries: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for key in sorted(keys):
            shape, dtype = shapes[key]
            entries[key] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes[key]]}
            offset += nbytes[key]
        text = json.dumps(entries, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        header = len(text).to_bytes(8, "little") + text
        for key in keys:
            layout.place[key] = (name, len(header) + entries[key]["data_offsets"][0])
        layout.files[name] = (header, len(header) + offset)
    return layout


def _write_chunk(directory: Path, layout: _Layout, key: str, value: Tensor,
                 chunk: tuple[tuple[int, ...], torch.dtype, tuple[int, ...]]) -> None:
    """Write this rank's chunk of ``key`` into its bytes of the output file: one contiguous run per index of
    the leading dimensions in which the chunk does not span the whole tensor."""
    shape, dtype, offsets = chunk
    local = value.to_local() if isinstance(value, DTensor) else value
    if local.numel() == 0:
        return
    local = local.detach().to("cpu").contiguous()
    sizes = tuple(local.shape)
    # Dimensions from `split` on are written in one run: every one after it spans the whole tensor.
    split = max([d for d in range(len(shape)) if sizes[d] != shape[d]], default=0)
    strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
    raw = local.view(-1).view(torch.uint8).numpy() if local.ndim else local.reshape(1).view(torch.uint8).numpy()
    run = math.prod(sizes[split:]) * dtype.itemsize if sizes else dtype.itemsize
    name, start = layout.place[key]
    fd = os.open(directory / name, os.O_WRONLY)
    try:
        for number, index in enumerate(itertools.product(*(range(n) for n in sizes[:split]))):
            element = sum((offsets[d] + i) * strides[d] for d, i in enumerate(index))
            element += (offsets[split] * strides[split]) if sizes else 0
            data = memoryview(raw[number * run:(number + 1) * run])
            written = os.pwrite(fd, data, start + element * dtype.itemsize)
            if written != len(data):
                raise OSError(f"short write exporting {key} to {directory / name}: {written} of {len(data)} bytes.")
    finally:
        os.close(fd)


def _finish(directory: Path, layout: _Layout, hf_model: nn.Module, tokenizer: Any) -> None:
    if len(layout.files) > 1:
        total = sum(size - len(header) for header, size in layout.files.values())
        index = {"metadata": {"total_size": total}, "weight_map": {k: f for k, (f, _) in sorted(layout.place.items())}}
        (directory / INDEX_NAME).write_text(json.dumps(index, indent=2))
    config = hf_model.config
    config.architectures = [type(hf_model).__name__]  # as save_pretrained records it
    config.save_pretrained(directory)
    generation = getattr(hf_model, "generation_config", None)
    if generation is not None and callable(getattr(hf_model, "can_generate", None)) and hf_model.can_generate():
        generation.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
