"""What every recipe does the same way: recipe names -> strategy arguments, the checks before launch
(the strategy's own, on a model built on the meta device), the Trainer with its logs and checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from omegaconf import DictConfig

from lightning_mp.config import MeshShape, ParallelConfig, check_pipeline, check_precision
from lightning_mp.parallel.apply import resolve_plan
from lightning_mp.strategy import ModelParallelStrategy
from lightning_mp.tasks.callbacks import TokensPerSecond


def parallel_kwargs(cfg: DictConfig, auto: Optional[Callable[[DictConfig], dict[str, Any]]] = None) -> dict[str, Any]:
    """The short recipe names (parallel.tensor=2) mapped to the strategy's argument names; with
    ``parallel=auto``, ``auto(cfg)`` (the planner's choice for the recipe's model)."""
    p = cfg.parallel
    # Independent of the degrees: kept when the planner chooses them.
    compile = p.get("compile", False)  # true/false, or a torch.compile backend's name
    switches = dict(compile=compile if isinstance(compile, str) else bool(compile),
                    fsdp_settings=dict(p.get("fsdp") or {}))
    if p.get("auto"):
        if auto is None:
            raise ValueError("parallel=auto: the planner does not know this recipe's model family yet; pass the"
                             " degrees (parallel.data / parallel.tensor / parallel.pipeline).")
        return {**auto(cfg), **switches}
    return dict(
        data_parallel_size=p.data, tensor_parallel_size=p.tensor, pipeline_parallel_size=p.pipeline,
        data_parallel_mode=p.mode, data_parallel_replicate_size=p.replicate,
        activation_checkpointing=p.activation_checkpointing, pipeline_schedule=p.schedule,
        microbatches=p.microbatches, loss_parallel=bool(p.get("loss_parallel", False)),
        sequence_parallel=bool(p.get("sequence_parallel", False)), **switches,
    )


def mesh_shape(cfg: DictConfig, kwargs: dict[str, Any]) -> MeshShape:
    world = int(cfg.trainer.devices) * int(cfg.trainer.num_nodes)
    return ParallelConfig(**kwargs).resolve(world, int(cfg.trainer.devices))


def check_parallel(cfg: DictConfig, kwargs: dict[str, Any], build_model: Optional[Callable[[], Any]],
                   num_blocks: int) -> MeshShape:
    """The strategy's checks before anything is loaded or launched: degrees against the world size, the
    precision, the model's plan against the degrees (``build_model`` builds it; called on the meta device,
    so it costs no memory), and the batch against data-parallel ranks and microbatches."""
    import torch

    config = ParallelConfig(**kwargs)
    shape = mesh_shape(cfg, kwargs)
    check_precision(str(cfg.trainer.precision), shape.pipeline)
    if build_model is not None:
        with torch.device("meta"):
            holder = torch.nn.Module()  # the model sits inside a LightningModule, as in the recipes
            holder.model = build_model()
        resolve_plan(holder, None, shape, config)
    batch = int(cfg.trainer.batch_size)
    if batch % shape.data:
        raise ValueError(f"trainer.batch_size={batch} is not divisible by the {shape.data} data-parallel ranks.")
    check_pipeline(config, num_blocks, local_batch_size=batch // shape.data)
    return shape


def local_or_hub(name: str, original_cwd: Path) -> str:
    """Relative paths are relative to where the user ran the recipe (Hydra changes the directory)."""
    local = original_cwd / str(name)
    return str(local) if local.exists() else str(name)


def build_trainer(cfg: DictConfig, kwargs: dict[str, Any], run_dir: Path, checkpoint: ModelCheckpoint,
                  **overrides: Any) -> L.Trainer:
    """The recipes' Trainer: this strategy, CSV + TensorBoard logs, tokens/s and learning rate, the given
    best-checkpoint callback; ``overrides`` are further Trainer arguments."""
    t = cfg.trainer
    strategy = ModelParallelStrategy(**kwargs, save_distributed_checkpoint=t.save_distributed_checkpoint)
    arguments: dict[str, Any] = dict(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, precision=t.precision,
        strategy=strategy, max_epochs=t.max_epochs, gradient_clip_val=t.gradient_clip_val,
        accumulate_grad_batches=t.accumulate_grad_batches, limit_train_batches=t.limit_train_batches,
        limit_val_batches=t.limit_val_batches, log_every_n_steps=t.log_every_n_steps,
        logger=[CSVLogger(run_dir, name="csv"), TensorBoardLogger(run_dir, name="tensorboard")],
        callbacks=[checkpoint, TokensPerSecond(), LearningRateMonitor(logging_interval="step")],
        num_sanity_val_steps=0,
    )
    return L.Trainer(**{**arguments, **overrides})


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)


def unmap_large_allocations(threshold_bytes: int = 256 << 10) -> bool:
    """Have glibc's malloc give every allocation of at least ``threshold_bytes`` its own mapping, returned to
    the system when freed. By default glibc raises that threshold up to 32 MiB as large blocks are freed, so
    activations of batches of changing widths come from the heap, and the freed heap stays resident: measured
    on the LLM recipe (SmolLM2, one process), 3.9 GB resident after training against 0.7 GB in use. Only
    where the C library is glibc (Linux); returns whether it was applied."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # another C library (musl)
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, int(threshold_bytes)))
