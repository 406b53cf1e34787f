"""The lint step (ruff: line length, import order, unused and undefined names; configured in pyproject.toml),
part of every test run so that it is never skipped. Before committing: ``ruff check .`` (``--fix`` sorts
imports and drops unused ones)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from helpers.launch import ROOT


def test_ruff_finds_nothing():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")  # the venv's first
    assert ruff, "ruff is part of the test extra: pip install -e '.[test]'"
    done = subprocess.run([ruff, "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
