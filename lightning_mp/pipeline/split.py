"""Cutting a planned model into pipeline stages: cost balancing, pinned splits, and stage modules.

Splitting follows torchtitan: every stage is a copy of the whole model from which everything the
stage does not own has been removed, so a parameter keeps the name (FQN) it has in the unsplit model
— checkpoints, tensor-parallel globs and optimizer state keep working per stage. The block list
(``plan.blocks``, an ``nn.ModuleList``) becomes an ``nn.ModuleDict`` keyed by the original indices
(``"3"``), so ``...layer.3.attention...`` stays that name on the stage that owns block 3. A pruned
model cannot run its own ``forward``; the stage runs the plan's pieces instead (``PipelinePlan``:
embed on the first stage, one call per owned block, head on the last stage). Nothing here knows a
model family: that lives in ``plans/``.
"""

from __future__ import annotations

import copy
import itertools
import types
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
from torch import Tensor, nn

from lightning_mp.config import too_few_blocks
from lightning_mp.plans import ModelPlan, PipelinePlan


# ---------------------------------------------------------------- balancing
@dataclass(frozen=True)
class StageCosts:
    """Cost of every block, plus what only the first stage (embeddings) and last stage (head) carry."""

    blocks: list[float]
    first: float = 0.0
    last: float = 0.0


def _parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def estimate_costs(model: nn.Module, plan: ModelPlan) -> StageCosts:
    """Parameters of every block; the plan's ``first`` modules count on the first stage, its ``last``
    modules on the last."""
    pipeline = require_pipeline(plan)

    def cost(module: nn.Module) -> float:
        return float(_parameter_count(module))

    blocks = [cost(block) for block in block_list(model, plan)]
    first = sum(cost(m) for m in (_get(model, path) for path in pipeline.first) if m is not None)
    last = sum(cost(m) for m in (_get(model, path) for path in pipeline.last) if m is not None)
    return StageCosts(blocks=blocks, first=first, last=last)


def _check_enough_blocks(num_stages: int, num_blocks: int) -> None:
    problem = too_few_blocks(num_stages, num_blocks)
    if problem:
        raise ValueError(f"cannot split the model into pipeline stages: {problem}.")


def balance_split(block_costs: Sequence[float], num_stages: int, first: float = 0.0, last: float = 0.0) -> list[int]:
    """First block of each stage for the contiguous split whose most expensive stage is cheapest.

    Stage ``s`` covers ``block_costs[points[s]:points[s + 1]]``; ``first`` and ``last`` are added to the
    first and last stage. Exact (dynamic programming over split points); among splits with the same
    maximum, the one with the smallest sum of squared stage costs is preferred.
    """
    n = len(block_costs)
    if num_stages < 1:
        raise ValueError(f"num_stages must be at least 1, got {num_stages}.")
    _check_enough_blocks(num_stages, n)
    prefix = np.array([0.0, *itertools.accumulate(float(c) for c in block_costs)])

    # best_*[i]: (max cost, sum of squares) of stages 0..s-1 covering blocks 0..i-1; back[s][i]: where the
    # last of those stages starts. Each stage is one array step over every (start, end) pair, so the
    # planner can split 100+ layers for every candidate layout quickly; ties resolve as a scan over starts
    # in increasing order keeping the first strictly better (max, sum of squares) would.
    best_max, best_sq = np.full(n + 1, np.inf), np.full(n + 1, np.inf)
    best_max[0] = best_sq[0] = 0.0
    back = np.zeros((num_stages + 1, n + 1), dtype=np.int64)
    index = np.arange(n + 1)
    for s in range(1, num_stages + 1):
        extra = (first if s == 1 else 0.0) + (last if s == num_stages else 0.0)
        cost = prefix[None, :] - prefix[:, None] + extra  # [start, end]
        valid = ((index[:, None] < index[None, :]) & (index[:, None] >= s - 1) & np.isfinite(best_max)[:, None]
                 & (index[None, :] >= s) & (index[None, :] <= n - (num_stages - s)))
        worst = np.where(valid, np.maximum(best_max[:, None], cost), np.inf)
        lowest = worst.min(axis=0)
        squares = np.where(valid & (worst == lowest[None, :]), best_sq[:, None] + cost * cost, np.inf)
        back[s] = squares.argmin(axis=0)
        reachable = np.isfinite(lowest)
        best_max = np.where(reachable, lowest, np.inf)
        best_sq = np.where(reachable, squares[back[s], index], np.inf)
    points, end = [], n
    for s in range(num_stages, 0, -1):
        end = int(back[s][end])
        points.append(end)
    return points[::-1]


def check_split_points(split_points: Sequence[int], num_stages: int, num_blocks: int) -> list[int]:
    """Validate a pinned split: ``num_stages`` increasing first-block indices starting at 0."""
    points = [int(p) for p in split_points]
    _check_enough_blocks(num_stages, num_blocks)
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
) -> list[int]:
    """The first block of every stage: ``split_points`` when pinned (validated), else balanced by cost."""
    num_blocks = len(block_list(model, plan))
    if split_points is not None:
        return check_split_points(split_points, num_stages, num_blocks)
    _check_enough_blocks(num_stages, num_blocks)
    costs = estimate_costs(model, plan)
    return balance_split(costs.blocks, num_stages, costs.first, costs.last)


def block_ranges(split_points: Sequence[int], num_blocks: int) -> list[range]:
    bounds = [*split_points, num_blocks]
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


# ---------------------------------------------------------------- splitting the model
def require_pipeline(plan: ModelPlan) -> PipelinePlan:
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
    module = getattr(owner, name, None)
    return module if isinstance(module, nn.Module) else None


def block_list(model: nn.Module, plan: ModelPlan) -> list[nn.Module]:
    return list(_blocks_by_index(model.get_submodule(plan.blocks)).values())  # type: ignore[arg-type]


def stage_blocks(stage_module: nn.Module, plan: ModelPlan) -> list[nn.Module]:
    """The blocks a stage module owns (its ``plan.blocks`` is an ``nn.ModuleDict``), in model order; the
    units for FSDP and activation checkpointing of that stage."""
    return block_list(stage_module, plan)


def check_ownership(model: nn.Module, plan: ModelPlan) -> list[tuple[str, str]]:
    """Every parameter must belong to exactly one part (first, a block, last), except one tied between
    the first and the last part (input and output embeddings): each of the two stages then holds a copy
    under its own name, and the pipeline keeps the copies equal (``pipeline/tied.py``). Returns those ties
    as (name on the first stage, name on the last stage); any other tie would become independent copies."""
    pipeline = require_pipeline(plan)
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
    ties, other = [], []
    for key, parts in parts_of_tensor.items():
        if parts == {"first", "last"}:
            names = names_of_tensor[key]
            ties.append((next(n for n in names if part_of(n) == "first"),
                         next(n for n in names if part_of(n) == "last")))
        elif len(parts) > 1:
            other.append(names_of_tensor[key])
    if other:
        raise ValueError(
            f"pipeline plan of {plan.name}: tied parameters {other[0]} are used by different pipeline parts (only"
            " a tie between the first and the last stage is supported); untie them or keep the model unpipelined."
        )
    return ties


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


def _blocks_by_index(container: nn.Module) -> dict[int, nn.Module]:
    """Blocks keyed by their index in the unsplit model (a pruned model holds a ModuleDict "3" -> block)."""
    if isinstance(container, nn.ModuleDict):
        return {int(key): block for key, block in container.items()}
    return dict(enumerate(container))


def _pruned_copy(model: nn.Module, plan: ModelPlan, keep_first: bool, keep_last: bool, blocks: Sequence[int],
                 share: bool) -> nn.Module:
    """A copy of ``model`` holding only the given parts, with the original FQNs.

    The unowned parts are detached from ``model`` for the duration of the deep copy (and put back), so
    only the kept parts are copied. With ``share`` nothing with state is copied at all: only the
    containers on the path to the blocks are new, every other module, parameter and buffer is the
    same object as in ``model`` (a view of it).
    """
    pipeline = require_pipeline(plan)
    assert plan.blocks is not None
    parent_path, _, attr = plan.blocks.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    original_blocks = getattr(parent, attr)
    by_index = _blocks_by_index(original_blocks)
    drop = [*(() if keep_first else pipeline.first), *(() if keep_last else pipeline.last)]
    removed: list[tuple[nn.Module, str, Optional[nn.Module]]] = []
    try:
        for path in drop:
            owner_path, _, name = path.rpartition(".")
            owner = model.get_submodule(owner_path) if owner_path else model
            removed.append((owner, name, getattr(owner, name)))
            setattr(owner, name, None)  # a registered submodule may be set to None (and back)
        setattr(parent, attr, nn.ModuleDict({str(i): by_index[i] for i in blocks}))
        memo: dict[int, Any] = {}
        if share:
            containers = {"", plan.blocks,
                          *(plan.blocks.rsplit(".", k)[0] for k in range(1, plan.blocks.count(".") + 1))}
            memo = {id(m): m for name, m in model.named_modules() if name not in containers}
            memo.update((id(t), t) for t in itertools.chain(model.parameters(), model.buffers()))
        pruned = copy.deepcopy(model, memo)
    finally:
        setattr(parent, attr, original_blocks)
        for owner, name, module in reversed(removed):
            setattr(owner, name, module)
    return pruned


def _make_stage(module: nn.Module, plan: ModelPlan, stage_index: int, num_stages: int,
                blocks: Sequence[int]) -> nn.Module:
    assert plan.pipeline is not None and plan.blocks is not None
    # An instance attribute: the class, and with it isinstance checks and every FQN, stays the model's.
    module._pipeline_role = StageRole(stage_index, num_stages, tuple(blocks), plan.pipeline, plan.blocks)
    module.forward = types.MethodType(_stage_forward, module)
    return module


def build_rank_modules(model: nn.Module, plan: ModelPlan, stage_blocks_of: dict[int, Sequence[int]],
                       num_stages: int) -> tuple[nn.Module, list[nn.Module]]:
    """What one pipeline rank holds: a *shell* with every part of its stages (what the LightningModule
    keeps, so its parameters, state dict and optimizer see exactly this rank's share under the original
    FQNs), and one stage module per stage (ascending index) that shares the shell's parameters.

    The shell is a copy of the owned parts of ``model``; the stage modules are views of the shell, so
    the two never hold separate weights. Stage modules are what torch's ``PipelineStage`` runs and
    what tensor parallelism and FSDP are applied to; the shell is never run by the schedule, so a
    Lightning hook calling it does not disturb FSDP's state.
    """
    indices = sorted(stage_blocks_of)
    owned = sorted(itertools.chain.from_iterable(stage_blocks_of.values()))
    shell = _pruned_copy(model, plan, 0 in indices, num_stages - 1 in indices, owned, share=False)
    stages = [
        _make_stage(_pruned_copy(shell, plan, index == 0, index == num_stages - 1, stage_blocks_of[index], share=True),
                    plan, index, num_stages, stage_blocks_of[index])
        for index in indices
    ]
    return shell, stages
