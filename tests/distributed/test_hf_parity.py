"""Hugging Face families under tensor, pipeline and data parallelism equal one process on the global
batch: per-step losses and weights after 3 SGD steps within 1e-5 (fp32), on right-padded rows of
different lengths (padding labelled -100).

SGD, not AdamW: weight differences then measure gradient differences directly. AdamW's first steps move
every weight by about ±lr whatever its gradient, so a gradient of 1e-9 that is 0 in one layout and float
noise in another moves one weight by 1e-4 (seen on Llama tp2: 3e-4 in one element of o_proj at lr
1e-3) — a property of the optimizer, not of the parallel layout. lr 0.1 moves weights by up to 0.05 in
3 steps; at lr 1 (moves of 0.5) the float noise of a different reduction order (2e-7 relative per
gradient) grows to 1.6e-5 on OLMo-2 tp2 through the training dynamics. The data-parallel causal-LM
test keeps lr 1 (2 layers: 4e-8 against 3.8e-3 when the labels are counted unshifted).

Decoders train as causal LMs with plans derived from transformers' own tp/pp plans (plans/hf.py).
Encoders (RoBERTa, DistilBERT) train as token classifiers with the shipped plans.

Every family runs tp2, pp2 (1f1b), dp2×tp2 and pp2×tp2, and tp2 and pp2×tp2 with sequence parallelism (ELECTRA
too under those two). One multi-process launch per layout trains every
family in turn in the same processes (``workers/hf_matrix.py``, one Trainer per family), against one
single-process launch for all of them: starting 2-4 ranks costs as much as training a tiny model, and the
suite runs on 2 cores. Adding a family is one line in ``tests/helpers/tiny_hf.py`` and one in
``MATRIX_FAMILIES`` below.
"""

from __future__ import annotations

import pytest

from helpers.compare import max_weight_difference
from helpers.launch import run_job, run_worker

FP32_TOLERANCE = 1e-5


FOUR_LAYERS = ("--layers", "4", "--optimizer", "sgd", "--lr", "0.1")


MATRIX_FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma3", "phi3", "olmo2", "gpt2", "roberta", "distilbert")


# Each layout exercises every family's own pieces: tensor-parallel styles (Qwen3's and Gemma 3's
# head-sharded norms, Phi-3's and OLMo-2's gathered projections, GPT-2's transposed Conv1D), stage functions
# (Gemma 3: sliding-window and full layers with their own rotary embeddings, soft-capped logits), and with
# dp2 the token weighting over ranks whose batches have different widths and label counts.
LAYOUTS = {
    "tp2": (2, {"tensor_parallel_size": 2}),
    "pp2_1f1b": (2, {"pipeline_parallel_size": 2, "pipeline_schedule": "1f1b", "microbatches": 4}),
    "dp2xtp2": (4, {"data_parallel_size": 2, "tensor_parallel_size": 2}),
    "pp2xtp2": (4, {"pipeline_parallel_size": 2, "tensor_parallel_size": 2, "data_parallel_size": 1,
                    "microbatches": 4}),
    # Sequence parallelism (tests/distributed/test_sequence_and_loss_parallel.py checks that the block outputs,
    # and under a pipeline what the stages send, are sequence shards); with a pipeline the stages send their shards.
    "tp2_sequence_parallel": (2, {"tensor_parallel_size": 2, "sequence_parallel": True}),
    "pp2xtp2_sequence_parallel": (4, {"pipeline_parallel_size": 2, "tensor_parallel_size": 2, "data_parallel_size": 1,
                                      "microbatches": 4, "sequence_parallel": True}),
}


# ELECTRA too under sequence parallelism: its embeddings are narrower than its layers, and the projection between
# them is what hands the sequence shards to the first block.
SEQUENCE_PARALLEL_FAMILIES = (*MATRIX_FAMILIES, "electra")


FAMILIES_OF = {layout: SEQUENCE_PARALLEL_FAMILIES for layout in LAYOUTS if layout.endswith("sequence_parallel")}


REFERENCE = ("--families", ",".join(SEQUENCE_PARALLEL_FAMILIES), *FOUR_LAYERS)  # one single-process run for all


def parity(result: dict, reference: dict) -> tuple[float, float]:
    """(largest loss difference over the steps, largest weight difference after them)."""
    assert len(result["losses"]) == len(reference["losses"]) == 3
    losses = max(abs(a - b) for a, b in zip(result["losses"], reference["losses"]))
    return losses, max_weight_difference(result["state_dict"], reference["state_dict"])


def assert_matches(result: dict, reference: dict) -> None:
    losses, weights = parity(result, reference)
    print(f"parity: losses {losses:.1e}, weights {weights:.1e}")  # shown with -s / -rP: the measured numbers
    assert result["losses"] == pytest.approx(reference["losses"], abs=FP32_TOLERANCE)
    assert weights < FP32_TOLERANCE


def assert_ranks_saw_different_widths(result: dict) -> None:
    """Batches padded to their own longest row: in some step the data-parallel peers ran different widths."""
    widths = [steps["widths"] for steps in result["steps_per_rank"]]
    assert any(len(set(step)) > 1 for step in zip(*widths)), f"every step had one width on all ranks: {widths}"


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_family_matches_single_process(layout, tmp_path, reference_runs):
    devices, kwargs = LAYOUTS[layout]
    families = FAMILIES_OF.get(layout, MATRIX_FAMILIES)
    extra = ("--families", ",".join(families), *FOUR_LAYERS)
    results = run_worker(tmp_path, devices=devices, layout=kwargs, extra=extra, script="hf_matrix.py", timeout=900)
    reference = reference_runs(*REFERENCE, script="hf_matrix.py")
    assert set(results) == set(families) and set(reference) == set(SEQUENCE_PARALLEL_FAMILIES)
    measured = {family: parity(results[family], reference[family]) for family in families}
    print(f"\nparity under {layout} (max |difference|: losses over 3 steps, weights after them):")
    for family, (losses, weights) in measured.items():
        print(f"  {family:<11} losses {losses:.1e}  weights {weights:.1e}")
    failed = {family: numbers for family, numbers in measured.items() if max(numbers) >= FP32_TOLERANCE}
    assert not failed, f"{layout}: families off by more than {FP32_TOLERANCE:g} (losses, weights): {failed}"


def test_llama_pipeline_data_and_tensor_parallel_on_8_ranks(tmp_path, reference_runs):
    extra = ("--family", "llama", *FOUR_LAYERS)
    layout = {"pipeline_parallel_size": 2, "data_parallel_size": 2, "tensor_parallel_size": 2, "microbatches": 4}
    result = run_worker(tmp_path, devices=8, layout=layout, extra=extra)
    assert_matches(result, reference_runs(*extra))
    assert_ranks_saw_different_widths(result)


def test_causal_lm_data_parallel_counts_shifted_labels(tmp_path, reference_runs):
    """A causal LM never predicts the first label of a row; counting it weights data-parallel ranks wrongly
    (3.8e-3 off after 3 SGD steps at lr 1 when counted unshifted, 4e-8 shifted)."""
    extra = ("--family", "llama", "--optimizer", "sgd", "--lr", "1.0")
    reference = reference_runs(*extra)
    assert_matches(run_worker(tmp_path, devices=2, layout={"data_parallel_size": 2}, extra=extra), reference)


TIED = ("--family", "llama", *FOUR_LAYERS, "--config", '{"tie_word_embeddings": true}')


def test_tied_embeddings_across_pipeline_stages(tmp_path, reference_runs):
    """The first stage holds the embedding, the last stage a copy as lm_head; their gradients are summed
    before each step, so both equal the single-process tied weight."""
    result = run_worker(tmp_path, devices=2, layout={"pipeline_parallel_size": 2, "microbatches": 4}, extra=TIED)
    assert_matches(result, reference_runs(*TIED))
    state = result["state_dict"]
    assert state["model.lm_head.weight"].equal(state["model.model.embed_tokens.weight"])


def test_tied_embeddings_across_pipeline_and_data_parallel_with_clipping(tmp_path, reference_runs):
    """pp2×dp2, clipped by the global norm (the tied weight counted once, as in one process)."""
    extra = (*TIED, "--clip", "0.05")
    layout = {"pipeline_parallel_size": 2, "data_parallel_size": 2, "microbatches": 2}
    result = run_worker(tmp_path, devices=4, layout=layout, extra=extra)
    assert_matches(result, reference_runs(*extra))
    assert_ranks_saw_different_widths(result)
    unclipped = reference_runs(*TIED)
    assert max_weight_difference(unclipped["state_dict"], reference_runs(*extra)["state_dict"]) > 1e-3


def test_causal_lm_validation_under_pipeline_and_data_parallelism(tmp_path, reference_runs):
    """Forward-only pipeline schedule, the model answering with the pipeline's logits, and the logged
    val_loss token-weighted over data-parallel ranks with shifted counts (22 rows: the last local batch
    is padded to the microbatches)."""
    extra = ("--family", "llama", *FOUR_LAYERS, "--validate")
    layout = {"pipeline_parallel_size": 2, "data_parallel_size": 2, "microbatches": 2}
    result, reference = run_worker(tmp_path, devices=4, layout=layout, extra=extra), reference_runs(*extra)
    assert_matches(result, reference)
    assert_ranks_saw_different_widths(result)
    assert result["validation"]["val_loss"] == pytest.approx(reference["validation"]["val_loss"], abs=FP32_TOLERANCE)


def test_validate_then_fit_under_pipeline_and_data_parallelism_trains_the_sharded_parameters(tmp_path):
    """A forward-only pipeline step must leave every FSDP unit resharded: otherwise configure_optimizers after
    trainer.validate holds gathered copies (never trained, and saving the optimizer fails with a KeyError)."""
    import json
    import sys

    from helpers.launch import WORKERS

    out = tmp_path / "result.json"
    proc = run_job([sys.executable, str(WORKERS / "validate_then_fit.py"), str(out)], timeout=600, cwd=tmp_path,
                   check=False)
    assert proc.returncode == 0 and out.exists(), proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["foreign_optimizer_parameters"] == [0, 0, 0, 0]
    assert result["saved_entries"] > 0 and result["optimizer_entries"] > 0
