"""Shared helpers: run a worker script as its own multi-process job and load what rank 0 wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKERS = Path(__file__).parent / "workers"
# Set by an in-process Trainer run; a child that inherited them would think torchrun had launched it.
LAUNCH_VARIABLES = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "GROUP_RANK",
                    "MASTER_ADDR", "MASTER_PORT")


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES} | {
        "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def run_worker(tmp_path: Path, *, devices: int = 1, layout: dict | None = None, strategy: str = "lightning_mp",
               extra: tuple[str, ...] = (), launcher: tuple[str, ...] = (), timeout: int = 300,
               script: str = "train.py", layouts: list[dict] | None = None) -> dict | list[dict]:
    """What rank 0 wrote. With ``layouts`` (train.py): one launch trains under each in turn; a list of results."""
    out = tmp_path / f"result-{os.urandom(4).hex()}.pt"
    choice = ("--layouts", json.dumps(layouts)) if layouts is not None else ("--layout", json.dumps(layout or {}))
    cmd = [*(launcher or (sys.executable,)), str(WORKERS / script), "--out", str(out), "--devices", str(devices),
           "--strategy", strategy, *choice, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=clean_env(), cwd=tmp_path)
    if proc.returncode != 0 or not out.exists():
        raise AssertionError(f"worker failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return torch.load(out, weights_only=False)


def max_weight_difference(a: dict, b: dict) -> float:
    assert set(a) == set(b), f"state dict keys differ: {sorted(set(a) ^ set(b))}"
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="session")
def reference_runs(tmp_path_factory):
    """Single-process runs on the whole global batch, computed once per worker script and extra arguments."""
    cache: dict[tuple[str, ...], dict] = {}
    base = tmp_path_factory.mktemp("reference")

    def get(*extra: str, script: str = "train.py") -> dict:
        if (script, *extra) not in cache:
            cache[(script, *extra)] = run_worker(base, strategy="none", extra=extra, script=script, timeout=600)
        return cache[(script, *extra)]

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
    from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

    def refuse(self):
        raise AssertionError("child processes were launched before validation failed")

    monkeypatch.setattr(_SubprocessScriptLauncher, "_call_children_scripts", refuse)
    yield
    assert not torch.distributed.is_initialized(), "a process group was created"
