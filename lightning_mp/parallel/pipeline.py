"""Pipeline parallelism: cut a planned model into stages and run them with ``torch.distributed.pipelining``.

Splitting follows torchtitan: every stage is a copy of the whole model from which everything the
stage does not own has been removed, so a parameter keeps the name (FQN) it has in the unsplit model
— checkpoints, tensor-parallel globs and optimizer state keep working per stage. The block list
(``plan.blocks``, an ``nn.ModuleList``) becomes an ``nn.ModuleDict`` keyed by the original indices
(``"3"``), so ``...layer.3.attention...`` stays that name on the stage that owns block 3. A pruned
model cannot run its own ``forward``; the stage runs the plan's pieces instead (``PipelinePlan``:
embed on the first stage, one call per owned block, head on the last stage). Nothing here knows a
model family: that lives in ``plans/``.

The schedules are torch's own (GPipe, 1F1B, interleaved 1F1B, interleaved zero bubble, ZB-V). Loss
scaling: torch divides gradients by the number of microbatches (``scale_grads=True``), which is only
right when every microbatch has the same weight. Here ``scale_grads=False`` and each microbatch's loss
is already its share of the batch loss (``sum over its labelled tokens / labelled tokens in the whole
batch``), so the gradients summed over microbatches are exactly those of the single-process batch mean.

Nothing here hard-codes a device or backend: the caller passes the device and the pipeline mesh.
"""

from __future__ import annotations

import copy
import itertools
import types
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, NamedTuple, Optional, Protocol, Sequence, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleZBVZeroBubble,
    _ScheduleForwardOnly,
)

from lightning_mp.config import MULTI_STAGE_SCHEDULES, PIPELINE_SCHEDULES
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
def _check_schedule(schedule_name: str) -> None:
    if schedule_name not in SCHEDULE_CLASSES:
        raise ValueError(
            f"pipeline schedule {schedule_name!r} is unknown; valid schedules: {', '.join(PIPELINE_SCHEDULES)}."
        )


def stages_per_rank(schedule_name: str) -> int:
    _check_schedule(schedule_name)
    return 2 if schedule_name in MULTI_STAGE_SCHEDULES else 1


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


# ---------------------------------------------------------------- balancing
@dataclass(frozen=True)
class StageCosts:
    """Cost of every block, plus what only the first stage (embeddings) and last stage (head) carry."""

    blocks: list[float]
    first: float = 0.0
    last: float = 0.0


def _parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _activation_width(module: nn.Module) -> int:
    """Elements per token that the module's layers produce (and autograd mostly keeps for backward):
    a model-agnostic activation estimate from the outputs of its linear, norm and embedding layers."""
    width = 0
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            width += sub.out_features
        elif isinstance(sub, nn.Embedding):
            width += sub.embedding_dim
        elif isinstance(sub, (nn.LayerNorm, nn.RMSNorm)) and sub.normalized_shape:
            width += int(torch.Size(sub.normalized_shape).numel())
    return width


def estimate_costs(model: nn.Module, plan: ModelPlan, tokens_per_microbatch: int = 0) -> StageCosts:
    """Parameters plus (when ``tokens_per_microbatch`` is given) activation elements of every block; the
    plan's ``first`` modules count on the first stage, its ``last`` modules on the last."""
    pipeline = _require_pipeline(plan)

    def cost(module: nn.Module) -> float:
        return float(_parameter_count(module) + tokens_per_microbatch * _activation_width(module))

    blocks = [cost(block) for block in _block_list(model, plan)]
    first = sum(cost(m) for m in (_get(model, path) for path in pipeline.first) if m is not None)
    last = sum(cost(m) for m in (_get(model, path) for path in pipeline.last) if m is not None)
    return StageCosts(blocks=blocks, first=first, last=last)


def _too_few_blocks(num_blocks: int, num_stages: int) -> ValueError:
    return ValueError(
        f"cannot split {num_blocks} blocks into {num_stages} pipeline stages: every stage needs at least one"
        f" block; use at most {num_blocks} stages (pipeline ranks × stages per rank)."
    )


def balance_split(block_costs: Sequence[float], num_stages: int, first: float = 0.0, last: float = 0.0) -> list[int]:
    """First block of each stage for the contiguous split whose most expensive stage is cheapest.

    Stage ``s`` covers ``block_costs[points[s]:points[s + 1]]``; ``first`` and ``last`` are added to the
    first and last stage. Exact (dynamic programming over split points); among splits with the same
    maximum, the one with the smallest sum of squared stage costs is preferred.
    """
    n = len(block_costs)
    if num_stages < 1:
        raise ValueError(f"num_stages must be at least 1, got {num_stages}.")
    if num_stages > n:
        raise _too_few_blocks(n, num_stages)
    prefix = [0.0, *itertools.accumulate(float(c) for c in block_costs)]

    def stage_cost(stage: int, start: int, end: int) -> float:
        extra = (first if stage == 0 else 0.0) + (last if stage == num_stages - 1 else 0.0)
        return prefix[end] - prefix[start] + extra

    # best[s][i]: (max cost, sum of squares, split points) of stages 0..s-1 covering blocks 0..i-1.
    inf = (float("inf"), float("inf"), [])
    best: list[list[tuple[float, float, list[int]]]] = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = (0.0, 0.0, [])
    for s in range(1, num_stages + 1):
        for end in range(s, n - (num_stages - s) + 1):
            for start in range(s - 1, end):
                prev = best[s - 1][start]
                if prev[0] == float("inf"):
                    continue
                c = stage_cost(s - 1, start, end)
                candidate = (max(prev[0], c), prev[1] + c * c, [*prev[2], start])
                if candidate[:2] < best[s][end][:2]:
                    best[s][end] = candidate
    return best[num_stages][n][2]


def check_split_points(split_points: Sequence[int], num_stages: int, num_blocks: int) -> list[int]:
    """Validate a pinned split: ``num_stages`` increasing first-block indices starting at 0."""
    points = [int(p) for p in split_points]
    if num_stages > num_blocks:
        raise _too_few_blocks(num_blocks, num_stages)
    if len(points) != num_stages:
        raise ValueError(
            f"split_points={points} has {len(points)} entries, but the pipeline has {num_stages} stages; give the"
            f" first block index of every stage, e.g. {balance_split([1.0] * num_blocks, num_stages)}."
        )
    if points[0] != 0:
        raise ValueError(f"split_points={points} must start at 0 (the first stage starts with block 0).")
    if any(b <= a for a, b in zip(points, points[1:])) or points[-1] >= num_blocks:
        raise ValueError(
            f"split_points={points} must be strictly increasing and below the number of blocks ({num_blocks}),"
            " so that every stage owns at least one block."
        )
    return points


def plan_split(
    model: nn.Module,
    plan: ModelPlan,
    num_stages: int,
    split_points: Optional[Sequence[int]] = None,
    tokens_per_microbatch: int = 0,
) -> list[int]:
    """The first block of every stage: ``split_points`` when pinned (validated), else balanced by cost."""
    num_blocks = len(_block_list(model, plan))
    if split_points is not None:
        return check_split_points(split_points, num_stages, num_blocks)
    if num_stages > num_blocks:
        raise _too_few_blocks(num_blocks, num_stages)
    costs = estimate_costs(model, plan, tokens_per_microbatch)
    return balance_split(costs.blocks, num_stages, costs.first, costs.last)


def block_ranges(split_points: Sequence[int], num_blocks: int) -> list[range]:
    bounds = [*split_points, num_blocks]
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


# ---------------------------------------------------------------- splitting the model
def _require_pipeline(plan: ModelPlan) -> PipelinePlan:
    if plan.pipeline is None or plan.blocks is None:
        raise ValueError(
            f"the plan for {plan.name} describes no pipeline split (it needs `blocks` and a `pipeline`"
            " PipelinePlan); pipeline parallelism is not available for this model."
        )
    return plan.pipeline


def _get(model: nn.Module, path: str) -> Optional[nn.Module]:
    owner_path, _, name = path.rpartition(".")
    try:
        owner = model.get_submodule(owner_path) if owner_path else model
    except AttributeError:
        return None
    return owner._modules.get(name)


def _block_list(model: nn.Module, plan: ModelPlan) -> list[nn.Module]:
    container = model.get_submodule(plan.blocks)  # type: ignore[arg-type]
    return list(container.values()) if isinstance(container, nn.ModuleDict) else list(container)


def stage_blocks(stage_module: nn.Module, plan: ModelPlan) -> list[nn.Module]:
    """The blocks a stage module owns (its ``plan.blocks`` is an ``nn.ModuleDict``), in model order; the
    units for FSDP and activation checkpointing of that stage."""
    return _block_list(stage_module, plan)


def _check_ownership(model: nn.Module, plan: ModelPlan) -> None:
    """Every parameter must belong to exactly one part (first, a block, last); a tied parameter used by
    two parts would become two independent copies on different stages."""
    pipeline = _require_pipeline(plan)
    for path in (*pipeline.first, *pipeline.last):
        if _get(model, path) is None:
            raise ValueError(f"pipeline plan of {plan.name}: module {path!r} does not exist in {type(model).__name__}.")
    prefixes = {"first": [f"{p}." for p in pipeline.first], "last": [f"{p}." for p in pipeline.last],
                "blocks": [f"{plan.blocks}."]}

    def part_of(name: str) -> Optional[str]:
        return next((part for part, ps in prefixes.items() if any(name.startswith(p) for p in ps)), None)

    parts_of_tensor: dict[int, set[str]] = {}
    names_of_tensor: dict[int, list[str]] = {}
    unowned = []
    for name, param in model.named_parameters(remove_duplicate=False):
        part = part_of(name)
        if part is None:
            unowned.append(name)
            continue
        parts_of_tensor.setdefault(id(param), set()).add(part)
        names_of_tensor.setdefault(id(param), []).append(name)
    if unowned:
        raise ValueError(
            f"pipeline plan of {plan.name}: parameters {', '.join(unowned[:6])}{' ...' if len(unowned) > 6 else ''}"
            " belong to no stage; list their modules in PipelinePlan.first or PipelinePlan.last."
        )
    tied = [names_of_tensor[key] for key, parts in parts_of_tensor.items() if len(parts) > 1]
    if tied:
        raise ValueError(
            f"pipeline plan of {plan.name}: tied parameters {tied[0]} are used by different pipeline parts;"
            " untie them (e.g. tie_word_embeddings=False) or keep the model unpipelined."
        )


@dataclass(frozen=True)
class StageRole:
    """What a stage module is: stored on it as ``_pipeline_role``."""

    stage_index: int
    num_stages: int
    blocks: tuple[int, ...]
    pipeline: PipelinePlan
    blocks_path: str

    @property
    def is_first(self) -> bool:
        return self.stage_index == 0

    @property
    def is_last(self) -> bool:
        return self.stage_index == self.num_stages - 1


def _stage_forward(self: nn.Module, x: Tensor, **inputs: Any) -> Any:
    """``forward`` of a stage module: first stage ``x`` is the plan's input (token ids), elsewhere the
    hidden states from the previous stage; ``inputs`` are the other model inputs, on every stage."""
    role: StageRole = self._pipeline_role
    pipeline = role.pipeline
    hidden = pipeline.embed(self, x, inputs) if role.is_first else x
    context = pipeline.block_context(self, hidden, inputs) if pipeline.block_context is not None else {}
    for block in self.get_submodule(role.blocks_path).values():
        hidden = pipeline.block(block, hidden, context)
    return pipeline.head(self, hidden, inputs) if role.is_last else hidden


def build_stage_module(model: nn.Module, plan: ModelPlan, stage_index: int, num_stages: int,
                       blocks: Sequence[int]) -> nn.Module:
    """A copy of ``model`` holding only what stage ``stage_index`` owns, with the original FQNs.

    Only the owned parts are copied: the unowned ones are detached from ``model`` for the duration of
    the deep copy (and put back), so peak memory is the model plus one stage.
    """
    pipeline = _require_pipeline(plan)
    assert plan.blocks is not None
    parent_path, _, attr = plan.blocks.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    original_blocks = parent._modules[attr]
    all_blocks = list(original_blocks.values()) if isinstance(original_blocks, nn.ModuleDict) else list(original_blocks)
    drop = [*(() if stage_index == 0 else pipeline.first), *(() if stage_index == num_stages - 1 else pipeline.last)]
    removed: list[tuple[nn.Module, str, Optional[nn.Module]]] = []
    try:
        for path in drop:
            owner_path, _, name = path.rpartition(".")
            owner = model.get_submodule(owner_path) if owner_path else model
            removed.append((owner, name, owner._modules[name]))
            owner._modules[name] = None
        parent._modules[attr] = nn.ModuleDict({str(i): all_blocks[i] for i in blocks})
        stage_module = copy.deepcopy(model)
    finally:
        parent._modules[attr] = original_blocks
        for owner, name, module in reversed(removed):
            owner._modules[name] = module
    # An instance attribute: the class, and with it isinstance checks and every FQN, stays the model's.
    stage_module._pipeline_role = StageRole(stage_index, num_stages, tuple(blocks), pipeline, plan.blocks)
    stage_module.forward = types.MethodType(_stage_forward, stage_module)
    return stage_module


def stage_role(module: nn.Module) -> Optional[StageRole]:
    return getattr(module, "_pipeline_role", None)


# ---------------------------------------------------------------- loss
class TokenCrossEntropy:
    """Cross entropy whose per-microbatch value is ``sum of token losses / normalizer``.

    ``normalizer`` is the number of labelled tokens (labels != ``ignore_index``) in the whole local batch
    (see :meth:`count`), so the microbatch losses add up to the batch's token mean however the labelled
    tokens are distributed over microbatches. Works for token logits ``(B, S, C)`` with labels ``(B, S)``
    and sequence logits ``(B, C)`` with labels ``(B,)``.
    """

    def __init__(self, ignore_index: int = -100) -> None:
        self.ignore_index = ignore_index

    def count(self, target: Tensor) -> Tensor:
        return (target != self.ignore_index).sum()

    def __call__(self, output: Any, target: Tensor, normalizer: Tensor) -> Tensor:
        logits = output[0] if isinstance(output, (tuple, list)) else output
        total = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1), ignore_index=self.ignore_index,
            reduction="sum",
        )
        return total / normalizer


class PipelineLoss(Protocol):
    """What the schedule calls per microbatch on the last stage; the returned microbatch losses must add
    up to the batch loss (so gradients need no rescaling)."""

    def count(self, target: Tensor) -> Tensor:
        """The normalizer of a whole batch (e.g. its labelled tokens)."""

    def __call__(self, output: Any, target: Tensor, normalizer: Tensor) -> Tensor:
        """This microbatch's share of the batch loss."""


class EvalOutput(NamedTuple):
    output: Any  # the last stage's merged output (e.g. logits) on the rank holding it, None elsewhere
    loss: Optional[Tensor]  # the batch loss on every pipeline rank when labels were given


# ---------------------------------------------------------------- runtime
class PipelineRuntime:
    """This rank's stages, the torch schedule that runs them, and train/eval steps on whole batches.

    Attributes:
        stage_modules: the modules owning this rank's parameters (one per stage held, ascending stage
            index). Apply tensor parallelism / FSDP to them in place before the first step; give their
            parameters to the optimizer.
        stages: the matching ``PipelineStage`` objects.
        schedule: the torch schedule.
        split_points: first block of every stage (all stages, not only this rank's).
        stage_ids: the stage indices this rank holds.
    """

    def __init__(
        self,
        stage_modules: list[nn.Module],
        stages: list[PipelineStage],
        schedule: Any,
        pp_mesh: DeviceMesh,
        schedule_name: str,
        pipeline: PipelinePlan,
        loss_fn: PipelineLoss,
        device: torch.device,
        split_points: list[int],
        microbatches: int,
    ) -> None:
        self.stage_modules = stage_modules
        self.stages = stages
        self.schedule = schedule
        self.pp_mesh = pp_mesh
        self.schedule_name = schedule_name
        self.pipeline = pipeline
        self.loss_fn = loss_fn
        self.device = torch.device(device)
        self.split_points = split_points
        self.microbatches = microbatches
        self.stage_ids = [stage.stage_index for stage in stages]
        self.num_stages = stages[0].num_stages
        self._last_rank = last_stage_rank(pp_mesh.size(), schedule_name)
        self._shapes: dict[str, tuple] = {}
        self._eval_schedule: Any = None

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
    def grad_norm_group(self) -> dist.ProcessGroup:
        """Stages hold disjoint parameters: pass this as ``total_grad_norm(..., extra_group=...)`` /
        ``clip_grad_norm_(..., extra_group=...)`` to sum the norm over the pipeline."""
        return self.group

    def parameters(self) -> Iterator[nn.Parameter]:
        return itertools.chain.from_iterable(m.parameters() for m in self.stage_modules)

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """FQNs as in the unsplit model (stages on one rank never share a name)."""
        return itertools.chain.from_iterable(m.named_parameters() for m in self.stage_modules)

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
        self._reset_if_shapes_changed(mode, tuple((k, tuple(t.shape), t.dtype) for k, t in zip(names, tensors)))
        return args, kwargs

    def _reset_if_shapes_changed(self, mode: str, shapes: tuple) -> None:
        # torch infers the shapes sent between stages once, from the first microbatch it sees. All pipeline
        # ranks read the same batch, so they all notice a new shape (e.g. another sequence length) and
        # redo the inference together.
        previous = self._shapes.get(mode)
        if previous is not None and shapes != previous:
            schedule = self.schedule if mode == "train" else self._eval_schedule
            for flag in ("_stage_forward_initialized", "_stage_backward_initialized",
                         "_stages_forward_initialized", "_stages_backward_initialized"):
                if hasattr(schedule, flag):
                    setattr(schedule, flag, False)
        self._shapes[mode] = shapes

    def _normalizer(self, labels: Optional[Tensor], normalizer: Union[Tensor, float, None]) -> Tensor:
        if normalizer is None:
            if labels is None:
                if self.is_last:
                    raise ValueError("the rank holding the last pipeline stage needs the labels.")
                return torch.ones((), device=self.device)  # unused: only the last stage computes the loss
            normalizer = self.loss_fn.count(labels)
        value = torch.as_tensor(normalizer, dtype=torch.float32, device=self.device)
        return value.clamp(min=1.0)  # nothing labelled: loss 0 rather than 0/0

    def _broadcast_loss(self, local: Optional[Tensor]) -> Tensor:
        total = local.detach().float().to(self.device) if self.is_last else torch.zeros((), device=self.device)
        if self.pp_mesh.size() > 1:
            dist.broadcast(total, src=dist.get_global_rank(self.group, self._last_rank), group=self.group)
        return total

    def train_step(
        self, inputs: Mapping[str, Any], labels: Optional[Tensor], normalizer: Union[Tensor, float, None] = None
    ) -> Tensor:
        """Forward and backward of one local batch through the pipeline; gradients accumulate into the
        stage modules' ``.grad`` (call ``optimizer.step()`` / ``zero_grad()`` yourself).

        Args:
            inputs: the model inputs (``input_ids``, ``attention_mask``, ...) of the whole local batch;
                every pipeline rank passes the same batch (only the first stage uses the input ids).
            labels: targets of the whole batch; needed on the rank holding the last stage, may be None
                elsewhere.
            normalizer: what each microbatch's loss is divided by; default ``loss_fn.count(labels)``,
                the labelled tokens of this batch. With data parallelism whose gradient reduction averages
                over ``dp`` ranks, pass ``global labelled tokens / dp`` for the exact global token mean.

        Returns:
            The batch loss (sum of the microbatch losses) on every pipeline rank, detached.
        """
        args, kwargs = self._arguments(inputs, "train")
        losses: list[Tensor] = []
        self.schedule.step(
            *args, target=labels, losses=losses, return_outputs=False,
            loss_kwargs={"normalizer": self._normalizer(labels, normalizer)}, **kwargs,
        )
        return self._broadcast_loss(torch.stack(losses).sum() if self.is_last else None)

    @torch.no_grad()
    def eval_step(
        self, inputs: Mapping[str, Any], labels: Optional[Tensor] = None, normalizer: Union[Tensor, float, None] = None
    ) -> EvalOutput:
        """Forward only: the merged last-stage output on the rank holding it (None elsewhere), and the
        batch loss on every pipeline rank when ``labels`` are given. Runs no backward action and no
        gradient reduction, and leaves the training schedule's state alone."""
        if self._eval_schedule is None:
            self._eval_schedule = self._build_eval_schedule()
        args, kwargs = self._arguments(inputs, "eval")
        output = self._eval_schedule.step(*args, **kwargs)
        loss = None
        if labels is not None:
            local = None
            if self.is_last:
                local = self.loss_fn(output, labels.to(self.device), self._normalizer(labels, normalizer))
            loss = self._broadcast_loss(local)
        return EvalOutput(output if self.is_last else None, loss)

    def _build_eval_schedule(self) -> Any:
        # Own PipelineStage objects over the same modules: their receive buffers are built without
        # gradients once, instead of torch re-inferring the training stages at every train/eval switch.
        stages = [PipelineStage(module, stage.stage_index, stage.num_stages, self.device, group=self.group)
                  for module, stage in zip(self.stage_modules, self.stages)]
        if self.schedule_name not in MULTI_STAGE_SCHEDULES:
            return _ScheduleForwardOnly(stages[0], self.microbatches)
        # torch's multi-stage runtime would still run the backward actions as no-ops in eval(), which fails
        # for stages adjacent on one rank (ZB-V) and reduces FSDP gradients. Keep the forward actions and
        # their sends/receives, in the schedule's own order.
        schedule = SCHEDULE_CLASSES[self.schedule_name](stages, n_microbatches=self.microbatches, loss_fn=None)
        schedule.pipeline_order_with_comms = _forward_only(schedule.pipeline_order_with_comms)
        return schedule


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
    loss_fn: Optional[PipelineLoss] = None,
    split_points: Optional[Sequence[int]] = None,
    tokens_per_microbatch: int = 0,
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
        loss_fn: ``count(target)`` and ``__call__(output, target, normalizer)`` returning the microbatch's
            share of the batch loss; default :class:`TokenCrossEntropy`.
        split_points: first block index of every stage (``pp × stages per rank`` entries), to pin the
            split; default: balanced by :func:`estimate_costs`.
        tokens_per_microbatch: adds an activation estimate to the balancing costs.
    """
    _check_schedule(schedule_name)
    pipeline = _require_pipeline(plan)
    _check_ownership(model, plan)
    pp_size, pp_rank = pp_mesh.size(), pp_mesh.get_local_rank()
    num_stages = pp_size * stages_per_rank(schedule_name)
    num_blocks = len(_block_list(model, plan))
    if num_stages > num_blocks:
        raise ValueError(
            f"pipeline parallelism over {pp_size} ranks with schedule {schedule_name!r} needs {num_stages} stages"
            f" ({stages_per_rank(schedule_name)} per rank), but {plan.name} has only {num_blocks} blocks."
        )
    if microbatches < 1:
        raise ValueError(f"microbatches must be a positive int, got {microbatches}.")
    points = plan_split(model, plan, num_stages, split_points, tokens_per_microbatch)
    ranges = block_ranges(points, num_blocks)
    loss_fn = loss_fn if loss_fn is not None else TokenCrossEntropy()
    device = torch.device(device)
    group = pp_mesh.get_group()

    stage_modules, stages = [], []
    for index in stage_indices(pp_rank, pp_size, schedule_name):
        module = build_stage_module(model, plan, index, num_stages, ranges[index])
        stage_modules.append(module)
        stages.append(PipelineStage(module, index, num_stages, device, group=group))

    schedule_cls = SCHEDULE_CLASSES[schedule_name]
    # scale_grads=False: each microbatch loss is already its share of the batch loss (see TokenCrossEntropy).
    target = stages if schedule_name in MULTI_STAGE_SCHEDULES else stages[0]
    schedule = schedule_cls(target, n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=False)
    return PipelineRuntime(stage_modules, stages, schedule, pp_mesh, schedule_name, pipeline, loss_fn, device,
                           points, microbatches)
