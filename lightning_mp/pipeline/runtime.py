"""Pipeline parallelism: run this rank's stages with ``torch.distributed.pipelining``.

How a model is cut into stages lives in ``split``; this module places stages on ranks, wraps
them in torch's schedules and runs whole batches through them (train: forward + backward of every
microbatch; eval: forward only).

The schedules are torch's own (GPipe, 1F1B, interleaved 1F1B, interleaved zero bubble, ZB-V), run with
``scale_grads=False``: each microbatch loss is already its share of the batch loss (``loss.py``).

Nothing here hard-codes a device or backend: the caller passes the device and the pipeline mesh.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleZBVZeroBubble,
)

from lightning_mp._compat import ScheduleForwardOnly, reset_shape_inference, stage_metadata_types, wrap_shape_inference
from lightning_mp.config import MULTI_STAGE_SCHEDULES, PIPELINE_SCHEDULES, stages_per_rank, too_few_blocks
from lightning_mp.pipeline.loss import LossSlot
from lightning_mp.pipeline.sequence_shards import SequenceShardedStages
from lightning_mp.pipeline.shapes import NotDerivable, follow_input_shape, forget_given_shapes
from lightning_mp.pipeline.split import (
    block_list,
    block_ranges,
    build_rank_modules,
    check_ownership,
    plan_split,
    require_pipeline,
)
from lightning_mp.pipeline.tied import TiedAcrossStages
from lightning_mp.plans import ModelPlan, PipelinePlan

SCHEDULE_CLASSES = {
    "gpipe": ScheduleGPipe,
    "1f1b": Schedule1F1B,
    "interleaved_1f1b": ScheduleInterleaved1F1B,
    "interleaved_zero_bubble": ScheduleInterleavedZeroBubble,
    "zbv_zero_bubble": ScheduleZBVZeroBubble,
}
assert set(SCHEDULE_CLASSES) == set(PIPELINE_SCHEDULES)


# ---------------------------------------------------------------- which stages a rank holds
def stage_indices(pp_rank: int, pp_size: int, schedule_name: str) -> list[int]:
    """The stages rank ``pp_rank`` holds, ascending: ``[r]``; interleaved: ``[r, r + p]``; ZB-V ("V"
    order, first and last stage on rank 0): ``[r, 2p - 1 - r]``."""
    per_rank = stages_per_rank(schedule_name)
    if per_rank == 1:
        return [pp_rank]
    if schedule_name == "zbv_zero_bubble":
        return sorted({pp_rank, 2 * pp_size - 1 - pp_rank})
    return [pp_rank, pp_rank + pp_size]


def last_stage_rank(pp_size: int, schedule_name: str) -> int:
    """The pipeline rank holding the last stage (where the loss and the outputs are)."""
    num_stages = pp_size * stages_per_rank(schedule_name)
    return next(r for r in range(pp_size) if num_stages - 1 in stage_indices(r, pp_size, schedule_name))


# ---------------------------------------------------------------- runtime
class PipelineRuntime:
    """This rank's stages, the torch schedule that runs them, and forward(+backward) of whole batches.

    Attributes:
        shell: one module with every part this rank owns, under the unsplit model's FQNs (see
            ``split.build_rank_modules``); give its parameters to the optimizer.
        stage_modules: views of the shell, one per stage held (ascending stage index); what the
            schedule runs and what tensor parallelism and FSDP were applied to.
        stages: the matching ``PipelineStage`` objects.
        schedule: the torch schedule.
        split_points: first block of every stage (all stages, not only this rank's).
        stage_ids: the stage indices this rank holds.
    """

    def __init__(
        self,
        shell: nn.Module,
        stage_modules: list[nn.Module],
        stages: list[PipelineStage],
        schedule: Any,
        pp_mesh: DeviceMesh,
        schedule_name: str,
        pipeline: PipelinePlan,
        device: torch.device,
        split_points: list[int],
        microbatches: int,
        loss_slot: "LossSlot",
    ) -> None:
        self.shell = shell
        self.stage_modules = stage_modules
        self.stages = stages
        self.schedule = schedule
        self.pp_mesh = pp_mesh
        self.schedule_name = schedule_name
        self.pipeline = pipeline
        self.device = torch.device(device)
        self.split_points = split_points
        self.microbatches = microbatches
        self._loss_slot = loss_slot
        self.stage_ids = [stage.stage_index for stage in stages]
        self.num_stages = stages[0].num_stages
        self._last_rank = last_stage_rank(pp_mesh.size(), schedule_name)
        self._shapes: dict[str, tuple] = {}
        self._eval_schedule: Any = None
        self.tied: Optional[TiedAcrossStages] = None  # parameters tied across the first and last stage
        self._eval_stages: list[PipelineStage] = []
        # Set when the stages' forward and backward run no data-parallel collective (no FSDP: no data-parallel
        # peers, or replicated ones reducing after the schedule): torch's own shape re-inference (a real forward
        # and backward) is then safe as a fallback for activations whose shapes cannot be derived.
        self.may_reinfer_shapes = False
        # Set under sequence parallelism: the stages send their sequence shards (see sequence_shards.py).
        self.sequence_shards: Optional[SequenceShardedStages] = None
        self.tensor_mesh: Optional[DeviceMesh] = None  # set by the caller; DTensor outputs are rebuilt on it
        # Set under replicated data parallelism: averages the stages' gradients over the data-parallel ranks.
        self.reduce_gradients: Optional[Callable[[], None]] = None

    # ------------------------------------------------------------ properties
    @property
    def is_first(self) -> bool:
        """This rank holds the first stage (and so needs the plan's input tensor)."""
        return 0 in self.stage_ids

    @property
    def is_last(self) -> bool:
        """This rank holds the last stage (the outputs and per-microbatch losses live here)."""
        return self.num_stages - 1 in self.stage_ids

    @property
    def group(self) -> dist.ProcessGroup:
        return self.pp_mesh.get_group()

    @property
    def last_rank(self) -> int:
        """The pipeline rank (in ``group``) holding the last stage."""
        return self._last_rank

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.shell.parameters()

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """FQNs as in the unsplit model."""
        return self.shell.named_parameters()

    # ------------------------------------------------------------ steps
    def _arguments(self, inputs: Mapping[str, Any], mode: str) -> tuple[tuple, dict[str, Tensor]]:
        name = self.pipeline.input_name
        kwargs = {k: v for k, v in inputs.items() if k != name and isinstance(v, Tensor)}
        primary = inputs.get(name)
        if primary is None and self.is_first:
            raise ValueError(f"the first pipeline stage needs the input {name!r}; got {sorted(inputs)}.")
        args = (primary,) if primary is not None else ()
        tensors = [*args, *kwargs.values()]
        if tensors:
            batch = tensors[0].shape[0]
            if batch % self.microbatches:
                raise ValueError(
                    f"the batch size {batch} is not divisible by microbatches={self.microbatches}; every"
                    " microbatch must have the same shape."
                )
        names = [name] * len(args) + list(kwargs)
        signature = tuple((k, tuple(t.shape), t.dtype) for k, t in zip(names, tensors))
        if self.sequence_shards is not None and signature:
            self.sequence_shards.see(signature[0][1])
        self._follow_shapes(mode, signature)
        return args, kwargs

    def _reshard(self) -> None:
        """Every FSDP unit of this rank's stages resharded before a step, whatever happened before.

        Re-initializing a stage for new shapes reshards its FSDP units (torch's clean-up after shape
        inference), but only on the rank whose batch changed shape; a unit kept gathered between steps (the
        last block, and every unit after a forward-only step) would then be all-gathered on that rank and not
        on its data-parallel peer: their collectives stop lining up. Resharding is local (no collective) and
        is what a training step ends with anyway; in evaluation it costs one all-gather of the last block.
        """
        for stage_module in self.stage_modules:
            for module in stage_module.modules():
                if isinstance(module, FSDPModule):
                    module.reshard()

    def _follow_shapes(self, mode: str, signature: tuple) -> None:
        """Prepare the schedule of ``mode`` for a batch whose tensors have a new shape.

        torch infers the shapes sent between stages once, from the first microbatch, with a real forward and
        backward that runs FSDP's collectives; after that, a new shape here gets metadata derived from the
        previous one (see ``shapes.py``), so that no rank re-infers alone while its data-parallel peers, whose
        batches may have kept their shape, wait in a different collective.
        """
        previous = self._shapes.get(mode)
        self._shapes[mode] = signature
        if previous is None or signature == previous:
            return
        stages = self.stages if mode == "train" else self._eval_stages
        old, new = _microbatch_shape(previous, self.microbatches), _microbatch_shape(signature, self.microbatches)
        shards = self.sequence_shards
        try:
            follow_input_shape(stages, old, new, (shards.sent_lead(old), shards.sent_lead(new)) if shards else None)
        except NotDerivable as reason:
            if not self.may_reinfer_shapes:
                raise ValueError(
                    f"pipeline with data parallelism: the batch's shape changed from {old} to {new} (per microbatch),"
                    f" but the tensors sent between stages cannot follow it: {reason}. torch's shape re-inference"
                    " would run on this rank alone and desynchronize the data-parallel ranks; pad every batch to"
                    " one fixed shape."
                ) from None
            forget_given_shapes(stages)
        reset_shape_inference(self.schedule if mode == "train" else self._eval_schedule)

    def run(self, inputs: Mapping[str, Any], target: Optional[Tensor], loss_fn: Any,
            loss_kwargs: Optional[dict[str, Any]] = None, losses: Optional[list] = None) -> None:
        """Forward and backward of one local batch: ``loss_fn(output, target_microbatch, **loss_kwargs)``
        runs on the last stage once per microbatch, in microbatch order, and its results are
        backpropagated as they are (no rescaling). Gradients accumulate into ``.grad``.

        ``inputs`` are the model inputs of the whole local batch, the same on every pipeline rank (only
        the first stage uses ``input_name``); ``target`` is split into microbatches like the inputs.
        """
        self._reshard()
        args, kwargs = self._arguments(inputs, "train")
        self._loss_slot.fn = loss_fn
        try:
            self.schedule.step(*args, target=target, losses=losses, return_outputs=False,
                               loss_kwargs=loss_kwargs, **kwargs)
        finally:
            self._loss_slot.fn = None
        if self.reduce_gradients is not None:
            self.reduce_gradients()

    @torch.no_grad()
    def eval_step(self, inputs: Mapping[str, Any]) -> Any:
        """Forward only: the merged last-stage output on the rank holding it, None elsewhere. Runs no
        backward action and no gradient reduction, and leaves the training schedule's state alone."""
        if self._eval_schedule is None:
            self._eval_schedule = self._build_eval_schedule()
        self._reshard()
        args, kwargs = self._arguments(inputs, "eval")
        try:
            output = self._eval_schedule.step(*args, **kwargs)
        finally:
            # A forward-only step leaves units gathered (the last block is kept for a backward that never
            # comes). Resharded here, so that what runs next sees the sharded parameters the optimizer holds:
            # a checkpoint saved after validation, or configure_optimizers after trainer.validate.
            self._reshard()
        return output if self.is_last else None

    def _build_eval_schedule(self) -> Any:
        # Own PipelineStage objects over the same modules: their receive buffers are built without
        # gradients once, instead of torch re-inferring the training stages at every train/eval switch.
        stages = [PipelineStage(module, stage.stage_index, stage.num_stages, self.device, group=self.group)
                  for module, stage in zip(self.stage_modules, self.stages)]
        self._eval_stages = stages
        if self.schedule_name not in MULTI_STAGE_SCHEDULES:
            schedule = ScheduleForwardOnly(stages[0], self.microbatches)
            _keep_gradients_through_initialization(schedule, self.shell)
            return schedule
        # torch's multi-stage runtime would still run the backward actions as no-ops in eval(), which fails
        # for stages adjacent on one rank (ZB-V) and reduces FSDP gradients. Keep the forward actions and
        # their sends/receives, in the schedule's own order.
        schedule = SCHEDULE_CLASSES[self.schedule_name](stages, n_microbatches=self.microbatches, loss_fn=None)
        schedule.pipeline_order_with_comms = _forward_only(schedule.pipeline_order_with_comms)
        _keep_gradients_through_initialization(schedule, self.shell)
        return schedule


def _keep_gradients_through_initialization(schedule: Any, shell: nn.Module) -> None:
    """torch clears ``.grad`` of every FSDP parameter after (re)initializing a stage (first step, new shapes,
    the evaluation schedule's first batch): gradients accumulated earlier in an accumulation window would be
    lost. Move them aside for the initialization (so that a shape inference's backward cannot add to them
    either) and put them back: references only, nothing is copied."""

    def keeping(initialize: Any) -> Any:
        def kept(*args: Any, **kwargs: Any) -> Any:
            saved = [(p, p.grad) for p in shell.parameters()]
            for parameter, _ in saved:
                parameter.grad = None
            try:
                return initialize(*args, **kwargs)
            finally:
                for parameter, grad in saved:
                    parameter.grad = grad

        return kept

    wrap_shape_inference(schedule, keeping)


def _microbatch_shape(signature: tuple, microbatches: int) -> tuple[int, ...]:
    """The shape of the first stage's input per microbatch, from a batch signature ((name, shape, dtype), ...)."""
    shape = signature[0][1]
    return (shape[0] // microbatches, *shape[1:])


_FORWARD_ACTIONS = frozenset({"F", "SEND_F", "RECV_F", "UNSHARD", "RESHARD"})


def _forward_only(order: dict[int, list[Any]]) -> dict[int, list[Any]]:
    """A lowered schedule (actions with communication) reduced to its forward actions, order kept."""
    kept: dict[int, list[Any]] = {}
    for rank, actions in order.items():
        kept[rank] = []
        for action in actions:
            parts = action.sub_actions if action.sub_actions else (action,)
            kept[rank].extend(a for a in parts if a.computation_type.value in _FORWARD_ACTIONS)
    return kept


def build_pipeline(
    model: nn.Module,
    plan: ModelPlan,
    pp_mesh: DeviceMesh,
    schedule_name: str,
    microbatches: int,
    device: Union[torch.device, str],
    split_points: Optional[Sequence[int]] = None,
    parallelize_stage: Optional[Callable[[nn.Module], None]] = None,
) -> PipelineRuntime:
    """Cut ``model`` into stages, keep this rank's, and wrap them in a torch schedule.

    Args:
        model: the unsplit model ``plan`` describes (it is left intact; drop it afterwards).
        plan: a :class:`ModelPlan` with ``blocks`` and ``pipeline``.
        pp_mesh: the 1-D pipeline mesh (``device_mesh["pipeline_parallel"]``).
        schedule_name: one of ``config.PIPELINE_SCHEDULES``.
        microbatches: microbatches per batch (the batch size must be divisible by it).
        device: the device this rank computes on (the stages' communication buffers live there). The
            stage modules stay where ``model`` is: move or materialize them (after sharding) yourself.
        split_points: first block index of every stage (``pp × stages per rank`` entries), to pin the
            split; default: balanced by :func:`estimate_costs`.
        parallelize_stage: called on every stage module before torch wraps it (tensor parallelism,
            activation checkpointing, FSDP: torch's stages treat an FSDP root module specially).
    """
    stage_metadata_types()  # a torch without them fails here, before any stage exists
    pipeline = require_pipeline(plan)
    ties = check_ownership(model, plan)
    pp_size, pp_rank = pp_mesh.size(), pp_mesh.get_local_rank()
    check_ties(ties, pp_size, schedule_name, plan.name)
    num_stages = pp_size * stages_per_rank(schedule_name)
    num_blocks = len(block_list(model, plan))
    problem = too_few_blocks(num_stages, num_blocks, stages_per_rank(schedule_name))
    if problem:
        raise ValueError(f"pipeline schedule {schedule_name!r} over {pp_size} ranks: {problem}.")
    if microbatches < 1:
        raise ValueError(f"microbatches must be a positive int, got {microbatches}.")
    points = plan_split(model, plan, num_stages, split_points)
    ranges = block_ranges(points, num_blocks)
    device = torch.device(device)
    group = pp_mesh.get_group()

    held = {index: ranges[index] for index in stage_indices(pp_rank, pp_size, schedule_name)}
    shell, stage_modules = build_rank_modules(model, plan, held, num_stages)
    stages = []
    for index, module in zip(sorted(held), stage_modules):
        if parallelize_stage is not None:
            parallelize_stage(module)
        stages.append(PipelineStage(module, index, num_stages, device, group=group))

    last_rank = last_stage_rank(pp_size, schedule_name)
    tied = TiedAcrossStages(ties, shell, 0 in held, num_stages - 1 in held,
                            TiedAcrossStages.groups_for(ties, group, 0, last_rank))
    slot = LossSlot()
    schedule_cls = SCHEDULE_CLASSES[schedule_name]
    # scale_grads=False: each microbatch loss is already its share of the batch loss (see pipeline/loss.py).
    target = stages if schedule_name in MULTI_STAGE_SCHEDULES else stages[0]
    schedule = schedule_cls(target, n_microbatches=microbatches, loss_fn=slot, scale_grads=False)
    slot.watch(schedule)
    _keep_gradients_through_initialization(schedule, shell)
    runtime = PipelineRuntime(shell, stage_modules, stages, schedule, pp_mesh, schedule_name, pipeline, device, points,
                              microbatches, slot)
    runtime.tied = tied
    return runtime


def check_ties(ties: Sequence[tuple[str, str]], pp_size: int, schedule_name: str, name: str) -> None:
    """A tie across the first and last stage needs them on different ranks: one rank holding both would
    put one parameter into two FSDP-wrapped stage modules."""
    if ties and last_stage_rank(pp_size, schedule_name) == 0:
        raise ValueError(
            f"{name} ties {ties[0][0]} to {ties[0][1]}, and schedule {schedule_name!r} puts the first and the last"
            " stage on the same rank; use another schedule (e.g. '1f1b' or 'interleaved_1f1b') or untie them."
        )
