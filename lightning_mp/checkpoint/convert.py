"""Convert checkpoints between the sharded and the full form, without a distributed job.

    python -m lightning_mp.checkpoint.convert CHECKPOINT_DIR  model.ckpt     # sharded directory -> one full file
    python -m lightning_mp.checkpoint.convert model.ckpt      CHECKPOINT_DIR  # full file -> sharded directory

Both forms hold the same entries under the same names (see ``lightning_mp.checkpoint``), so either
loads into any layout; the full file also loads into a plain LightningModule
(``Module.load_from_checkpoint``, or ``torch.load(path)["state_dict"]``; with ``strict=False`` for a model
with tied weights, which are stored once: see ``tied.py``). The output appears only when
complete; an existing output is refused unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from lightning_mp._compat import EmptyStateDictLoadPlanner, load_state_dict_without_planning
from lightning_mp.checkpoint.io import (
    META_FILE,
    MODEL_KEY,
    OPTIMIZER_KEY,
    is_sharded_checkpoint,
    read_full,
    replace_atomically,
    save_full,
    staging_path,
    without_single_process_warning,
)


def sharded_to_full(source: str | Path, target: str | Path, weights_only: bool = True) -> Path:
    """Read every shard of ``source`` on this process and write one full checkpoint file ``target``."""
    source, target = Path(source), Path(target)
    if not is_sharded_checkpoint(source):
        raise ValueError(f"{source} is not a sharded checkpoint directory (no .metadata file in it).")
    tensors: dict[str, Any] = {}
    # What torch's dcp_to_torch_save does, keeping the result in memory (dcp.load would not fill an empty dict).
    load_state_dict_without_planning(tensors, storage_reader=dcp.FileSystemReader(str(source)),
                                     planner=EmptyStateDictLoadPlanner(),
                     no_dist=True)
    checkpoint = torch.load(source / META_FILE, weights_only=weights_only)
    checkpoint[MODEL_KEY] = tensors.pop(MODEL_KEY)
    optimizers = sorted((key for key in tensors if key.startswith("optimizer_")), key=lambda k: int(k.split("_")[1]))
    checkpoint[OPTIMIZER_KEY] = [tensors[key] for key in optimizers]
    save_full(checkpoint, target)
    return target


def full_to_sharded(source: str | Path, target: str | Path, weights_only: bool = True) -> Path:
    """Write the full checkpoint file ``source`` as a sharded directory ``target`` (one shard)."""
    source, target = Path(source), Path(target)
    checkpoint = read_full(source, weights_only)
    tensors = {MODEL_KEY: checkpoint.pop(MODEL_KEY)}
    for index, state in enumerate(checkpoint.pop(OPTIMIZER_KEY, [])):
        tensors[f"optimizer_{index}"] = state
    staging = staging_path(target)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    with without_single_process_warning():
        dcp.save(tensors, checkpoint_id=staging, no_dist=True)
    torch.save(checkpoint, staging / META_FILE)
    replace_atomically(staging, target)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lightning_mp.checkpoint.convert",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="a sharded checkpoint directory or a full checkpoint file")
    parser.add_argument("target", type=Path, help="where the other form is written")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing target")
    parser.add_argument("--trust-pickles", action="store_true",
                        help="unpickle any object the checkpoint holds (runs code from whoever wrote it; default:"
                             " tensors and plain types only, torch's weights_only=True)")
    args = parser.parse_args(argv)
    if args.target.exists() and not args.overwrite:
        parser.error(f"{args.target} exists; pass --overwrite to replace it.")
    if is_sharded_checkpoint(args.source):
        sharded_to_full(args.source, args.target, weights_only=not args.trust_pickles)
        print(f"wrote the full checkpoint {args.target}")
    elif args.source.is_file():
        full_to_sharded(args.source, args.target, weights_only=not args.trust_pickles)
        print(f"wrote the sharded checkpoint {args.target}")
    else:
        parser.error(f"{args.source} is neither a sharded checkpoint directory (with .metadata) nor a file.")


if __name__ == "__main__":
    main()
