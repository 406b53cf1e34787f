"""Pretrained Hugging Face weights for models larger than one host.

``from_pretrained(cls, path, **kwargs)`` builds the model on the meta device (no memory) and records where
its weights are; the strategy loads each rank's slices after tensor/pipeline/FSDP sharding and before
the optimizer exists (:func:`load_pending`). No rank ever holds more than its own shards plus one slice.

Reading: ``torch.distributed.checkpoint`` with a subclass of torch's ``HuggingFaceStorageReader``
(``safetensors_files.SliceReader``: only the checkpoint's own files, one file open at a time). It reads every
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

Tied weights are tied on meta by transformers' own ``tie_weights`` with the checkpoint's missing keys (its
rules, see :func:`from_pretrained`), so the plans see the tie (kept replicated over tensor ranks, split
into two stage copies by a pipeline); every name of a tied group reads the one stored entry.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from lightning_mp.checkpoint.safetensors_files import SliceReader, checkpoint_files, same_bytes

CONFIG_NAME = "config.json"
_ATTRIBUTE = "_lightning_mp_pretrained"  # on the HF model: where its weights are (our own attribute)


@dataclass
class PretrainedSource:
    """What the strategy needs to fill a meta-built model: checkpoint names and the values computed here."""

    directory: Path
    checkpoint_name: dict[str, str]  # model FQN -> key in the safetensors files
    initial: dict[str, Tensor] = field(default_factory=dict)  # missing parameters and non-persistent buffers
    ties: list[tuple[str, ...]] = field(default_factory=list)  # FQNs that are one parameter (tied weights)


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

    Tied weights (``tie_word_embeddings``, BERT's MLM decoder) are tied here as transformers ties them after
    loading: the target becomes the source's parameter (one tensor, read once: HF checkpoints of tied models
    hold only the source's name), the other way round when the checkpoint holds only the target, and not at
    all when it holds both with different values (transformers warns and keeps both). ``to_empty`` in the
    strategy makes a new parameter per module; :func:`load_pending` ties them again. Under a pipeline the
    first and last stage hold separate copies of the one parameter (``pipeline/tied.py``), each filled from
    the same checkpoint entry.
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
    _check_shapes(model, names, entries, directory)
    stored_twice = _untie_differing(model, names, entries)
    # transformers initialises what the checkpoint lacks, except tied targets (they are about to be tied), then ties.
    missing = set(model.state_dict()) - set(names) - set(getattr(model, "all_tied_weights_keys", None) or {})
    initial = _initial_values(model, missing)
    ties = _tie(model, names, initial, stored_twice)
    setattr(model, _ATTRIBUTE, PretrainedSource(directory, names, initial, ties))
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


def _untie_differing(model: nn.Module, names: dict[str, str], entries: dict) -> set[str]:
    """Tied targets the checkpoint holds too. Stored with the source's bytes they are tied (returned); stored
    with other values transformers keeps both, untied, with a warning: so do we (dropped from the ties)."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    same = set()
    for target, source in list(tied.items()):
        if target in names and source in names:
            if same_bytes(entries[names[target]], entries[names[source]]):
                same.add(target)
            else:
                warnings.warn(f"the checkpoint holds {names[source]!r} and {names[target]!r} with different values,"
                              f" though {type(model).__name__} ties {target} to {source}: both are loaded, untied"
                              " (as transformers does); set tie_word_embeddings=False to say so.", stacklevel=3)
                del tied[target]
    return same


def _tie(model: nn.Module, names: dict[str, str], initial: dict[str, Tensor],
         stored_twice: set[str]) -> list[tuple[str, ...]]:
    """Tie the meta model with transformers' own ``tie_weights`` (its rules: the source takes the target's
    place when only the target is stored, a group of three shares one source) and make every name of a tied
    group read the one stored entry, or share the one computed value. Returns the groups of tied FQNs."""
    if not getattr(model, "all_tied_weights_keys", None):
        return []
    model.tie_weights(missing_keys=(set(model.state_dict()) - set(names)) | stored_twice, recompute_mapping=False)
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    ties = [tuple(group) for group in groups.values() if len(group) > 1]
    for group in ties:
        stored = [names[name] for name in group if name in names]
        computed = [initial[name] for name in group if name in initial]
        for name in group:
            if stored:  # read once, into every copy; nothing computed survives the tie
                names[name] = stored[0]
                initial.pop(name, None)
            elif computed:
                initial[name] = computed[0]
    return ties


def _retie(model: nn.Module, ties: list[tuple[str, ...]]) -> None:
    """Make every name of a tied group the same parameter again (``to_empty`` gives each module its own).
    Names this model does not hold are skipped: a pipeline rank holds one of the copies (the other stage's
    rank the other), and ``check_ties`` refuses schedules that would put both stages on one rank."""
    held = dict(model.named_parameters(remove_duplicate=False))
    for group in ties:
        present = [name for name in group if name in held]
        for name in present[1:]:
            owner_path, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(owner_path), attribute, held[present[0]])


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
        _retie(model, source.ties)
        load_weights(model, source)
        vars(model).pop(_ATTRIBUTE, None)  # loaded once: a second fit keeps the trained weights


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
