"""The Lightning Strategy: process groups, the device mesh and Lightning's lifecycle hooks.

Everything model-specific lives in ``plans/``, everything axis-specific in ``parallel/``; this file
only decides when each is called.
"""

from __future__ import annotations

import types
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from typing import Any, Generator, Literal, Optional, Sequence, Union

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies.parallel import ParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only
from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only
from torch.distributed.device_mesh import DeviceMesh
from torch.optim import Optimizer

from lightning_mp._compat import (
    default_process_group_backend_for_device,
    distributed_is_initialized,
    init_dist_connection,
    materialize_distributed_module,
    optimizers_to_device,
    set_module_device_mesh,
)
from lightning_mp.checkpoint.hooks import CheckpointHooks
from lightning_mp.checkpoint.pretrained import load_pending, meta_outside, pending_sources
from lightning_mp.checkpoint.resume import ResumableLoader
from lightning_mp.checkpoint.tied import tied_names
from lightning_mp.config import (
    STRATEGY_PRESETS,
    FSDPSettings,
    MeshShape,
    ParallelConfig,
    check_precision,
    progress_timeout_seconds,
)
from lightning_mp.mesh import PIPELINE, build_device_mesh, host_group
from lightning_mp.parallel.apply import PlannedModel, parallelize, resolve_plan, sync_metrics_over
from lightning_mp.parallel.fsdp import is_parallelized
from lightning_mp.parallel.grad_norm import clip_grad_norm_
from lightning_mp.parallel.loss_parallel import unwrap_loss
from lightning_mp.parallel.step_hooks import StepHooks
from lightning_mp.parallel.token_weighting import TokenWeighting
from lightning_mp.pipeline.steps import PipelineLoop
from lightning_mp.planner import AutoLayout
from lightning_mp.plans import ModelPlan, Style, as_model_plan
from lightning_mp.processes.launch import CheckModelThenLaunch, destroy_process_group_at_exit
from lightning_mp.processes.watch import FailureWatch


class ModelParallelStrategy(CheckpointHooks, StepHooks, ParallelStrategy):
    """FSDP2 × tensor parallel (× pipeline) for ordinary LightningModules.

    Args:
        data_parallel_size: ranks that see different data. ``"auto"``: whatever the other degrees leave.
        tensor_parallel_size: ranks that split each layer. ``"auto"``: all devices of a node (Lightning's
            meaning); default 1.
        pipeline_parallel_size: ranks that split the block list into stages (torch.distributed.pipelining).
        pipeline_schedule: ``"gpipe"``, ``"1f1b"``, ``"interleaved_1f1b"``, ``"interleaved_zero_bubble"`` or
            ``"zbv_zero_bubble"`` (the last three hold two stages per rank).
        microbatches: microbatches per local batch under pipeline parallelism (default: one per pipeline rank).
        pipeline_split_points: pin the split: the first block index of every stage, e.g. ``[0, 3]``; default:
            balanced by parameter count, counting embeddings on the first stage and the head on the last.
        data_parallel_mode: ``"fully_sharded"`` (FSDP2), ``"hybrid"`` (replicate × shard, see
            ``data_parallel_replicate_size``; ``"auto"``: one replica per node) or ``"replicated"`` (DDP-like: the
            whole model on every rank, gradients averaged in buckets during backward; see
            ``parallel/replicate.py``).
        sequence_parallel: between the tensor-parallel regions, run norms, dropouts and the residual stream on
            sequence shards (activation memory there falls with the tensor degree); decoder families from
            transformers' plans, no pipeline yet.
        loss_parallel: compute the cross-entropy on vocabulary-sharded logits (needs tensor parallelism and a
            column-sharded head, e.g. an untied ``lm_head``; no pipeline): ``.loss`` is unchanged, ``.logits`` is a
            DTensor sharded on its last dimension (``.full_tensor()`` gathers it). See
            ``parallel/loss_parallel.py``.
        activation_checkpointing: ``True``/``"full"``: recompute each block in backward instead of storing its
            activations; ``"selective"``: keep the matmul, attention and collective outputs and recompute only the
            element-wise ops (see ``parallel/activation_checkpointing.py``); default False.
        plan: a :class:`ModelPlan` or a ``{module-glob: style}`` dict (paths relative to the
            LightningModule) for models without a registered plan.
        token_weighted_loss: when the batch carries ``labels_key``, weight each data-parallel rank's loss
            and logged means by its count of labels != ``ignore_index`` (exact global token mean).
        save_distributed_checkpoint: sharded directory (True) or one full file written by rank 0.
        progress_timeout: seconds (or a timedelta) without a training step or evaluation batch on any rank
            after which the job prints where every rank is and exits with code 1; ``"auto"``: 300 s, or half
            of ``timeout`` when that is shorter (with ``compile=True``: half of ``timeout``, as the first step
            compiles); ``None``: never (see ``processes/watch.py``).
        layout: ``"auto"``: the planner (``lightning_mp.planner``) chooses every degree, microbatches, FSDP mode,
            activation checkpointing (none, full or selective) and sequence parallelism for the model, world size
            and ``device_memory_gb`` (default: read from the GPU), given ``global_batch_size`` and
            ``sequence_length``; the degree arguments are then ignored. ``loss_parallel=True`` lets it turn loss
            parallelism on where it applies (it changes what ``.logits`` is, so it is never chosen unasked).
            Decided when the model is known, before any process starts.
        compile: ``torch.compile`` each block of the plan (the FSDP and activation-checkpointing unit), after
            activation checkpointing, before FSDP; one graph serves every sequence length (dynamic shapes) and
            every block of one class. Needs a plan that names the blocks; with tensor parallelism not yet
            together with sequence parallelism, activation checkpointing or FSDP. See ``parallel/compile.py``.
            ``True`` compiles with inductor; a string names another torch.compile backend (``"aot_eager"``: the
            same graphs and autograd, without generating kernels).
        fsdp_settings: an :class:`~lightning_mp.config.FSDPSettings` (or a dict of its fields): which blocks reshard
            after forward, explicit prefetch depths, the gradient reduction dtype; the defaults are the measured choice.
    """

    strategy_name = "lightning_mp"
    PRESETS = STRATEGY_PRESETS  # Trainer(strategy="lightning_mp_hybrid") etc. (config.py)

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        """Lightning's hook for its built-in strategies; ``lightning_mp/__init__.py`` calls it on import."""
        for name, (description, init_params) in cls.PRESETS.items():
            strategy_registry.register(name, cls, description=description, override=True, **init_params)

    def __init__(
        self,
        data_parallel_size: Union[Literal["auto"], int] = "auto",
        tensor_parallel_size: Union[Literal["auto"], int] = 1,
        pipeline_parallel_size: int = 1,
        data_parallel_mode: str = "fully_sharded",
        data_parallel_replicate_size: Union[Literal["auto"], int, None] = None,
        activation_checkpointing: Union[bool, Literal["full", "selective"]] = False,
        pipeline_schedule: str = "1f1b",
        microbatches: Optional[int] = None,
        pipeline_split_points: Optional[Sequence[int]] = None,
        plan: Union[ModelPlan, dict[str, Style], None] = None,
        token_weighted_loss: bool = True,
        labels_key: str = "labels",
        ignore_index: int = -100,
        save_distributed_checkpoint: bool = True,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = default_pg_timeout,
        progress_timeout: Union[float, timedelta, None, Literal["auto"]] = "auto",
        layout: Literal["manual", "auto"] = "manual",
        global_batch_size: Optional[int] = None,
        sequence_length: Optional[int] = None,
        device_memory_gb: Optional[float] = None,
        loss_parallel: bool = False,
        sequence_parallel: bool = False,
        compile: bool | str = False,
        fsdp_settings: Union[FSDPSettings, dict, None] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if layout not in ("manual", "auto"):
            raise ValueError(f"layout={layout!r}: use 'manual' (the degrees you pass) or 'auto' (the planner's).")
        settings = FSDPSettings.of(fsdp_settings)  # the planner keeps FSDP when settings for it were given
        self._auto = (AutoLayout(global_batch_size, sequence_length, device_memory_gb, loss_parallel, compile,
                                 replicated=not settings.changed()) if layout == "auto" else None)
        self._layout_chosen = False
        self.parallel_config = ParallelConfig(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=tensor_parallel_size,
            pipeline_parallel_size=pipeline_parallel_size,
            data_parallel_mode=data_parallel_mode,
            data_parallel_replicate_size=data_parallel_replicate_size,
            activation_checkpointing=activation_checkpointing,
            pipeline_schedule=pipeline_schedule,
            microbatches=microbatches,
            loss_parallel=loss_parallel,
            sequence_parallel=sequence_parallel,
            compile=compile,
            fsdp_settings=settings,
        )
        self._split_points = list(pipeline_split_points) if pipeline_split_points is not None else None
        self._user_plan = as_model_plan(plan)
        self._token_weighting = TokenWeighting(labels_key, ignore_index, enabled=token_weighted_loss)
        self._save_distributed_checkpoint = save_distributed_checkpoint
        self._process_group_backend = process_group_backend
        self._timeout = timeout
        self._mesh_shape: Optional[MeshShape] = None
        self._device_mesh: Optional[DeviceMesh] = None
        self._data_mesh: Optional[DeviceMesh] = None
        self._pipeline: Optional[PipelineLoop] = None
        self._loss_parallel = False  # set when the model is parallelized
        self._tied_names: dict[str, str] = {}
        self._failure_watch = FailureWatch(progress_timeout=progress_timeout_seconds(progress_timeout, timeout,
                                                                                     compiling=compile))
        self.num_nodes = 1

    # ---------------------------------------------------------------- layout and processes
    @property
    def device_mesh(self) -> DeviceMesh:
        if self._device_mesh is None:
            raise RuntimeError("The device mesh exists only after the processes have initialized (setup_environment).")
        return self._device_mesh

    @property
    def mesh_shape(self) -> MeshShape:
        if self._mesh_shape is None and self._auto is not None and not self._layout_chosen:
            raise RuntimeError("layout='auto' is decided when the model is connected to the Trainer"
                               " (fit/validate/...).")
        if self._mesh_shape is None:
            self._mesh_shape = self.parallel_config.resolve(self.num_nodes * self.num_processes, self.num_processes)
        return self._mesh_shape

    @property
    def root_device(self) -> torch.device:
        assert self.parallel_devices is not None
        return self.parallel_devices[self.local_rank]

    @property
    def num_processes(self) -> int:
        return len(self.parallel_devices) if self.parallel_devices is not None else 0

    @property
    def is_distributed(self) -> bool:
        return True  # tells the Trainer to insert DistributedSampler (over data-parallel ranks only)

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        data_mesh = self._data_mesh
        return {"num_replicas": data_mesh.size(), "rank": data_mesh.get_local_rank()}

    @property
    def process_group_backend(self) -> Optional[str]:
        return self._process_group_backend

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # weights can only be loaded into the sharded model

    @property
    def lightning_restore_optimizer(self) -> bool:
        return False  # done in load_checkpoint, into sharded optimizer states

    def _configure_launcher(self) -> None:
        # Called by the Trainer once devices and nodes are known: the earliest moment to reject a layout,
        # before any process is launched or any process group exists.
        self._validate_precision()
        if self._auto is None:
            _ = self.mesh_shape
        assert self.cluster_environment is not None
        if self.cluster_environment.creates_processes_externally:
            # Lightning compares devices and num_nodes with SLURM's (--ntasks-per-node, --nodes) or torchrun's
            # world size only in its own launcher, which external launchers skip: a mismatch would hang or fail
            # in the mesh. Checked here, with Lightning's messages.
            self.cluster_environment.validate_settings(num_devices=self.num_processes, num_nodes=self.num_nodes)
        else:
            self._launcher = CheckModelThenLaunch(self, self.cluster_environment, self.num_processes, self.num_nodes)

    def _validate_precision(self) -> None:
        check_precision(self._precision, self.parallel_config.pipeline_parallel_size)

    def connect(self, model: pl.LightningModule) -> None:
        super().connect(model)
        self.check_model(model)  # under an external launcher (torchrun) this is the first look at the model

    def check_model(self, model: pl.LightningModule) -> None:
        """Check plan and degrees against a model built in ``__init__``; one built in ``configure_model``
        can only be checked in ``setup``. A model this strategy already split (a second fit/validate) is not
        checked again."""
        if self._auto is not None and not self._layout_chosen:
            self._choose_layout(model)
        if self._pipeline is None and not is_overridden("configure_model", model):
            self._resolve_plan(model)

    def _choose_layout(self, model: pl.LightningModule) -> None:
        assert self._auto is not None
        accelerator = self.root_device.type if self.parallel_devices else "auto"
        chosen = self._auto.choose_for(model, self.num_processes, self.num_nodes, self._precision, accelerator)
        self.parallel_config = ParallelConfig(**chosen.layout.strategy_kwargs(), compile=self.parallel_config.compile,
                                              fsdp_settings=self.parallel_config.fsdp_settings)
        self._layout_chosen = True
        rank_zero_info(f"layout='auto': {chosen.summary()}")

    def setup_environment(self) -> None:
        super().setup_environment()
        reset_seed()
        self.set_world_ranks()
        self._process_group_backend = self._process_group_backend or default_process_group_backend_for_device(
            self.root_device
        )
        kwargs: dict[str, Any] = {"timeout": self._timeout}
        if self.root_device.type != "cpu":
            kwargs["device_id"] = self.root_device
        init_dist_connection(self.cluster_environment, self._process_group_backend, **kwargs)
        destroy_process_group_at_exit()
        self._failure_watch.start()
        self._device_mesh, self._data_mesh = build_device_mesh(self.mesh_shape, self.root_device)
        assert self.lightning_module is not None
        set_module_device_mesh(self.lightning_module, self._device_mesh)

    def set_world_ranks(self) -> None:
        if self.cluster_environment is not None:
            self.cluster_environment.set_global_rank(self.node_rank * self.num_processes + self.local_rank)
            self.cluster_environment.set_world_size(self.num_nodes * self.num_processes)
        rank_zero_only.rank = utils_rank_zero_only.rank = self.global_rank

    # ---------------------------------------------------------------- parallelizing the model
    def _resolve_plan(self, module: pl.LightningModule) -> Optional[PlannedModel]:
        """Find the model and plan and check them against the degrees (raises before anything starts)."""
        return resolve_plan(module, self._user_plan, self.mesh_shape, self.parallel_config, self._split_points)

    def _parallelize(self, module: pl.LightningModule) -> None:
        planned = self._resolve_plan(module)
        # Only the unsplit model shows which names share one tensor; a pipeline makes them separate copies.
        self._tied_names = tied_names(module)
        tw = self._token_weighting
        tw.shifted_labels = planned is not None and planned.plan.shifted_labels
        self._loss_parallel = planned is not None and self.parallel_config.loss_parallel and self.mesh_shape.tensor > 1
        if self._loss_parallel:
            unwrap_loss(planned.model)
        runtime = parallelize(module, planned, self.device_mesh, self.mesh_shape.data,
                              self.parallel_config, self._precision, self.root_device, self._split_points)
        if runtime is not None:
            self._pipeline = PipelineLoop(runtime, tw.labels_key, tw.ignore_index, tw.enabled, tw.shifted_labels,
                                          host_group(self.device_mesh, PIPELINE))

    @property
    def pipeline_group(self) -> Optional[Any]:
        """The process group of this rank's pipeline peers, or None without pipeline parallelism."""
        return self._pipeline.runtime.group if self._pipeline is not None else None

    @property
    def _precision(self) -> str:
        return getattr(self.precision_plugin, "precision", "32-true")

    def setup(self, trainer: pl.Trainer) -> None:
        assert self.model is not None and self.accelerator is not None
        self.accelerator.setup(trainer)
        # Models built by lightning_mp.from_pretrained (on meta), found before a pipeline split replaces them.
        pretrained = pending_sources(self.lightning_module)
        if self._pipeline is None and not is_parallelized(self.model):  # a second fit/validate reuses the stages
            # "-true" precisions cast weights before sharding, so shards are created in the target dtype.
            self.model = self.precision_plugin.convert_module(self.model)
            self._parallelize(self.lightning_module)
        if meta_outside(self.lightning_module, [path for path, _ in pretrained]):
            # Lightning's materialization starts with to_empty() of the whole module: run it before loading.
            materialize_distributed_module(self.model, self.root_device)
        # Each rank reads its own shards, before the optimizer exists (it may hold state shaped like them).
        load_pending(self.lightning_module, pretrained, self.root_device)
        sync_metrics_over(self.model, self._data_mesh.get_group())
        self.model_to_device()
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self._reset_optimizers_and_schedulers()
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        self._route_gradient_clipping()
        if trainer.state.fn == TrainerFn.FITTING:
            optimizers_to_device(self.optimizers, self.root_device)

    def _route_gradient_clipping(self) -> None:
        # Lightning clips inside the precision plugin with torch's clip_grad_norm_, which cannot combine
        # norms of gradients sharded over different meshes. Route it to the global-norm version.
        # Pipeline stages hold disjoint parameters: their squared norms are summed over the pipeline group.
        def clip_grad_by_norm(plugin: Any, optimizer: Optimizer, clip_val: Union[int, float]) -> None:
            tied = self._tied  # a weight tied across the first and last stage counts once, as unsplit
            clip_grad_norm_(list(plugin.main_params(optimizer)), clip_val, extra_group=self.pipeline_group,
                            duplicates=tied.duplicates if tied is not None else (), device=self.root_device)

        self.precision_plugin.clip_grad_by_norm = types.MethodType(clip_grad_by_norm, self.precision_plugin)

    def process_dataloader(self, dataloader: object) -> object:
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if trainer is None or not trainer.training or not hasattr(dataloader, "__len__"):
            return dataloader
        # Mid-epoch checkpoints resume at the next unseen batch (see checkpoint/resume.py).
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        return ResumableLoader(dataloader, lambda: progress.ready)

    def model_to_device(self) -> None:
        assert self.model is not None
        self.model.to(self.root_device)

    @contextmanager
    def tensor_init_context(self, empty_init: Optional[bool] = None) -> Generator[None, None, None]:
        # Meta tensors are materialized after sharding, in setup().
        with torch.device("meta") if empty_init else nullcontext(), self.precision_plugin.tensor_init_context():
            yield

    def barrier(self, name: Optional[str] = None) -> None:
        if not distributed_is_initialized():
            return
        if torch.distributed.get_backend() == "nccl":
            torch.distributed.barrier(device_ids=[self.root_device.index])
        else:
            torch.distributed.barrier()

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if not distributed_is_initialized():
            return obj
        holder = [obj]
        torch.distributed.broadcast_object_list(holder, src)
        return holder[0]

    def on_exception(self, exception: BaseException) -> None:
        # Tell the other ranks, which may be waiting for this one inside a collective (see processes/watch.py).
        self._failure_watch.report(exception)

    def teardown(self) -> None:
        assert self.cluster_environment is not None and self.accelerator is not None
        self._failure_watch.stop()
        self.cluster_environment.teardown()
        self.precision_plugin.teardown()
        self.accelerator.teardown()
