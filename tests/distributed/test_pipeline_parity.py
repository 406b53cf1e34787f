"""Pipeline parallelism under the Trainer equals one process on the global batch: losses per step,
weights after 3 AdamW steps (1e-5, fp32), and validation loss and accuracy (a torchmetrics metric fed
with logits) after training — for every schedule, pp=4, and pp composed with tensor and data parallel.

The module is the ordinary TinyBertModule (no pipeline code); its training_step logs train_loss with
sync_dist, which the worker records per step, so these tests also check that the logged loss reaches
the logger once per step with the batch's value. The validation set has 22 rows, so its last local
batch is not a multiple of the microbatches (padded inside the strategy, cut off before the metric).
"""

from __future__ import annotations

import pytest

from helpers.compare import max_weight_difference
from helpers.launch import run_worker

FP32_TOLERANCE = 1e-5
FOUR_LAYERS = ("--layers", "4", "--validate")

# Every schedule runs below at pp2xdp2 with batches of changing width (validation included), which covers it
# with fixed widths too; here: one schedule without data parallelism (torch's own shape inference is then
# allowed), a pinned split, four stages, and tensor parallelism inside the stages.
LAYOUTS = {
    "pp2_1f1b": (2, {"pipeline_parallel_size": 2, "pipeline_schedule": "1f1b", "microbatches": 4}),
    "pp2_pinned_split": (2, {"pipeline_parallel_size": 2, "microbatches": 4, "pipeline_split_points": [0, 3]}),
    "pp4_1f1b": (4, {"pipeline_parallel_size": 4, "microbatches": 8}),
    "pp2xtp2": (4, {"pipeline_parallel_size": 2, "tensor_parallel_size": 2, "data_parallel_size": 1,
                    "microbatches": 4}),
}


SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "interleaved_zero_bubble", "zbv_zero_bubble")
VARIABLE_WIDTH = (*FOUR_LAYERS, "--variable-width")


def assert_matches(result: dict, reference: dict) -> None:
    assert result["losses"] == pytest.approx(reference["losses"], abs=FP32_TOLERANCE)
    assert max_weight_difference(result["state_dict"], reference["state_dict"]) < FP32_TOLERANCE
    assert result["validation"]["val_loss"] == pytest.approx(reference["validation"]["val_loss"], abs=FP32_TOLERANCE)
    assert result["validation"]["val_accuracy"] == pytest.approx(reference["validation"]["val_accuracy"], abs=1e-6)
    # A summed log: the microbatches' counts added (not averaged), once per data-parallel rank.
    assert result["labelled_tokens"] == reference["labelled_tokens"]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_pipeline_layout_matches_single_process(name, reference_runs, shared_launches):
    reference = reference_runs(*FOUR_LAYERS)
    assert_matches(shared_launches(LAYOUTS, name, *FOUR_LAYERS), reference)  # one launch per world size


CLIPPED_ACCUMULATED = (*FOUR_LAYERS, "--clip", "0.05", "--accumulate", "2", "--steps", "2")
# Both data-parallel modes under the same pipeline, clipped and accumulated alike: one launch for the two tests.
PP2_DP2_CLIPPED = {
    "fully_sharded": (4, {"pipeline_parallel_size": 2, "data_parallel_size": 2, "microbatches": 2}),
    "replicated": (4, {"pipeline_parallel_size": 2, "data_parallel_size": 2, "data_parallel_mode": "replicated",
                       "microbatches": 2}),
}


def test_pipeline_clipping_and_accumulation_match(reference_runs, shared_launches):
    """Clipping by the global norm over pipeline, data and tensor shards, with 2 batches accumulated."""
    reference = reference_runs(*CLIPPED_ACCUMULATED)
    assert_matches(shared_launches(PP2_DP2_CLIPPED, "fully_sharded", *CLIPPED_ACCUMULATED), reference)


def test_pipeline_with_replicated_data_parallelism_clipped_and_accumulated_matches(reference_runs, shared_launches):
    """The stages' gradients are averaged once after the schedule (no FSDP inside the stages)."""
    reference = reference_runs(*CLIPPED_ACCUMULATED)
    assert_matches(shared_launches(PP2_DP2_CLIPPED, "replicated", *CLIPPED_ACCUMULATED), reference)


def test_pipeline_with_replicated_data_parallelism_and_changing_width_matches(tmp_path, reference_runs):
    """Zero-bubble: weight gradients computed apart from input gradients; batches of changing width, which
    without FSDP one rank may re-infer alone."""
    extra = (*FOUR_LAYERS, "--variable-width")
    layout = {"pipeline_parallel_size": 2, "data_parallel_size": 2, "data_parallel_mode": "replicated",
              "pipeline_schedule": "zbv_zero_bubble", "microbatches": 2}
    assert_matches(run_worker(tmp_path, devices=4, layout=layout, extra=extra), reference_runs(*extra))


def test_pipeline_with_activation_checkpointing_and_bf16(tmp_path, reference_runs):
    extra = (*FOUR_LAYERS, "--precision", "bf16-mixed")
    reference = reference_runs(*extra)
    layout = {"pipeline_parallel_size": 2, "microbatches": 4, "activation_checkpointing": True}
    result = run_worker(tmp_path, devices=2, layout=layout, extra=extra)
    assert result["losses"] == pytest.approx(reference["losses"], abs=2e-2)
    assert max_weight_difference(result["state_dict"], reference["state_dict"]) < 5e-3
    # Rank 0 holds the first stage (blocks 0-1 of the balanced split [0, 2]); each of its blocks recomputes.
    assert result["checkpointed"] == ["model.bert.encoder.layer.0", "model.bert.encoder.layer.1"]


# Every schedule at pp2xdp2; at 8 ranks (about 95 s a run on 2 cores) one single-stage and one two-stage-per-rank
# schedule: the shapes are derived per stage, and tensor parallelism only changes what runs inside a stage.
# The schedules of one world size train in one launch (a Trainer each), shared by their tests.
CHANGING_WIDTH = {f"{schedule}-pp2xdp2{'xtp2' if tensor == 2 else ''}": (
    4 * tensor, {"pipeline_parallel_size": 2, "data_parallel_size": 2, "tensor_parallel_size": tensor,
                 "pipeline_schedule": schedule, "microbatches": 4})
    for schedule, tensor in [(schedule, 1) for schedule in SCHEDULES] + [("1f1b", 2), ("zbv_zero_bubble", 2)]}


@pytest.mark.parametrize("name", list(CHANGING_WIDTH))
def test_batches_of_changing_width_match(name, reference_runs, shared_launches):
    """Each batch padded to its own longest row, and only data-parallel rank 1's width changes from step to
    step (and between two full validation batches, 38 rows): every rank of a stage must still run the same
    collectives. Before: torch re-inferred shapes with a real forward + backward on the changed rank alone
    (gloo size mismatch with 1F1B, a hang with GPipe), and in validation the re-initialized rank resharded its
    FSDP units and all-gathered the last block where its peer did not."""
    reference = reference_runs(*VARIABLE_WIDTH)
    assert_matches(shared_launches(CHANGING_WIDTH, name, *VARIABLE_WIDTH), reference)
