"""The pipeline axis at the torch level (no Trainer): splitting, balancing, and parity of every schedule
with a single process on the same batches (losses, gradient norms, weights after 3 AdamW steps).

Multi-process tests run ``tests/workers/pipeline_axis.py`` under torch.distributed.run, CPU ranks over
gloo; each launch runs several schedules one after another to keep process start-ups few.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from helpers.launch import run_worker_script

FP32_TOLERANCE = 1e-5


SCHEDULES = ["gpipe", "1f1b", "interleaved_1f1b", "interleaved_zero_bubble", "zbv_zero_bubble"]


PINNED = "1f1b:0,3"  # pp=2: stage 0 = blocks 0-2, stage 1 = block 3 (the balancer would pick [0, 2])


def launch(tmp_path: Path, nproc: int, jobs: list[str], microbatches: int, timeout: int = 240) -> dict:
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}")
    return run_worker_script("pipeline_axis.py", "--microbatches", str(microbatches),
                             *(arg for job in jobs for arg in ("--job", job)), cwd=tmp_path, timeout=timeout,
                             launcher=torchrun, out_suffix=".json")


@pytest.fixture(scope="module")
def pp2(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("pp2"), 2, [*SCHEDULES, PINNED], microbatches=4)


@pytest.fixture(scope="module")
def pp4(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("pp4"), 4, ["1f1b"], microbatches=8)


def assert_parity(result: dict) -> None:
    assert result["losses"] == pytest.approx(result["ref_losses"], abs=FP32_TOLERANCE)
    assert result["max_weight_diff"] < FP32_TOLERANCE
    assert result["max_grad_norm_diff"] < FP32_TOLERANCE  # total_grad_norm summed over the pipeline group
    assert result["eval_logits_diff"] < FP32_TOLERANCE  # forward only, on another sequence length
    assert result["eval_output_only_on_last"]
    assert result["eval_loss_diff"] < FP32_TOLERANCE
    assert result["train_after_eval_loss_diff"] < FP32_TOLERANCE
    assert result["fqn_subset"] and result["fqn_union"] and result["fqn_disjoint"]


# ---------------------------------------------------------------- multi-process parity
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_pp2_schedule_matches_single_process(schedule, pp2):
    assert_parity(pp2[schedule])


def test_stage_placement_per_schedule(pp2):
    assert pp2["gpipe"]["stages_per_rank"] == [[0], [1]]
    assert pp2["1f1b"]["split_points"] == [0, 2]
    assert pp2["interleaved_1f1b"]["stages_per_rank"] == [[0, 2], [1, 3]]
    assert pp2["interleaved_zero_bubble"]["stages_per_rank"] == [[0, 2], [1, 3]]
    assert pp2["zbv_zero_bubble"]["stages_per_rank"] == [[0, 3], [1, 2]]  # "V": first and last on rank 0
    assert pp2["zbv_zero_bubble"]["split_points"] == [0, 1, 2, 3]
    # Parameter names on a stage are those of the unsplit model (block index kept).
    assert pp2["1f1b"]["sample_stage_fqn"].startswith("bert.encoder.layer.2.")


def test_pinned_split_matches_single_process(pp2):
    assert pp2[PINNED]["split_points"] == [0, 3]
    assert_parity(pp2[PINNED])


def test_pp4_1f1b_matches_single_process(pp4):
    assert pp4["1f1b"]["stages_per_rank"] == [[0], [1], [2], [3]]
    assert_parity(pp4["1f1b"])


def test_data_makes_token_weighting_matter(pp2, pp4):
    """Guards the test data: microbatches hold different numbers of labelled tokens, so a mean of
    microbatch means (what torch's default scale_grads=True computes) differs from the batch loss."""
    for result in (pp2, pp4):
        assert len(set(result["guards"]["counts"])) > 1
        assert result["guards"]["mean_of_means_gap"] > 1e-4
