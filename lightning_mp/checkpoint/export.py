"""Export a (possibly sharded) Hugging Face model inside a LightningModule as an HF directory.

Every rank takes part in gathering the full state dict; rank 0 writes into a temporary directory and
renames it into place, so a crash never leaves a half-written export where a user expects a model.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch import nn

from lightning_mp.checkpoint.state import model_state


def export_hf_model(module: nn.Module, attribute: str, out_dir: str | Path, tokenizer: Any = None,
                    pipeline_group: dist.ProcessGroup | None = None) -> Path | None:
    """Write ``getattr(module, attribute)`` with ``save_pretrained`` (+ tokenizer); returns the path on rank 0.

    Under pipeline parallelism pass the strategy's ``pipeline_group``: each rank holds only its stages.
    """
    out_dir = Path(out_dir).resolve()
    hf_model = module.get_submodule(attribute)
    full = model_state(hf_model, full=True, pipeline_group=pipeline_group)  # collective: all ranks must call
    is_writer = not dist.is_initialized() or dist.get_rank() == 0
    if is_writer:
        clean = type(hf_model)(hf_model.config)  # unsharded copy on CPU, same FQNs
        missing, unexpected = clean.load_state_dict(full, strict=False)
        tied = set(getattr(clean, "_tied_weights_keys", None) or [])
        if unexpected or set(missing) - tied:
            raise RuntimeError(f"Export of {attribute}: missing keys {missing}, unexpected keys {unexpected}.")
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
        clean.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    if dist.is_initialized():
        dist.barrier()
    return out_dir if is_writer else None
