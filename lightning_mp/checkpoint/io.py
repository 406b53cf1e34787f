"""On-disk forms of a checkpoint and writing/reading them safely.

Two forms, both written atomically (into a hidden sibling, renamed into place when complete, so an
interrupted save never sits where a checkpoint is expected):

- sharded: a directory written by torch.distributed.checkpoint (one file per rank + ``.metadata``), with
  Lightning's non-tensor state (loops, callbacks, LR schedulers, hparams, per-rank RNG) in ``meta.pt``;
- full: one ``torch.save`` file written by rank 0: ``state_dict`` is what a plain LightningModule's
  ``load_state_dict`` / ``load_from_checkpoint`` takes.

What goes into either form, and loading it into a live model, is ``state.py``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import DTensor

META_FILE = "meta.pt"
MODEL_KEY = "state_dict"
OPTIMIZER_KEY = "optimizer_states"


class CheckpointMismatchError(ValueError):
    """The checkpoint does not fit the model: names the missing, unexpected or mis-shaped entries."""


# ---------------------------------------------------------------- writing
def is_sharded_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / ".metadata").is_file()


def staging_path(path: Path) -> Path:
    """Where a checkpoint is written before it is complete: hidden, next to its final place (same file
    system, so the rename is atomic), the same name on every rank."""
    return path.with_name(f".{path.name}.partial")


def replace_atomically(staging: Path, path: Path) -> None:
    """Put a complete checkpoint in place. A file is replaced atomically; a directory cannot be, so the
    old one is moved aside first and deleted after (a crash in between leaves it as ``.NAME.old``)."""
    if path.is_dir() and not path.is_symlink():
        old = path.with_name(f".{path.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(path, old)
        os.replace(staging, path)
        shutil.rmtree(old)
    else:
        os.replace(staging, path)


@contextlib.contextmanager
def without_single_process_warning() -> Iterator[None]:
    """torch.distributed.checkpoint run by one process without a process group (convert, a plain module):
    that is what we mean there, so torch's warning that it is "assuming" so would only alarm the user."""
    if dist.is_initialized():  # a real job: leave the (process-global) warning filters alone
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed is .*assuming the intent is to")
        yield


def save_full(checkpoint: dict[str, Any], path: Path) -> None:
    """One file, written by the caller (rank 0) only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_path(path)
    torch.save(checkpoint, staging)
    replace_atomically(staging, path)


def save_sharded(checkpoint: dict[str, Any], path: Path, is_rank_zero: bool, barrier: Callable[[], None]) -> None:
    """A torch.distributed.checkpoint directory; every rank calls this (collective)."""
    checkpoint = dict(checkpoint)
    tensors = {MODEL_KEY: checkpoint.pop(MODEL_KEY)}
    for index, state in enumerate(checkpoint.pop(OPTIMIZER_KEY, [])):
        tensors[f"optimizer_{index}"] = state
    staging = staging_path(path)
    if is_rank_zero:
        if staging.exists():  # left by an interrupted save
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
    barrier()
    with without_single_process_warning():
        dcp.save(tensors, checkpoint_id=staging)  # returns on rank 0 once every rank's files and .metadata exist
    if is_rank_zero:
        torch.save(checkpoint, staging / META_FILE)
        replace_atomically(staging, path)


# ---------------------------------------------------------------- reading
def safe_loading(weights_only: bool | None) -> bool:
    """``torch.load``'s ``weights_only`` for a checkpoint: torch's safe default (True: tensors and plain types,
    never code) unless the user passed False, as Lightning passes ``None`` on to torch. Unpickling arbitrary
    objects runs code from whoever wrote the file."""
    return True if weights_only is None else bool(weights_only)


def unsafe_hint(path: Path, error: BaseException) -> str:
    """Why a checkpoint did not load, and what to do when it holds objects that only a full unpickle reads."""
    text = f"{path}: {last_line(error)}"
    if "weights_only" in str(error) or "Unsupported global" in str(error):
        text += (" (it holds objects beyond tensors and plain types; if you trust whoever wrote it, load it with"
                 " weights_only=False, e.g. trainer.fit(model, ckpt_path=..., weights_only=False))")
    return text


def read_full(path: Path, weights_only: bool | None = None) -> dict[str, Any]:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=safe_loading(weights_only), mmap=True)
    except Exception as error:  # a truncated zip, a pickle error, a global refused by safe loading...
        raise CheckpointMismatchError(f"cannot read the checkpoint file {unsafe_hint(path, error)}") from error
    if not isinstance(checkpoint, dict) or MODEL_KEY not in checkpoint:
        raise CheckpointMismatchError(f"{path} is not a Lightning checkpoint: it has no {MODEL_KEY!r} entry.")
    return checkpoint


def last_line(error: BaseException) -> str:
    """The cause of a (possibly multi-rank, multi-line) reading error, without its tracebacks."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def require_checkpoint(path: Path) -> None:
    if is_sharded_checkpoint(path) or path.is_file():
        return
    if path.is_dir():
        raise CheckpointMismatchError(
            f"{path} is not a complete sharded checkpoint: its .metadata file is missing (an interrupted save"
            " leaves its files in a hidden '.NAME.partial' directory, never here, so this directory was not"
            " written by lightning_mp or was damaged)."
        )
    partial, old = staging_path(path), path.with_name(f".{path.name}.old")
    hint = f"; {partial} is an interrupted save and cannot be used" if partial.exists() else ""
    if old.exists():
        hint += f"; {old} is the previous checkpoint, left by a crash while it was being replaced"
    raise FileNotFoundError(f"No checkpoint at {path}: neither a file nor a sharded checkpoint directory{hint}.")


def shape_of(value: Any) -> tuple[int, ...] | None:
    return tuple(value.shape) if isinstance(value, (torch.Tensor, DTensor)) else None


def check_entries(path: Path, wanted: dict[str, Any], available: dict[str, tuple[int, ...] | None], what: str,
                  strict: bool, everyone_wants: set[str] | None = None) -> None:
    """Raise if ``wanted`` (this rank's entries) is not in ``available`` (the checkpoint's), if shapes
    differ, or (``strict``) if the checkpoint holds entries no rank wants."""
    missing = sorted(set(wanted) - set(available))
    shapes = [f"{key}: checkpoint {available[key]} vs model {shape_of(value)}" for key, value in wanted.items()
              if key in available and available[key] is not None and shape_of(value) is not None
              and tuple(available[key]) != shape_of(value)]
    unexpected = sorted(set(available) - (everyone_wants if everyone_wants is not None else set(wanted)))
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} {what} entries: {', '.join(missing[:8])}"
                        f"{' ...' if len(missing) > 8 else ''}")
    if shapes:
        problems.append(f"{len(shapes)} with other shapes: {'; '.join(shapes[:5])}")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected {what} entries: {', '.join(unexpected[:8])}"
                        f"{' ...' if len(unexpected) > 8 else ''}")
    if problems:
        raise CheckpointMismatchError(f"checkpoint {path} does not fit the model: {'; '.join(problems)}.")


def sharded_entries(path: Path) -> dict[str, tuple[int, ...] | None]:
    try:
        metadata = dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as error:
        raise CheckpointMismatchError(f"cannot read {path / '.metadata'}: {error}") from error
    return {key: tuple(item.size) if hasattr(item, "size") else None
            for key, item in metadata.state_dict_metadata.items()}


def _under(prefix: str, entries: dict[str, Any]) -> dict[str, Any]:
    return {key[len(prefix) + 1:]: value for key, value in entries.items() if key.startswith(prefix + ".")}
