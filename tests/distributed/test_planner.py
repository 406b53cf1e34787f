"""The planner: exact state bytes, the strategy's own pipeline split, choices that fit, and its memory
model checked against real jobs (benchmarks/planner_memory.py) on CPU ranks."""

from __future__ import annotations


def test_memory_model_matches_real_jobs():
    """Parameter/gradient/optimizer bytes of every rank exact; peak (state + saved activations) within 15%."""
    from benchmarks.planner_memory import compare

    rows = compare(["single", "dp2", "tp2", "dp2xtp2", "hybrid2x2", "pp2", "pp2_gpipe", "pp2xdp2"])
    for row in rows:
        assert row["state_exact"], (row["layout"], row["predicted"]["state_per_rank"],
                                    row["measured"]["state_per_rank"])
        assert 0.85 <= row["peak_ratio"] <= 1.15, (row["layout"], row["peak_ratio"])
