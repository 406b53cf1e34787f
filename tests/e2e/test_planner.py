"""The planner: exact state bytes, the strategy's own pipeline split, choices that fit, and its memory
model checked against real jobs (benchmarks/planner_memory.py) on CPU ranks."""

from __future__ import annotations

import sys

from helpers.launch import ROOT, run_job


def test_plan_command_prints_a_ranked_table(tmp_path):
    result = run_job([sys.executable, str(ROOT / "recipes" / "plan.py"), "model=bert-large", "trainer.devices=8",
                      "trainer.num_nodes=16", "device_memory_gb=80"], cwd=tmp_path, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "bert-large: 334M parameters, 128 devices" in result.stdout
    assert "params    grads    optim    activ    total   step ms" in result.stdout
    assert "chosen: dp=" in result.stdout and "ModelParallelStrategy(**{" in result.stdout
    # One example of every kind of rejection.
    assert "would cross nodes" in result.stdout and \
        "need at least 32 blocks (one each), but the model has 24" in result.stdout
