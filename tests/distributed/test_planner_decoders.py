"""The planner for decoder families (Llama, Mistral, Qwen2, Qwen3): shapes read from configs, exact state,
activations against autograd, divisibility reasons, the published shapes planned quickly, parallel=auto
in the LLM recipe, and the memory model against real jobs of a tiny Llama (benchmarks/planner_memory.py)."""

from __future__ import annotations

# ---------------------------------------------------------------- against real jobs (one launch per world size)
LLAMA_JOBS = ["single", "dp2", "tp2", "dp2xtp2", "pp2", "pp2xdp2",
              # sequence / loss parallelism, selective checkpointing (alone and together)
              "tp2_sp", "tp2_lp", "tp2_sac", "dp2xtp2_sp_lp_sac"]


def test_memory_model_matches_real_llama_jobs():
    """For every layout: state bytes of every rank exact; saved activations at their peak within 1%; nothing
    held between steps. Under selective checkpointing "saved" includes the outputs its policy keeps. The
    layouts of one world size share a launch (one Trainer each); every layout's failures are reported."""
    from benchmarks.planner_memory import compare

    failures = []
    for row in compare(LLAMA_JOBS, "llama"):
        predicted, measured = row["predicted"], row["measured"]
        if not row["state_exact"]:
            failures.append((row["layout"], "state", predicted["state_per_rank"], measured["state_per_rank"]))
        if measured["held_between_steps"] != 0:
            failures.append((row["layout"], "held between steps", measured["held_between_steps"]))
        if not (abs(row["activation_ratio"] - 1) < 0.01 and abs(row["peak_ratio"] - 1) < 0.01):
            failures.append((row["layout"], "ratios", row["activation_ratio"], row["peak_ratio"]))
    assert not failures, "layouts off the memory model:\n" + "\n".join(map(str, failures))
