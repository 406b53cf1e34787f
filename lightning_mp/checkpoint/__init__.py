"""Checkpoints that do not depend on the layout that wrote them.

``io`` (on-disk forms, atomic writes, checks), ``state`` (what is saved under which names, loading into
any layout), ``rng`` (per-rank random state), ``hooks`` (the strategy's Lightning checkpoint hooks),
``resume`` (mid-epoch resume), ``convert`` (sharded <-> full, a command), ``export`` (Hugging Face
directories), ``pretrained`` (``lightning_mp.from_pretrained``: meta construction, sharded loading) and
``safetensors_files`` (a Hugging Face checkpoint's files, headers and the per-rank slice reader).
"""

from lightning_mp.checkpoint.io import CheckpointMismatchError, is_sharded_checkpoint
from lightning_mp.checkpoint.state import load_into, model_state, optimizer_state

__all__ = ["CheckpointMismatchError", "is_sharded_checkpoint", "load_into", "model_state", "optimizer_state"]
