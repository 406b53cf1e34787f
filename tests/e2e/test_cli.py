"""The lightning-mp command: ls, cp, run (Hydra arguments passed through: --config-path, --config-dir, -m,
overrides), convert, and the errors for names it does not know. Recipes run as subprocesses (Hydra owns
sys.argv and logging); the planner recipe is used because it is a dry run of a few seconds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from helpers.launch import ROOT, run_job


def lightning_mp(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return run_job([sys.executable, "-m", "lightning_mp", *args], cwd=cwd, timeout=300, check=False)


def test_run_passes_config_path_multirun_and_overrides_to_hydra(tmp_path):
    assert lightning_mp("cp", "plan", "my_conf", cwd=tmp_path).returncode == 0
    edited = tmp_path / "my_conf" / "plan.yaml"
    edited.write_text(edited.read_text().replace("device_memory_gb: 80", "device_memory_gb: 40"))
    result = lightning_mp("run", "plan", "--config-path", "my_conf", "-m", "trainer.devices=2,4", "show=1",
                          cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 devices (2 per node × 1 nodes, 40 GB each)" in result.stdout
    assert "4 devices (4 per node × 1 nodes, 40 GB each)" in result.stdout
    assert len(list((tmp_path / "multirun").glob("*/*/[01]"))) == 2  # Hydra's sweep directories, as with the script


def test_run_with_config_dir_adds_options_next_to_the_shipped_ones(tmp_path):
    (tmp_path / "extra" / "model").mkdir(parents=True)
    tiny = (ROOT / "conf" / "model" / "bert-tiny.yaml").read_text()
    (tmp_path / "extra" / "model" / "my-bert.yaml").write_text(tiny.replace("name: bert-tiny", "name: my-bert"))
    result = lightning_mp("run", "plan", "--config-dir", "extra", "model=my-bert", "show=1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("my-bert: ")
