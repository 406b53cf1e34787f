"""A module written for Lightning's ModelParallelStrategy runs unchanged under ours, same numbers."""

from __future__ import annotations

import pytest

from helpers.compare import max_weight_difference
from helpers.launch import run_worker

LAYOUT = {"data_parallel_size": 2, "tensor_parallel_size": 2}


def test_dropin_module_matches_lightning_and_single_process(tmp_path, reference_runs):
    # Every token labelled: Lightning's strategy averages per-rank means, which is exact only then.
    extra = ("--module", "dropin", "--all-labelled")
    ours = run_worker(tmp_path, devices=4, layout=LAYOUT, extra=extra)
    lightning = run_worker(tmp_path, devices=4, layout=LAYOUT, strategy="lightning", extra=extra)
    reference = reference_runs("--all-labelled")
    assert ours["losses"] == pytest.approx(lightning["losses"], abs=1e-6)
    assert max_weight_difference(ours["state_dict"], lightning["state_dict"]) < 1e-6
    assert max_weight_difference(ours["state_dict"], reference["state_dict"]) < 1e-5


def test_dropin_module_with_uneven_labels_is_exact_only_under_ours(tmp_path, reference_runs):
    ours = run_worker(tmp_path, devices=4, layout=LAYOUT, extra=("--module", "dropin"))
    reference = reference_runs()
    assert ours["losses"] == pytest.approx(reference["losses"], abs=1e-5)
    assert max_weight_difference(ours["state_dict"], reference["state_dict"]) < 1e-5
