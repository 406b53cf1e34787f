"""Tiers, time limits and the fixtures every tier shares.

A test's tier is its folder: ``unit/`` (one process, no launch: what a bare ``pytest`` runs), ``distributed/``
(CPU ranks over gloo), ``e2e/`` (whole recipes, the wheel, the command line). Each tier gets its marker, so
``pytest tests -m "not e2e"`` works too, and its own time limit (pytest-timeout): a hang fails that test with
its stack, and the launcher (``helpers/launch.py``) kills the ranks it started.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from helpers.launch import LAUNCH_VARIABLES, run_worker

TIERS = {"unit": 120, "distributed": 900, "e2e": 1500}  # seconds per test, unless a test sets its own


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        tier = Path(item.path).relative_to(here).parts[0]
        if tier not in TIERS:
            raise pytest.UsageError(f"{item.nodeid}: tests live in tests/{{{','.join(TIERS)}}}/, not tests/{tier}/")
        item.add_marker(getattr(pytest.mark, tier))
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(TIERS[tier]))


@pytest.fixture(scope="session")
def reference_runs(tmp_path_factory):
    """Single-process runs on the whole global batch, computed once per worker script and extra arguments, and
    once per run of the suite: pytest-xdist's workers share them through files in the run's temporary folder
    (the first to need one computes it while holding its lock)."""
    cache: dict[tuple[str, ...], dict] = {}
    base = tmp_path_factory.getbasetemp()
    shared = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "reference-runs"
    shared.mkdir(exist_ok=True)

    def get(*extra: str, script: str = "train.py") -> dict:
        key = (script, *extra)
        if key not in cache:
            stored = shared / (hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16] + ".pt")
            with open(stored.with_suffix(".lock"), "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not stored.exists():
                    result = run_worker(shared, strategy="none", extra=extra, script=script, timeout=600)
                    torch.save(result, stored.with_suffix(".partial"))
                    os.replace(stored.with_suffix(".partial"), stored)
            cache[key] = torch.load(stored, weights_only=False)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def shared_launches(tmp_path_factory):
    """train.py under several layouts of one world size in one launch (``--layouts``), made when a test first
    asks for it and shared by the tests that each check one of them: a launch costs about as much as the
    tiny model's training. ``get(table, name, *extra)`` is ``name``'s result; ``table`` maps names to
    (devices, layout), and its entries with ``name``'s device count share the launch."""
    cache: dict[tuple, list[dict] | AssertionError] = {}
    base = tmp_path_factory.mktemp("shared-launch")

    def get(table: dict[str, tuple[int, dict]], name: str, *extra: str) -> dict:
        devices = table[name][0]
        group = [n for n, (d, _) in table.items() if d == devices]
        layouts = [table[n][1] for n in group]
        key = (devices, json.dumps(layouts, sort_keys=True), extra)
        if key not in cache:
            try:
                cache[key] = run_worker(base, devices=devices, layouts=layouts, extra=extra,
                                        timeout=300 * len(layouts))
            except AssertionError as failure:  # one failed launch, reported to each test that shares it
                cache[key] = failure
        if isinstance(cache[key], AssertionError):
            raise cache[key]
        return cache[key][group.index(name)]

    return get


@pytest.fixture
def in_process_run(monkeypatch):
    """An in-process Trainer leaves a process group and launcher variables behind; remove both."""
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.fixture
def no_child_processes(monkeypatch):
    """If validation ever let a bad layout through, fail instead of forking pytest."""
    from lightning_mp._compat import SubprocessScriptLauncher

    def refuse(self):
        raise AssertionError("child processes were launched before validation failed")

    monkeypatch.setattr(SubprocessScriptLauncher, "_call_children_scripts", refuse)
    yield
    assert not torch.distributed.is_initialized(), "a process group was created"
