"""srun on two nodes, simulated here: 4 processes started with the variables srun gives each task
(2 nodes × 2 tasks), no torchrun and no launcher of Lightning's. Lightning's SLURMEnvironment must be
detected, its ranks and the first host of SLURM_NODELIST used, and the job must match one process."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from helpers.compare import max_weight_difference
from helpers.launch import WORKERS, clean_env, free_port
from lightning_mp.config import MeshShape

NODES, TASKS_PER_NODE = 2, 2


def srun_environment(procid: int, port: str) -> dict[str, str]:
    """What srun sets for one task of `srun --nodes 2 --ntasks-per-node 2` (block distribution, the default).
    MASTER_ADDR is left unset on purpose: Lightning takes the first host of SLURM_NODELIST."""
    return clean_env() | {
        "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "ner", "SLURM_NNODES": str(NODES),
        "SLURM_NTASKS": str(NODES * TASKS_PER_NODE), "SLURM_NTASKS_PER_NODE": str(TASKS_PER_NODE),
        "SLURM_TASKS_PER_NODE": f"{TASKS_PER_NODE}(x{NODES})", "SLURM_NODELIST": "127.0.0.[1-2]",
        "SLURM_PROCID": str(procid), "SLURM_LOCALID": str(procid % TASKS_PER_NODE),
        "SLURM_NODEID": str(procid // TASKS_PER_NODE), "MASTER_PORT": port,
    }


def test_srun_two_nodes_matches_one_process(tmp_path, reference_runs):
    port, out = str(free_port()), tmp_path / "srun.pt"
    # Tensor parallel inside each node, data parallel across the two nodes: the usual multi-node layout.
    cmd = [sys.executable, str(WORKERS / "train.py"), "--out", str(out), "--devices", str(TASKS_PER_NODE),
           "--num-nodes", str(NODES), "--layout", '{"tensor_parallel_size": 2}']
    tasks = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                              env=srun_environment(procid, port))
             for procid in range(NODES * TASKS_PER_NODE)]
    logs = [task.communicate(timeout=300)[0] for task in tasks]
    assert all(task.returncode == 0 for task in tasks), "\n".join(log[-3000:] for log in logs)
    result = torch.load(out, weights_only=False)
    assert result["cluster_environment"] == "SLURMEnvironment"
    assert result["ranks"] == [(0, 0, 0), (1, 0, 1), (2, 1, 0), (3, 1, 1)]  # (global, node, local) per rank
    assert result["mesh_shape"] == MeshShape(pipeline=1, data_replicate=1, data_shard=2, tensor=2)
    reference = reference_runs()
    assert result["losses"] == pytest.approx(reference["losses"], abs=1e-5)
    assert max_weight_difference(result["state_dict"], reference["state_dict"]) < 1e-5
