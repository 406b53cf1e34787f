"""Every private torch and Lightning name lightning_mp uses, imported here and nowhere else.

Underscore names carry no compatibility promise: a release may rename or remove any of them. Importing
them in one place means an upgrade breaks here, at import time, with a message that names the missing
name and the versions this module was written for, instead of somewhere deep inside a training step or
(worse) by silently skipping work behind a ``hasattr``. ``tests/unit/test_compat.py`` pins the versions and
checks that every name below exists.

Written for torch 2.13 and Lightning 2.6.
"""

from __future__ import annotations

import importlib
from typing import Any

import lightning
import torch

TESTED_TORCH = "2.13"
TESTED_LIGHTNING = "2.6"


class PrivateAPIError(ImportError):
    """A private torch/Lightning name this package relies on is gone (renamed or removed upstream)."""


def _missing(what: str, where: str) -> PrivateAPIError:
    return PrivateAPIError(
        f"lightning_mp needs the private name {what} from {where}, which this installation lacks"
        f" (torch {torch.__version__}, lightning {lightning.__version__}; lightning_mp was written for torch"
        f" {TESTED_TORCH} and Lightning {TESTED_LIGHTNING}). Install those versions, or update lightning_mp/_compat.py."
    )


def _require(module: str, name: str) -> Any:
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        raise _missing(name, module) from error


# ---------------------------------------------------------------- Lightning
init_dist_connection = _require("lightning.fabric.utilities.distributed", "_init_dist_connection")
destroy_dist_connection = _require("lightning.fabric.utilities.distributed", "_destroy_dist_connection")
distributed_is_initialized = _require("lightning.fabric.utilities.distributed", "_distributed_is_initialized")
default_process_group_backend_for_device = _require(
    "lightning.fabric.utilities.distributed", "_get_default_process_group_backend_for_device")
sync_ddp_if_available = _require("lightning.fabric.utilities.distributed", "_sync_ddp_if_available")
materialize_distributed_module = _require("lightning.fabric.utilities.init", "_materialize_distributed_module")
optimizers_to_device = _require("lightning.fabric.utilities.optimizer", "_optimizers_to_device")
collect_rng_states = _require("lightning.fabric.utilities.seed", "_collect_rng_states")
set_rng_states = _require("lightning.fabric.utilities.seed", "_set_rng_states")
SubprocessScriptLauncher = _require("lightning.pytorch.strategies.launchers.subprocess_script",
                                    "_SubprocessScriptLauncher")


def unwrap_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside Lightning's ``LightningOptimizer`` wrapper (its ``_optimizer``)."""
    from lightning.pytorch.core.optimizer import LightningOptimizer

    if not isinstance(optimizer, LightningOptimizer):
        return optimizer
    if not hasattr(optimizer, "_optimizer"):
        raise _missing("LightningOptimizer._optimizer", "lightning.pytorch.core.optimizer")
    return optimizer._optimizer


def set_module_device_mesh(module: Any, mesh: Any) -> None:
    """What ``LightningModule.device_mesh`` returns (Lightning reads its private ``_device_mesh``)."""
    if "_device_mesh" not in vars(module):
        raise _missing("LightningModule._device_mesh", "lightning.pytorch.core.module")
    module._device_mesh = mesh


# The strategy overrides this private hook of Lightning's Strategy to reject layouts before launch.
STRATEGY_LAUNCHER_HOOK = "_configure_launcher"
if not hasattr(_require("lightning.pytorch.strategies.parallel", "ParallelStrategy"), STRATEGY_LAUNCHER_HOOK):
    raise _missing(f"Strategy.{STRATEGY_LAUNCHER_HOOK}", "lightning.pytorch.strategies")

# ---------------------------------------------------------------- torch
tree_flatten = _require("torch.utils._pytree", "tree_flatten")
tree_unflatten = _require("torch.utils._pytree", "tree_unflatten")
foreach_norm = _require("torch", "_foreach_norm")
foreach_mul_ = _require("torch", "_foreach_mul_")
composable_checkpoint = _require("torch.distributed._composable", "checkpoint")
# Wrapper tensors (e.g. the AsyncCollectiveTensor of a functional collective) hold their bytes in an inner tensor.
is_traceable_wrapper_subclass = _require("torch.utils._python_dispatch", "is_traceable_wrapper_subclass")
# The collectives DTensor issues (tensor parallelism), as ops a selective checkpointing policy can keep.
functional_collectives = _require("torch.ops", "_c10d_functional")
# Runs a function once the current backward pass has finished (what DDP and FSDP2 use to wait for their
# gradient reductions); the replicated data-parallel mode finishes its bucketed all-reduces there.
_execution_engine = getattr(_require("torch.autograd.variable", "Variable"), "_execution_engine", None)
if _execution_engine is None or not hasattr(_execution_engine, "queue_callback"):
    raise _missing("Variable._execution_engine.queue_callback", "torch.autograd.variable")
queue_backward_callback = _execution_engine.queue_callback
get_default_store = _require("torch.distributed.distributed_c10d", "_get_default_store")
# What torch.compile did in this process (graphs captured, frames tried): tests and benchmarks bound recompiles.
dynamo_counters = _require("torch._dynamo.utils", "counters")
dynamo_config = _require("torch._dynamo", "config")
if not hasattr(dynamo_config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
    raise _missing("torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint", "torch._dynamo")
ScheduleForwardOnly = _require("torch.distributed.pipelining.schedules", "_ScheduleForwardOnly")
EmptyStateDictLoadPlanner = _require("torch.distributed.checkpoint.default_planner", "_EmptyStateDictLoadPlanner")
load_state_dict_without_planning = _require("torch.distributed.checkpoint.state_dict_loader", "_load_state_dict")

if not hasattr(_require("torch.distributed.device_mesh", "DeviceMesh"), "_flatten"):
    raise _missing("DeviceMesh._flatten", "torch.distributed.device_mesh")


def flatten_mesh(mesh: Any, name: str) -> Any:
    """One mesh dimension named ``name`` spanning every dimension of ``mesh`` (DeviceMesh._flatten)."""
    return mesh._flatten(name)


# A pipeline schedule infers the shapes sent between stages once (running the first microbatch) and marks
# that with these flags; single-stage schedules use the first pair, multi-stage ones the second.
_SINGLE_STAGE_FLAGS = ("_stage_forward_initialized", "_stage_backward_initialized")
_MULTI_STAGE_FLAGS = ("_stages_forward_initialized", "_stages_backward_initialized")
_SINGLE_STAGE_INIT = "_initialize_stage"
_MULTI_STAGE_INIT = "_initialize_stages"


def _schedule_kind(schedule: Any) -> tuple[tuple[str, str], str]:
    from torch.distributed.pipelining.schedules import PipelineScheduleMulti, PipelineScheduleSingle

    if isinstance(schedule, PipelineScheduleSingle):
        return _SINGLE_STAGE_FLAGS, _SINGLE_STAGE_INIT
    if isinstance(schedule, PipelineScheduleMulti):
        return _MULTI_STAGE_FLAGS, _MULTI_STAGE_INIT
    raise TypeError(f"{type(schedule).__name__} is not a torch pipeline schedule.")


def reset_shape_inference(schedule: Any) -> None:
    """Make ``schedule`` infer the shapes sent between stages again at its next step."""
    flags, _ = _schedule_kind(schedule)
    for flag in flags:
        if not hasattr(schedule, flag):
            raise _missing(f"{type(schedule).__name__}.{flag}", "torch.distributed.pipelining.schedules")
        setattr(schedule, flag, False)


def wrap_shape_inference(schedule: Any, wrapper: Any) -> None:
    """Replace the schedule's stage-initialization method (which runs shape inference) by
    ``wrapper(original)``."""
    _, name = _schedule_kind(schedule)
    original = getattr(schedule, name, None)
    if original is None:
        raise _missing(f"{type(schedule).__name__}.{name}", "torch.distributed.pipelining.schedules")
    setattr(schedule, name, wrapper(original))


def check_schedule_internals() -> None:
    """Fail now, not at the first shape change, if the schedules' private members are gone."""
    from torch.distributed.pipelining.schedules import PipelineScheduleMulti, PipelineScheduleSingle

    for cls, init in ((PipelineScheduleSingle, _SINGLE_STAGE_INIT), (PipelineScheduleMulti, _MULTI_STAGE_INIT)):
        if not hasattr(cls, init):
            raise _missing(f"{cls.__name__}.{init}", "torch.distributed.pipelining.schedules")


check_schedule_internals()


# A PipelineStage keeps the metadata of the tensors it sends and receives (shape, stride, dtype, grad) in
# ``_stage_meta``; metadata given up front (``_user_meta``, the constructor's input_args/output_args) makes the
# schedule's next initialization use it instead of running the stage (its "static" mode).
# torch 2.11 has neither class: they are looked up when a pipeline is built (``stage_metadata_types``), so that
# layouts without a pipeline run on such a torch while a pipeline fails at once, naming the versions.
def stage_metadata_types() -> tuple[Any, Any]:
    """``(_StageMeta, _TensorMeta)`` of ``torch.distributed.pipelining._utils``."""
    return (_require("torch.distributed.pipelining._utils", "_StageMeta"),
            _require("torch.distributed.pipelining._utils", "_TensorMeta"))


def stage_metadata(stage: Any) -> Any:
    """The metadata ``stage`` last used (``PipelineStage._stage_meta``)."""
    if not hasattr(stage, "_stage_meta"):
        raise _missing("PipelineStage._stage_meta", "torch.distributed.pipelining.stage")
    return stage._stage_meta


def give_stage_metadata(stage: Any, meta: Any) -> None:
    """Metadata for the next initialization of ``stage`` (``PipelineStage._user_meta``); an empty one lets
    torch infer again."""
    if not hasattr(stage, "_user_meta"):
        raise _missing("PipelineStage._user_meta", "torch.distributed.pipelining.stage")
    stage._user_meta = meta


# ---------------------------------------------------------------- FSDP2 (reading back a unit's configuration)
def fsdp_unit_settings(module: Any) -> dict[str, Any]:
    """What an FSDP2 unit was configured with, which FSDP2 has no public getter for: the modules it prefetches
    in forward and in backward (explicitly set; empty: FSDP2's implicit order) and its reduction dtype."""
    try:
        state = module._get_fsdp_state()
        return {"forward_prefetch": [s._modules[0] for s in state._states_to_forward_prefetch],
                "backward_prefetch": [s._modules[0] for s in state._states_to_backward_prefetch],
                "reduce_dtype": state._fsdp_param_group.mp_policy.reduce_dtype}
    except AttributeError as error:
        raise _missing("FSDPState._states_to_{forward,backward}_prefetch / _fsdp_param_group.mp_policy",
                       "torch.distributed.fsdp._fully_shard") from error


def fake_process_group_store() -> Any:
    """A store for ``init_process_group("fake", ...)``: one process stands for rank r of a world of any size,
    every collective a no-op (torch's own tests use it; ``FakeStore`` in ``torch.testing._internal``). Looked up
    on use: importing it costs the test-support modules."""
    return _require("torch.testing._internal.distributed.fake_pg", "FakeStore")()
