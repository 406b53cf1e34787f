"""Multi-process runs equal a single process on the global batch: losses per step and weights after
3 AdamW steps. Ranks are CPU processes over gloo; the same code runs on CUDA/NCCL."""

from __future__ import annotations

import pytest

from helpers.compare import max_weight_difference
from helpers.launch import run_worker

FP32_TOLERANCE = 1e-5

LAYOUTS = {
    "dp4": (4, {"data_parallel_size": 4}),
    "tp4": (4, {"data_parallel_size": 1, "tensor_parallel_size": 4}),
    "dp2xtp2": (4, {"data_parallel_size": 2, "tensor_parallel_size": 2}),
    "hybrid2x2": (4, {"data_parallel_size": 4, "data_parallel_mode": "hybrid", "data_parallel_replicate_size": 2}),
    "replicated2": (2, {"data_parallel_size": 2, "data_parallel_mode": "replicated"}),
    # Replicated over data, tensor-parallel inside: the buckets average the local shards of DTensor gradients.
    "replicated2xtp2": (4, {"data_parallel_size": 2, "tensor_parallel_size": 2, "data_parallel_mode": "replicated"}),
    "dp2_activation_checkpointing": (2, {"data_parallel_size": 2, "activation_checkpointing": True}),
    # Selective: the tensor-parallel collectives' outputs are kept, so backward repeats no communication.
    "dp2xtp2_selective_activation_checkpointing": (4, {"data_parallel_size": 2, "tensor_parallel_size": 2,
                                                       "activation_checkpointing": "selective"}),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(name, reference_runs, shared_launches):
    reference = reference_runs()
    result = shared_launches(LAYOUTS, name)  # the layouts of one world size train in one launch
    assert result["losses"] == pytest.approx(reference["losses"], abs=FP32_TOLERANCE)
    assert max_weight_difference(result["state_dict"], reference["state_dict"]) < FP32_TOLERANCE
    # Summed logs count each row once: over data-parallel ranks, not once per tensor-parallel peer.
    assert result["labelled_tokens"] == reference["labelled_tokens"]
    expected = ["model.bert.encoder.layer.0", "model.bert.encoder.layer.1"] if "activation" in name else []
    assert result["checkpointed"] == expected


def test_bf16_mixed_tensor_parallel_is_close(tmp_path, reference_runs):
    reference = reference_runs("--precision", "bf16-mixed")
    result = run_worker(tmp_path, devices=2, layout={"tensor_parallel_size": 2}, extra=("--precision", "bf16-mixed"))
    assert result["losses"] == pytest.approx(reference["losses"], abs=2e-2)
    assert max_weight_difference(result["state_dict"], reference["state_dict"]) < 5e-3


CLIPPED_AND_ACCUMULATED = {
    "dp2xtp2": (4, {"data_parallel_size": 2, "tensor_parallel_size": 2}),
    # Every backward of the window reduces the accumulated .grad: the average of the (already equal) earlier
    # part must leave it unchanged.
    "replicated2": (2, {"data_parallel_size": 2, "data_parallel_mode": "replicated"}),
}


@pytest.mark.parametrize("name", list(CLIPPED_AND_ACCUMULATED))
def test_clipping_and_accumulation_match(name, tmp_path, reference_runs):
    # A clip value far below the gradient norm, so every step is clipped by the *global* norm.
    extra = ("--clip", "0.05", "--accumulate", "2", "--steps", "2")
    reference = reference_runs(*extra)
    devices, layout = CLIPPED_AND_ACCUMULATED[name]
    result = run_worker(tmp_path, devices=devices, layout=layout, extra=extra)
    assert result["losses"] == pytest.approx(reference["losses"], abs=FP32_TOLERANCE)
    assert max_weight_difference(result["state_dict"], reference["state_dict"]) < FP32_TOLERANCE
    unclipped = reference_runs("--accumulate", "2", "--steps", "2")
    assert max_weight_difference(unclipped["state_dict"], reference["state_dict"]) > 1e-4  # clipping did bite


def test_unweighted_loss_is_a_mean_of_means(tmp_path, reference_runs):
    """Guards the test data itself: shards hold different label counts, so skipping the token weighting
    must give a visibly different loss."""
    reference = reference_runs()
    result = run_worker(tmp_path, devices=2, layout={"data_parallel_size": 2, "token_weighted_loss": False})
    assert abs(result["losses"][0] - reference["losses"][0]) > 1e-4


def test_logged_epoch_means_match_under_data_parallelism(tmp_path, reference_runs):
    """val_loss is averaged over the epoch from per-rank values: they must be the token-weighted global
    ones, or ranks holding fewer labelled tokens count as much as the others (22 validation rows)."""
    extra = ("--layers", "4", "--validate")
    reference = reference_runs(*extra)
    result = run_worker(tmp_path, devices=2, layout={"data_parallel_size": 2}, extra=extra)
    assert result["validation"]["val_loss"] == pytest.approx(reference["validation"]["val_loss"], abs=FP32_TOLERANCE)
    assert result["validation"]["val_accuracy"] == pytest.approx(reference["validation"]["val_accuracy"], abs=1e-6)


def test_fp16_grad_scaler_with_fsdp_and_clipping_is_close(tmp_path, reference_runs):
    """16-mixed (what a GPU run gets: fp16 autocast and a GradScaler, forced on CPU) with FSDP2 gradients and
    the global-norm clipping: the scaler unscales the sharded gradients before they are clipped."""
    extra = ("--precision", "16-mixed", "--clip", "0.05", "--grad-norms")
    reference = reference_runs(*extra)
    result = run_worker(tmp_path, devices=2, layout={"data_parallel_size": 2}, extra=extra)
    assert result["grad_scale"] == reference["grad_scale"] == 65536.0  # no step skipped for inf/NaN
    # Unscaled (a missed unscale would be 65536 times larger) and equal to one process's: the norm clipping uses.
    assert result["grad_norms"] == pytest.approx(reference["grad_norms"], rel=1e-3)
    assert all(norm > 0.05 for norm in reference["grad_norms"])  # so every step is clipped
    assert result["losses"] == pytest.approx(reference["losses"], abs=1e-4)  # measured: 6e-6
    # fp16 compute; AdamW hides most of a gradient's scale, so weights say less than the norms above.
    assert max_weight_difference(result["state_dict"], reference["state_dict"]) < 1e-3  # measured: 4.5e-4
