"""Pretrained Hugging Face weights for models larger than one host.

``from_pretrained(cls, path, **kwargs)`` builds the model on the meta device (no memory) and records where
its weights are; the strategy loads each rank's slices after tensor/pipeline/FSDP sharding and before
the optimizer exists (:func:`load_pending`). No rank ever holds more than its own shards plus one slice.

Reading: ``torch.distributed.checkpoint`` with torch's ``HuggingFaceStorageReader``. It reads every
tensor with safetensors' lazy ``get_slice`` (only the bytes of this rank's chunk leave the file) and
works out each rank's chunk from the DTensor's own public chunk protocol, for every composition of
FSDP (including the strided shards of FSDP over tensor parallelism), tensor parallelism and pipeline
stages. Calling ``get_slice`` ourselves would read the same bytes but need torch's private
``compute_local_shape_and_global_offset`` and our own copy of that bookkeeping.

What ``from_pretrained`` computes itself, it computes exactly as transformers does, at the same moment:
parameters missing from the checkpoint (a new head) are initialised by the model's own
``initialize_weights`` with the global RNG at construction time (bit-identical to ``cls.from_pretrained``
under the same seed, hence identical on every rank), and non-persistent buffers (BERT's ``position_ids``,
rotary ``inv_freq``), which ``to_empty`` leaves as uninitialised memory, are computed by the same
``_init_weights`` transformers runs when it loads on meta. Both are small; they are kept on the CPU and
copied into the shards after materialization.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint import HuggingFaceStorageReader
from torch.futures import Future

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
_ATTRIBUTE = "_lightning_mp_pretrained"  # on the HF model: where its weights are (our own attribute)


@dataclass
class PretrainedSource:
    """What the strategy needs to fill a meta-built model: checkpoint names and the values computed here."""

    directory: Path
    checkpoint_name: dict[str, str]  # model FQN -> key in the safetensors files
    initial: dict[str, Tensor] = field(default_factory=dict)  # missing parameters and non-persistent buffers


# ---------------------------------------------------------------- reading headers (no tensor data)
def _read_header(file: Path) -> dict[str, Any]:
    """The safetensors header of ``file``; raises naming the file if it is missing, truncated or not safetensors."""
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
    return header


def checkpoint_files(directory: Path) -> dict[str, tuple[Path, dict[str, Any]]]:
    """Every tensor of the checkpoint in ``directory``: key -> (file, header entry). Single file or index."""
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
    entries: dict[str, tuple[Path, dict[str, Any]]] = {}
    for name in files:
        header = _read_header(directory / name)
        for key, entry in header.items():
            entries[key] = (directory / name, entry)
    if weight_map is not None:
        absent = [key for key, name in weight_map.items() if entries.get(key, (None,))[0] != directory / name]
        if absent:
            raise ValueError(f"{index} lists tensors its files do not hold: {', '.join(absent[:6])}.")
    return entries


def _model_directory(path: str | os.PathLike) -> Path:
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise ValueError(f"lightning_mp.from_pretrained: {str(path)!r} is not a directory; give a local model"
                         " directory (config.json + model.safetensors), e.g. one written by save_pretrained"
                         " or downloaded with huggingface_hub.snapshot_download.")
    if not (directory / CONFIG_NAME).is_file():
        raise ValueError(f"lightning_mp.from_pretrained: {directory} has no {CONFIG_NAME}: not a model directory.")
    return directory.resolve()


# ---------------------------------------------------------------- building on meta
def from_pretrained(cls: Any, path: str | os.PathLike, **kwargs: Any) -> nn.Module:
    """``cls.from_pretrained(path, **kwargs)`` without reading the weights: the model is built on the meta
    device and the strategy loads each rank's shards into it after parallelizing (``cls`` may be an
    ``AutoModel*`` class or a concrete model class; ``kwargs`` as for ``from_pretrained``, e.g. ``num_labels``).

    Checks before returning: the directory, every safetensors file (present, complete) and every tensor's
    shape against the model the config describes.
    """
    from transformers import AutoConfig

    directory = _model_directory(path)
    entries = checkpoint_files(directory)
    dtype = kwargs.pop("dtype", kwargs.pop("torch_dtype", "auto"))
    is_auto = hasattr(cls, "_model_mapping")
    config_class = AutoConfig if is_auto else cls.config_class
    config, model_kwargs = config_class.from_pretrained(str(directory), return_unused_kwargs=True, **kwargs)
    if is_auto and type(config) not in cls._model_mapping:
        raise ValueError(f"{cls.__name__} has no model class for {type(config).__name__} ({directory}).")
    model_class = cls._model_mapping[type(config)] if is_auto else cls
    dtype = _resolve_dtype(dtype, config, entries)
    from transformers.utils.generic import ContextManagers

    with ContextManagers(model_class.get_init_context(dtype, False, False, None)):
        model = model_class(config, **model_kwargs)
    config.name_or_path = str(directory)
    names = _checkpoint_names(model, entries)
    missing = set(model.state_dict()) - set(names)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    if tied & set(dict(model.named_parameters(remove_duplicate=False))):
        raise NotImplementedError(
            f"{model_class.__name__} ties {', '.join(sorted(tied))} to other parameters; sharded loading does not"
            " keep ties yet. Load it with tie_word_embeddings=False, or with the class's own from_pretrained.")
    _check_shapes(model, names, entries, directory)
    source = PretrainedSource(directory, names, _initial_values(model, missing))
    setattr(model, _ATTRIBUTE, source)
    return model.eval()  # as from_pretrained returns it


def _resolve_dtype(dtype: Any, config: Any, entries: dict) -> torch.dtype:
    """transformers' ``dtype="auto"``: the config's dtype, else the checkpoint's first floating dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype != "auto":
        return getattr(torch, dtype)
    configured = getattr(config, "dtype", None)
    if isinstance(configured, torch.dtype):
        return configured
    if isinstance(configured, str) and configured != "auto":
        return getattr(torch, configured)
    codes = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
    return next((codes[e["dtype"]] for _, e in entries.values() if e["dtype"] in codes), torch.float32)


def _checkpoint_names(model: nn.Module, entries: dict) -> dict[str, str]:
    """Model FQN -> checkpoint key, renamed as transformers renames (legacy names, base-model prefix)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta_state = model.state_dict()
    names: dict[str, str] = {}
    for key in sorted(entries):
        renamed, converted = rename_source_key(key, renamings, converters, model.base_model_prefix, meta_state)
        if renamed not in meta_state and key in meta_state:
            renamed, converted = key, None
        if converted is not None:
            raise NotImplementedError(f"checkpoint tensor {key!r} must be converted ({converted!r}) to load into"
                                      f" {type(model).__name__}; sharded loading reads tensors as stored.")
        if renamed in meta_state:
            names[renamed] = key
    return names


def _check_shapes(model: nn.Module, names: dict[str, str], entries: dict, directory: Path) -> None:
    state = model.state_dict()
    wrong = [f"{key} (checkpoint {list(entries[names[key]][1]['shape'])}, model {list(state[key].shape)})"
             for key in names if list(entries[names[key]][1]["shape"]) != list(state[key].shape)]
    if wrong:
        raise ValueError(f"checkpoint {directory} does not match the model its config describes: "
                         f"{'; '.join(wrong[:6])}{' ...' if len(wrong) > 6 else ''}.")
    if not names:
        raise ValueError(f"checkpoint {directory} holds none of the tensors of {type(model).__name__}"
                         f" (checkpoint keys: {', '.join(sorted(entries)[:6])}).")


def _set_tensor(model: nn.Module, name: str, value: Tensor) -> None:
    owner_path, _, attribute = name.rpartition(".")
    owner = model.get_submodule(owner_path)
    old = getattr(owner, attribute)
    setattr(owner, attribute, nn.Parameter(value, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter)
            else value)


def _initial_values(model: nn.Module, missing: set[str]) -> dict[str, Tensor]:
    """Values of the missing parameters and of every non-persistent buffer, computed by the model's own
    ``initialize_weights`` exactly as ``from_pretrained`` does after loading (same RNG draws, same order);
    everything loaded from the checkpoint stays on meta and is marked initialised, so it is skipped."""
    computed = missing | {name for name, _ in model.named_non_persistent_buffers()}
    for name in computed:
        _set_tensor(model, name, torch.empty_like(model.get_parameter_or_buffer(name), device="cpu"))
    marked = [t for name, t in model.state_dict(keep_vars=True).items() if name not in computed]
    for tensor in marked:
        tensor._is_hf_initialized = True  # transformers' own flag: its init functions skip these
    try:
        model.initialize_weights()
        values = {name: model.get_parameter_or_buffer(name).detach().clone() for name in computed}
    finally:
        for tensor in marked:
            del tensor._is_hf_initialized
        for module in model.modules():
            vars(module).pop("_is_hf_initialized", None)
    for name in computed:  # back to meta: the strategy materializes the sharded model in one go
        _set_tensor(model, name, torch.empty_like(values[name], device="meta"))
    return values


# ---------------------------------------------------------------- loading into the sharded model
def pending_sources(module: nn.Module) -> list[tuple[str, PretrainedSource]]:
    """(path inside ``module``, source) of every model built by :func:`from_pretrained` and not loaded yet."""
    return [(path, getattr(sub, _ATTRIBUTE)) for path, sub in module.named_modules() if hasattr(sub, _ATTRIBUTE)]


def load_pending(module: nn.Module, pending: list[tuple[str, PretrainedSource]], device: torch.device) -> None:
    """Materialize each pretrained model found before sharding (at the same path: under a pipeline the
    rank's shell sits there) on ``device`` and fill it: checkpoint tensors, then the values computed at
    construction. Collective (every rank calls it, in the same order)."""
    for path, source in pending:
        model = module.get_submodule(path)
        model.to_empty(device=device)  # this model only: other state in the LightningModule keeps its values
        load_weights(model, source)
        vars(model).pop(_ATTRIBUTE, None)  # loaded once: a second fit keeps the trained weights


class SliceReader(HuggingFaceStorageReader):
    """torch's reader, opening the file per tensor. torch's keeps a file open (memory-mapped) while it reads
    all of this rank's slices from it, and touched pages of a mapped file count as the process's resident
    memory until it is closed: a rank reading a quarter of every tensor of one 10 GB file would hold 2.5 GB
    of mapped pages on top of its shards. Per tensor, at most one tensor's pages are mapped."""

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


def load_weights(model: nn.Module, source: PretrainedSource) -> None:
    """Read this rank's share of every checkpoint tensor into ``model`` (materialized, any layout)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    from lightning_mp.checkpoint.io import last_line, without_single_process_warning
    from lightning_mp.checkpoint.state import shard_like

    state = get_model_state_dict(model, options=StateDictOptions())
    wanted = {source.checkpoint_name[fqn]: tensor for fqn, tensor in state.items() if fqn in source.checkpoint_name}
    try:
        with without_single_process_warning():
            dcp.load(wanted, storage_reader=SliceReader(str(source.directory)))
    except (Exception, CheckpointException) as error:  # CheckpointException is a BaseException
        raise RuntimeError(f"cannot read the pretrained weights in {source.directory}: {last_line(error)}") from error
    with torch.no_grad():
        for fqn, value in source.initial.items():
            if fqn in state:  # a parameter this rank holds (pipeline ranks hold their stages only)
                state[fqn].copy_(shard_like(value, state[fqn]))
    set_model_state_dict(model, state, options=StateDictOptions(strict=False))
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for fqn, value in source.initial.items():
            if fqn in buffers:
                buffers[fqn].copy_(value)
    unfilled = set(state) - set(source.checkpoint_name) - set(source.initial)
    if unfilled:
        raise RuntimeError(f"pretrained loading left {', '.join(sorted(unfilled)[:6])} uninitialised.")


def meta_outside(module: nn.Module, paths: list[str]) -> bool:
    """Whether ``module`` holds meta tensors outside the submodules at ``paths``."""
    subs = [module.get_submodule(path) for path in paths]
    inside = {id(t) for sub in subs for t in (*sub.parameters(), *sub.buffers())}
    return any(t.is_meta and id(t) not in inside for t in (*module.parameters(), *module.buffers()))


def is_meta(model: nn.Module) -> bool:
    return any(t.is_meta for t in (*model.parameters(), *model.buffers()))


def materialize(model: nn.Module, device: Optional[torch.device | str] = None) -> nn.Module:
    """Load a model built by :func:`from_pretrained` whole, in this process (no strategy, e.g. for
    ``load_from_checkpoint`` or inference on one device)."""
    pending = pending_sources(model)
    load_pending(model, pending, torch.device(device or "cpu"))
    return model
