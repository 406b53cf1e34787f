"""Apply a plan to the model inside a LightningModule, axis by axis, in torchtitan's order.

Without a pipeline: tensor parallelism → activation checkpointing → compile (per block) → FSDP (one unit per
block, then the model, then whatever else in the LightningModule holds parameters), or, when data parallelism
is pure replication, bucketed gradient all-reduces instead of FSDP (``replicate.py``). With a pipeline: the
model is cut into this rank's stages first, the same axes are applied to every stage module, and the
LightningModule keeps this rank's *shell* in place of the model (its parameters under the original
names), so ``configure_optimizers``, checkpoints and hooks see only what this rank owns.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from lightning_mp.config import MeshShape, ParallelConfig, check_divisible, check_pipeline, stages_per_rank
from lightning_mp.mesh import DATA_REPLICATE, DATA_SHARD, PIPELINE, TENSOR, fsdp_mesh
from lightning_mp.parallel.activation_checkpointing import apply_activation_checkpointing
from lightning_mp.parallel.compile import apply_compile
from lightning_mp.parallel.fsdp import apply_fsdp, mixed_precision_policy
from lightning_mp.parallel.loss_parallel import check_loss_parallel, with_sharded_head
from lightning_mp.parallel.replicate import ReplicatedGradients, replicate
from lightning_mp.parallel.tensor import apply_tensor_parallel, expand_globs, prepare_for_compile, present_globs
from lightning_mp.pipeline.runtime import PipelineRuntime, build_pipeline, check_ties
from lightning_mp.pipeline.sequence_shards import SequenceShardedStages
from lightning_mp.pipeline.split import check_ownership, check_split_points, stage_blocks
from lightning_mp.plans import ModelPlan, find_plan


@dataclass
class PlannedModel:
    """The model a plan applies to, where it sits in the LightningModule ("" = the module itself)."""

    path: str
    model: nn.Module
    plan: ModelPlan


def resolve_plan(module: nn.Module, user_plan: Optional[ModelPlan], shape: MeshShape, config: ParallelConfig,
                 split_points: Optional[Sequence[int]] = None) -> Optional[PlannedModel]:
    """Find the model and its plan and check them against the degrees; raise when an axis that needs a
    plan has none. Pure: touches no process group, so it runs before any process is launched."""
    found = ("", module, user_plan) if user_plan is not None else find_plan(module)
    if found is None:
        if shape.tensor > 1:
            raise ValueError(
                f"tensor_parallel_size={shape.tensor}, but no tensor-parallel plan is known for the models"
                f" inside {type(module).__name__}. Either pass `plan={{'path.to.linear': 'colwise', ...}}` to"
                " ModelParallelStrategy, register one with `lightning_mp.register_plan(ModelClass, factory)`,"
                " or parallelize the model yourself in `configure_model` using `self.device_mesh`."
            )
        if shape.pipeline > 1:
            raise ValueError(_no_pipeline_plan(shape,
                                               f"no plan is known for the models inside {type(module).__name__}"))
        if config.compile:
            raise ValueError(_no_blocks_to_compile(f"no plan is known for the models inside {type(module).__name__}"))
        return None
    path, model, plan = found
    for axis, size in (("tensor", shape.tensor), ("pipeline", shape.pipeline)):
        if size > 1 and axis in plan.unsupported:
            raise ValueError(f"{axis}_parallel_size={size}, but {plan.unsupported[axis]}.")
    check_divisible(shape.tensor, plan.divisible_sizes, plan.name)
    if shape.tensor > 1:
        expand_globs(model, plan.tensor_parallel)  # every glob must match the unsplit model
    if plan.blocks is not None:
        check_pipeline(config, len(model.get_submodule(plan.blocks)))
    if config.checkpoint_mode and plan.blocks is None:
        raise ValueError(f"activation_checkpointing={config.activation_checkpointing!r} needs a plan that names the"
                         f" blocks of {plan.name}.")
    if config.compile and plan.blocks is None:
        raise ValueError(_no_blocks_to_compile(f"the plan for {plan.name} names no blocks"))
    if shape.pipeline > 1:
        _check_pipelinable(module, path, model, plan, shape, config)
        if split_points is not None:
            num_stages = shape.pipeline * stages_per_rank(config.pipeline_schedule)
            check_split_points(split_points, num_stages, len(model.get_submodule(plan.blocks)))
    sequence_parallel = config.sequence_parallel and shape.tensor > 1
    if sequence_parallel:
        plan = replace(plan, tensor_parallel=sequence_parallel_plan(plan))
    if config.loss_parallel:
        check_loss_parallel(plan, shape.tensor)
        if shape.tensor > 1:
            plan = with_sharded_head(plan, sequence_sharded_input=sequence_parallel)
    return PlannedModel(path, model, plan)


def sequence_parallel_plan(plan: ModelPlan) -> dict:
    """The plan's sequence-parallel variant. With a pipeline, the stages send their sequence shards
    (``pipeline/sequence_shards.py``)."""
    if plan.sequence_parallel is None:
        raise ValueError(
            f"sequence_parallel=True, but {plan.name} has no sequence-parallel plan (supported: the decoder families"
            " whose plans come from transformers and GPT-2, as causal LMs; BERT, RoBERTa, XLM-RoBERTa, ELECTRA and"
            " DistilBERT token classifiers and BertForSequenceClassification; a bare base model is not, since it"
            " would return sequence-sharded states); use sequence_parallel=False."
        )
    return plan.sequence_parallel


def _no_pipeline_plan(shape: MeshShape, reason: str) -> str:
    return (
        f"pipeline_parallel_size={shape.pipeline}, but {reason}. Register a plan whose ModelPlan has `blocks` and a"
        " `pipeline=PipelinePlan(...)` (see lightning_mp/plans/bert.py) with `lightning_mp.register_plan`,"
        " or set pipeline_parallel_size=1."
    )


def _no_blocks_to_compile(reason: str) -> str:
    return (
        f"compile=True compiles each block of the model (the unit of FSDP and activation checkpointing), but {reason}."
        " Register a plan whose ModelPlan names `blocks` (the dotted path of the block list) with"
        " `lightning_mp.register_plan`, or set compile=False and compile the model yourself in `configure_model`."
    )


def _check_pipelinable(module: nn.Module, path: str, model: nn.Module, plan: ModelPlan, shape: MeshShape,
                       config: ParallelConfig) -> None:
    if plan.pipeline is None or plan.blocks is None:
        raise ValueError(_no_pipeline_plan(shape, f"the plan for {plan.name} describes no pipeline split"))
    if not path:
        raise ValueError(
            f"pipeline_parallel_size={shape.pipeline} needs the planned model to be a submodule of"
            f" {type(module).__name__} (e.g. `self.model`), so the strategy can put this rank's stages in its place;"
            " register the plan for the model class with `lightning_mp.register_plan` instead of passing `plan=`."
        )
    check_ties(check_ownership(model, plan), shape.pipeline, config.pipeline_schedule, plan.name)
    inside = {id(p) for p in model.parameters()}
    outside = [name for name, p in module.named_parameters() if id(p) not in inside]
    if outside:
        raise ValueError(
            f"pipeline_parallel_size={shape.pipeline}: parameters {', '.join(outside[:4])} of {type(module).__name__}"
            f" lie outside the pipelined model {path!r} and would belong to no stage; move them into the model"
            " (e.g. into its head) or set pipeline_parallel_size=1."
        )


def parallelize(module: nn.Module, planned: Optional[PlannedModel], mesh: DeviceMesh, data_mesh_size: int,
                config: ParallelConfig, precision: str, device: torch.device,
                split_points: Optional[Sequence[int]] = None) -> Optional[PipelineRuntime]:
    """Parallelize ``module`` in place; returns the pipeline runtime when the model was split into stages."""
    policy = mixed_precision_policy(precision, config.fsdp_settings.reduce_dtype)
    # Nothing sharded (replicate × shard with shard size 1): FSDP would only copy parameters in and out.
    replicated = data_mesh_size > 1 and mesh[DATA_SHARD].size() == 1
    dp_mesh = fsdp_mesh(mesh) if data_mesh_size > 1 and not replicated else None
    if mesh[PIPELINE].size() > 1:
        assert planned is not None
        runtime = _parallelize_pipeline(module, planned, mesh, dp_mesh, config, policy, device, split_points)
        if replicated:
            # Reduced once after the schedule's last microbatch (as torch's stages do for FSDP).
            runtime.reduce_gradients = ReplicatedGradients(runtime.shell.parameters(),
                                                           mesh[DATA_REPLICATE].get_group(), overlap=False).reduce
        return runtime
    if planned is None:
        _apply_axes(module, None, [], ModelPlan(), mesh, dp_mesh, config, policy)
    else:
        blocks = list(planned.model.get_submodule(planned.plan.blocks)) if planned.plan.blocks else []
        _apply_axes(module, planned.model, blocks, planned.plan, mesh, dp_mesh, config, policy,
                    shard_model=planned.model is not module)
    if replicated:
        replicate(module, mesh[DATA_REPLICATE].get_group())
    return None


def _apply_axes(root: nn.Module, model: Optional[nn.Module], blocks: list[nn.Module], plan: ModelPlan,
                mesh: DeviceMesh, dp_mesh: Optional[DeviceMesh], config: ParallelConfig, policy: Any,
                shard_model: bool = True) -> None:
    """Tensor parallelism on ``model``, activation checkpointing of ``blocks``, compile of ``blocks``, then FSDP:
    one unit per block, then ``model``, then whatever in ``root`` still holds parameters. ``model`` may be ``root``
    itself (a plan given to the strategy is relative to the LightningModule): its tensor-parallel plan applies
    all the same, and ``shard_model=False`` keeps it from becoming an FSDP unit (that would change its class)."""
    if model is not None:
        apply_tensor_parallel(model, mesh[TENSOR], plan.tensor_parallel)
        if config.compile and mesh[TENSOR].size() > 1:
            prepare_for_compile(model, blocks)
    owner_path = (plan.blocks or "").rpartition(".")[0]
    owner = (model.get_submodule(owner_path) if owner_path else model) if model is not None else None
    if config.checkpoint_mode:
        apply_activation_checkpointing(blocks, config.checkpoint_mode, owner, traced=config.compile)
    if config.compile:
        apply_compile(blocks, owner, backend=config.compile_backend, checkpointed=config.checkpoint_mode is not None)
    if dp_mesh is not None:
        apply_fsdp(root, model if shard_model else None, blocks, dp_mesh, policy, config.fsdp_settings)


def _parallelize_pipeline(module: nn.Module, planned: PlannedModel, mesh: DeviceMesh, dp_mesh: Optional[DeviceMesh],
                          config: ParallelConfig, policy, device: torch.device,
                          split_points: Optional[Sequence[int]]) -> PipelineRuntime:
    plan = planned.plan
    # Under sequence parallelism the stages send and receive their sequence shards.
    shards = SequenceShardedStages(mesh[TENSOR]) if config.sequence_parallel and mesh[TENSOR].size() > 1 else None

    def parallelize_stage(stage: nn.Module) -> None:
        if shards is not None:
            role = stage._pipeline_role
            shards.attach(stage, role.is_first, role.is_last)
        # The stage module is the FSDP root: torch's PipelineStage drives its gradient reduction.
        stage_plan = replace(plan, tensor_parallel=present_globs(stage, plan.tensor_parallel))
        _apply_axes(stage, stage, stage_blocks(stage, plan), stage_plan, mesh, dp_mesh, config, policy)

    runtime = build_pipeline(
        planned.model, plan, mesh[PIPELINE], config.pipeline_schedule, config.microbatches or mesh[PIPELINE].size(),
        device, split_points=split_points, parallelize_stage=parallelize_stage,
    )
    # Without FSDP a stage's forward and backward run no data-parallel collective (a replicated mode reduces
    # after the schedule), so one rank may re-infer shapes alone.
    runtime.may_reinfer_shapes = dp_mesh is None
    runtime.sequence_shards = shards
    runtime.tensor_mesh = mesh[TENSOR]
    parent_path, _, name = planned.path.rpartition(".")
    parent = module.get_submodule(parent_path) if parent_path else module
    setattr(parent, name, runtime.shell)  # the unsplit model is dropped here
    return runtime


def sync_metrics_over(module: nn.Module, data_group: Any) -> None:
    """torchmetrics Metrics in ``module`` sync over the data-parallel ranks only: tensor-parallel and
    pipeline peers see the same batch, and syncing over the whole world would count it once per peer."""
    from torchmetrics import Metric

    for sub in module.modules():
        if isinstance(sub, Metric):
            sub.process_group = data_group
