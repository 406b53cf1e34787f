"""The private-API fence: every private torch/Lightning name is imported in lightning_mp/_compat.py and
nowhere else, the fence was written for the installed versions, and a missing name fails loudly."""

from __future__ import annotations

import re
from pathlib import Path

import lightning
import pytest
import torch

from lightning_mp import _compat

PACKAGE = Path(_compat.__file__).parent
# `from torch... import _x`, `from lightning... import (..., _x)`, `import torch._x`, `torch.distributed._x` access.
PRIVATE_IMPORT = re.compile(r"^\s*from\s+(torch|lightning)(\.\w+)*\s+import\s+\(?[^#\n]*\b_[A-Za-z]", re.M)
PRIVATE_MODULE = re.compile(r"\b(torch|lightning)(\.\w+)*\._[A-Za-z]\w*")


def test_fence_was_written_for_the_installed_versions():
    assert torch.__version__.startswith(_compat.TESTED_TORCH), torch.__version__
    assert lightning.__version__.startswith(_compat.TESTED_LIGHTNING), lightning.__version__


def test_no_private_name_is_imported_outside_the_fence():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "_compat.py":
            continue
        text = path.read_text()
        # Multi-line import lists: join continuation lines so a name on its own line is seen too.
        joined = re.sub(r"\(\s*\n", "(", re.sub(r",\s*\n\s*", ", ", text))
        offenders += [f"{path.relative_to(PACKAGE)}: {m.group(0).strip()}" for m in PRIVATE_IMPORT.finditer(joined)]
        code = "\n".join(line.split("#")[0] for line in text.splitlines())
        offenders += [f"{path.relative_to(PACKAGE)}: {m.group(0)}" for m in PRIVATE_MODULE.finditer(code)]
    assert not offenders, "private torch/Lightning names outside lightning_mp/_compat.py:\n" + "\n".join(offenders)


def test_the_grep_sees_what_it_is_meant_to_see():
    assert PRIVATE_IMPORT.search("from lightning.fabric.utilities.seed import _collect_rng_states\n")
    assert PRIVATE_IMPORT.search("from torch.utils._pytree import tree_flatten\n") is None  # caught by PRIVATE_MODULE
    assert PRIVATE_MODULE.search("from torch.utils._pytree import tree_flatten")
    assert PRIVATE_MODULE.search("norms = torch._foreach_norm(grads)")
    assert PRIVATE_MODULE.search("x = dist.distributed_c10d._get_default_store()") is None  # an alias: see below
    assert PRIVATE_IMPORT.search("from torch.distributed.pipelining import (PipelineStage, _ScheduleForwardOnly)\n")


def test_private_attribute_calls_outside_the_fence():
    """Private attributes reached through aliases (``dist._x``, ``mesh._flatten``) go through the fence too."""
    names = ("_flatten", "_get_default_store", "_ScheduleForwardOnly", "_initialize_stage",
             "_stage_forward_initialized",
             "_stages_forward_initialized", "_optimizer", "_device_mesh", "_foreach_", "_EmptyStateDictLoadPlanner",
             "_load_state_dict", "_composable")
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "_compat.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            offenders += [f"{path.relative_to(PACKAGE)}:{number}: {name}" for name in names
                          if re.search(rf"(?<!\bself)\.{name}", code)]  # our own attributes may share a name
    assert not offenders, offenders


def test_every_fenced_name_exists():
    for name in ("init_dist_connection", "destroy_dist_connection", "distributed_is_initialized",
                 "default_process_group_backend_for_device", "sync_ddp_if_available", "materialize_distributed_module",
                 "optimizers_to_device", "collect_rng_states", "set_rng_states", "SubprocessScriptLauncher",
                 "tree_flatten", "tree_unflatten", "foreach_norm", "foreach_mul_", "composable_checkpoint",
                 "get_default_store", "ScheduleForwardOnly", "EmptyStateDictLoadPlanner",
                 "load_state_dict_without_planning", "queue_backward_callback"):
        assert callable(getattr(_compat, name)), name
    _compat.check_schedule_internals()
    assert all(isinstance(cls, type) for cls in _compat.stage_metadata_types())


def test_a_missing_private_name_fails_loudly_with_the_versions():
    with pytest.raises(_compat.PrivateAPIError, match=r"_no_such_name from torch\.distributed.*torch 2\.13.*written for"
                                                      r" torch 2\.13 and Lightning 2\.6"):
        _compat._require("torch.distributed", "_no_such_name")


def test_a_renamed_schedule_flag_is_an_error_not_a_silent_no_op():
    from torch.distributed.pipelining.schedules import Schedule1F1B

    schedule = Schedule1F1B.__new__(Schedule1F1B)  # no stage needed: only the flags are looked at
    with pytest.raises(_compat.PrivateAPIError, match="Schedule1F1B._stage_forward_initialized"):
        _compat.reset_shape_inference(schedule)
    schedule._stage_forward_initialized = schedule._stage_backward_initialized = True
    _compat.reset_shape_inference(schedule)
    assert not schedule._stage_forward_initialized and not schedule._stage_backward_initialized


def test_lightning_module_device_mesh_goes_through_the_fence():
    mesh = object()
    module = lightning.LightningModule()
    _compat.set_module_device_mesh(module, mesh)
    assert module.device_mesh is mesh
