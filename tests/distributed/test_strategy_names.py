"""The strategy by name: Lightning's registry after `import lightning_mp`, the presets, LightningCLI YAML
(2 ranks), and the checks that run under an external launcher (SLURM's numbers against the Trainer's)."""

from __future__ import annotations

import sys

import pytest
import torch

from helpers.compare import max_weight_difference
from helpers.launch import WORKERS, run_job, run_worker
from lightning_mp.config import MeshShape


def test_a_two_rank_job_by_name_matches_one_process(tmp_path, reference_runs):
    result = run_worker(tmp_path, devices=2, extra=("--strategy-name", "lightning_mp"))
    reference = reference_runs()
    assert result["strategy"] == "lightning_mp.strategy.ModelParallelStrategy"
    assert result["mesh_shape"] == MeshShape(pipeline=1, data_replicate=1, data_shard=2, tensor=1)
    assert result["losses"] == pytest.approx(reference["losses"], abs=1e-5)
    assert max_weight_difference(result["state_dict"], reference["state_dict"]) < 1e-5


YAML_BY_NAME = """
trainer:
  accelerator: cpu
  devices: 2
  strategy: lightning_mp_tensor_parallel
"""


YAML_CLASS_PATH = """
trainer:
  accelerator: cpu
  devices: 2
  strategy:
    class_path: lightning_mp.ModelParallelStrategy
    init_args:
      data_parallel_mode: replicated
"""


@pytest.mark.parametrize("yaml,shape", [
    (YAML_BY_NAME, MeshShape(pipeline=1, data_replicate=1, data_shard=1, tensor=2)),
    (YAML_CLASS_PATH, MeshShape(pipeline=1, data_replicate=2, data_shard=1, tensor=1)),
], ids=["name", "class_path"])
def test_lightning_cli_yaml_runs_a_two_rank_job(tmp_path, yaml, shape):
    (tmp_path / "job.yaml").write_text(yaml)
    out = tmp_path / "result.pt"
    cmd = [sys.executable, str(WORKERS / "lightning_cli.py"), "fit", "--config", "job.yaml", "--out", str(out)]
    proc = run_job(cmd, timeout=300, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = torch.load(out, weights_only=False)
    assert result["strategy"] == "ModelParallelStrategy" and result["world_size"] == 2
    assert result["mesh_shape"] == shape
    assert result["steps"] == 2
