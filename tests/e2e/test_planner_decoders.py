"""The planner for decoder families (Llama, Mistral, Qwen2, Qwen3): shapes read from configs, exact state,
activations against autograd, divisibility reasons, the published shapes planned quickly, parallel=auto
in the LLM recipe, and the memory model against real jobs of a tiny Llama (benchmarks/planner_memory.py)."""

from __future__ import annotations

import sys

from helpers.launch import ROOT, run_job


def test_plan_command_prints_the_table_for_a_decoder(tmp_path):
    result = run_job([sys.executable, str(ROOT / "recipes" / "plan.py"), "model=llama3-70b", "trainer.devices=8",
                      "trainer.num_nodes=32", "device_memory_gb=80", "seq_len=8192"], cwd=tmp_path, timeout=300,
                     check=False)
    assert result.returncode == 0, result.stderr
    assert "llama3-70b: 70,554M parameters, 256 devices" in result.stdout
    assert "chosen: dp=" in result.stdout and "would cross nodes" in result.stdout
    assert "128 pipeline stages need at least 128 blocks (one each), but the model has 80" in result.stdout
