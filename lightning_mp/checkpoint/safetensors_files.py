"""The safetensors files of a Hugging Face checkpoint directory: which files and tensors belong to it, their
headers (read without tensor data), and the reader that gives each rank only its slices.

Which files: ``model.safetensors.index.json``'s ``weight_map`` when there is one, else ``model.safetensors``;
nothing else in the directory. torch's ``HuggingFaceStorageReader`` lists every ``*.safetensors`` file in
the directory instead, and when two files hold the same name the one listed last wins: a stray file (an old
``model.safetensors`` beside a sharded copy, a consolidated export) would silently replace the weights the
index names. :class:`SliceReader` builds its metadata from the files chosen here.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import HuggingFaceStorageReader
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.futures import Future

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3",
                      torch.float8_e5m2: "F8_E5M2"}
TORCH_DTYPES = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}
_COMPARE_BYTES = 16 << 20  # bytes compared at a time when two stored tensors are checked for equality

Entries = dict[str, tuple[Path, dict[str, Any]]]  # key -> (file, header entry: dtype, shape, data_offsets)


def _read_header(file: Path) -> tuple[dict[str, Any], int]:
    """The safetensors header of ``file`` and where its data starts; raises naming the file if it is missing,
    truncated or not safetensors."""
    if not file.is_file():
        raise FileNotFoundError(f"safetensors file {file} does not exist.")
    size = file.stat().st_size
    with open(file, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{file} is not a safetensors file: {size} bytes, shorter than its 8-byte header length.")
        (length,) = struct.unpack("<Q", prefix)
        if length > size - 8:
            raise ValueError(f"{file} is truncated or not a safetensors file: its header claims {length} bytes,"
                             f" the file has {size}.")
        try:
            header = json.loads(handle.read(length))
        except ValueError as error:
            raise ValueError(f"{file} is not a safetensors file: its header is not JSON ({error}).") from None
    header.pop("__metadata__", None)
    end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
    if 8 + length + end > size:
        raise ValueError(f"{file} is truncated: its tensors need {8 + length + end} bytes, the file has {size}"
                         " (an interrupted download or copy?).")
    return header, 8 + length


def checkpoint_files(directory: Path) -> Entries:
    """Every tensor of the checkpoint in ``directory``: key -> (file, header entry). Single file or index;
    other safetensors files in the directory are not part of the checkpoint."""
    index = directory / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map")
        except ValueError as error:
            raise ValueError(f"{index} is not JSON ({error}).") from None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no 'weight_map': not a safetensors index.")
        files = sorted(set(weight_map.values()))
    elif (directory / WEIGHTS_NAME).is_file():
        weight_map, files = None, [WEIGHTS_NAME]
    else:
        present = sorted(p.name for p in directory.iterdir())[:12]
        raise ValueError(f"{directory} holds no {WEIGHTS_NAME} or {INDEX_NAME} (files: {', '.join(present)});"
                         " lightning_mp.from_pretrained reads safetensors checkpoints (save_pretrained writes them).")
    entries: Entries = {}
    for name in files:
        header, start = _read_header(directory / name)
        for key, entry in header.items():
            if weight_map is None or weight_map.get(key) == name:  # a file's tensors the index does not name: not ours
                entries[key] = (directory / name, {**entry, "data_start": start})
    if weight_map is not None:
        absent = [key for key, name in weight_map.items() if entries.get(key, (None,))[0] != directory / name]
        if absent:
            raise ValueError(f"{index} lists tensors its files do not hold: {', '.join(absent[:6])}.")
    return entries


def same_bytes(first: tuple[Path, dict[str, Any]], second: tuple[Path, dict[str, Any]]) -> bool:
    """Whether two stored tensors are identical (dtype, shape and bytes), read a few MiB at a time: what
    transformers checks (with ``torch.equal`` on the loaded tensors) before tying two names the checkpoint
    both holds. Bytes and values differ only for -0.0 against 0.0 and NaNs."""
    (file_a, a), (file_b, b) = first, second
    if a["dtype"] != b["dtype"] or list(a["shape"]) != list(b["shape"]):
        return False
    (begin_a, end_a), (begin_b, _) = a["data_offsets"], b["data_offsets"]
    remaining = end_a - begin_a
    with open(file_a, "rb") as handle_a, open(file_b, "rb") as handle_b:
        handle_a.seek(a["data_start"] + begin_a)
        handle_b.seek(b["data_start"] + begin_b)
        while remaining > 0:
            step = min(remaining, _COMPARE_BYTES)
            if handle_a.read(step) != handle_b.read(step):
                return False
            remaining -= step
    return True


@dataclass(frozen=True)
class _Stored:
    relative_path: str  # the name torch's HF reader gives the file of a tensor (an absolute path here)


class SliceReader(HuggingFaceStorageReader):
    """torch's reader, reading only the checkpoint's own files and opening the file per tensor.

    Metadata: from :func:`checkpoint_files` (the index's files, or ``model.safetensors``), not from every
    ``*.safetensors`` in the directory (see the module docstring).

    Reading: torch's keeps a file open (memory-mapped) while it reads all of this rank's slices from it, and
    touched pages of a mapped file count as the process's resident memory until it is closed: a rank reading
    a quarter of every tensor of one 10 GB file would hold 2.5 GB of mapped pages on top of its shards. Per
    tensor, at most one tensor's pages are mapped."""

    def __init__(self, path: str, thread_count: int = 1) -> None:
        super().__init__(path, thread_count=thread_count)
        self._directory = Path(path)

    def read_metadata(self) -> Metadata:
        state: dict[str, TensorStorageMetadata] = {}
        storage: dict[MetadataIndex, _Stored] = {}
        for key, (file, entry) in checkpoint_files(self._directory).items():
            if entry["dtype"] not in TORCH_DTYPES:
                raise ValueError(f"{file}: tensor {key} has dtype {entry['dtype']}, which lightning_mp does not read"
                                 f" (it reads {', '.join(TORCH_DTYPES)}).")
            shape = torch.Size(entry["shape"])
            origin = torch.Size([0] * len(shape))
            state[key] = TensorStorageMetadata(properties=TensorProperties(dtype=TORCH_DTYPES[entry["dtype"]]),
                                               size=shape, chunks=[ChunkStorageMetadata(offsets=origin, sizes=shape)])
            storage[MetadataIndex(fqn=key, offset=origin)] = _Stored(str(file))
        metadata = Metadata(state_dict_metadata=state, storage_data=storage)  # type: ignore[arg-type]
        metadata.storage_meta = StorageMeta(load_id=self.load_id)
        return metadata

    def read_data(self, plan: Any, planner: Any) -> Future:
        from safetensors import safe_open

        for item in plan.items:
            file = self.storage_data[item.storage_index].relative_path
            chunk = tuple(slice(o, o + n) for o, n in zip(item.storage_offsets, item.lengths))
            with safe_open(file, framework="pt") as handle:
                value = handle.get_slice(item.storage_index.fqn)[chunk]
            target = planner.resolve_tensor(item).detach()
            if target.shape != value.shape:
                raise ValueError(f"{item.storage_index.fqn} in {file}: chunk {tuple(value.shape)},"
                                 f" expected {tuple(target.shape)}.")
            target.copy_(value)
            planner.commit_tensor(item, target)
        done: Future = Future()
        done.set_result(None)
        return done
