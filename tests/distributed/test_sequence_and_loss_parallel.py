"""Sequence parallelism and loss parallelism give the single-process losses and weights (3 SGD steps,
fp32, right-padded rows of different lengths) while each rank holds only its share of the sequence
between tensor-parallel regions (block outputs ``Shard(1)``; under a pipeline, what the stages send) and
of the logits (``Shard(2)``); what cannot work is refused before launch."""

from __future__ import annotations

import pytest

from helpers import tiny_hf
from helpers.compare import max_weight_difference
from helpers.launch import run_worker

FP32_TOLERANCE = 1e-5


LLAMA = ("--family", "llama", "--layers", "2", "--optimizer", "sgd", "--lr", "0.1")


def assert_matches(result: dict, reference: dict, label: str) -> None:
    losses = max(abs(a - b) for a, b in zip(result["losses"], reference["losses"]))
    weights = max_weight_difference(result["state_dict"], reference["state_dict"])
    print(f"{label} parity: losses {losses:.1e}, weights {weights:.1e}")
    assert result["losses"] == pytest.approx(reference["losses"], abs=FP32_TOLERANCE)
    assert weights < FP32_TOLERANCE


# The tiny Llama's layouts below, probed alike after training: those of one world size share a launch.
LLAMA_PROBED = (*LLAMA, "--probe-logits", "--probe-hidden")


LLAMA_LAYOUTS = {
    "loss_parallel_tp2": (2, {"tensor_parallel_size": 2, "loss_parallel": True}),
    "loss_parallel_dp2xtp2": (4, {"tensor_parallel_size": 2, "data_parallel_size": 2, "loss_parallel": True}),
    "sequence_parallel_dp2xtp2_loss_parallel": (4, {"tensor_parallel_size": 2, "data_parallel_size": 2,
                                                    "sequence_parallel": True, "loss_parallel": True}),
}


@pytest.mark.parametrize("layout", ["tp2", "dp2xtp2"])
def test_loss_parallel_matches_single_process_with_sharded_logits(layout, reference_runs, shared_launches):
    result = shared_launches(LLAMA_LAYOUTS, f"loss_parallel_{layout}", *LLAMA_PROBED)
    assert_matches(result, reference_runs(*LLAMA), "loss parallel")
    kind, placements, local_shape, global_shape = result["logits"]
    assert kind == "DTensor" and placements == ["S(2)"]  # sharded on the vocabulary dimension
    assert local_shape[-1] == tiny_hf.VOCAB // 2 and global_shape[-1] == tiny_hf.VOCAB


# Sequence parallelism: norms, dropouts and the residual stream on sequence shards between the tensor-parallel
# regions. With loss parallelism on too at dp2×tp2: the sequence-sharded final norm feeds the vocabulary-sharded head.
# tp2 alone runs for every family with a plan in tests/distributed/test_hf_parity.py.
# dp2xtp2_loss_parallel: LLAMA_LAYOUTS' sequence_parallel_dp2xtp2_loss_parallel. BERT: post-norm, residual inside
# the attention/FFN output modules; AdamW, as the other BERT parity tests.
BERT_SEQUENCE_PARALLEL = {"tensor_parallel_size": 2, "data_parallel_size": 2, "sequence_parallel": True}


@pytest.mark.parametrize("name", ["dp2xtp2_loss_parallel", "bert_dp2xtp2"])
def test_sequence_parallel_matches_single_process(name, tmp_path, reference_runs, shared_launches):
    if name.startswith("bert"):  # the tiny BERT token classifier is the worker's default
        model = ()
        result = run_worker(tmp_path, devices=4, layout=BERT_SEQUENCE_PARALLEL, extra=("--probe-hidden",))
    else:
        model = LLAMA
        result = shared_launches(LLAMA_LAYOUTS, f"sequence_parallel_{name}", *LLAMA_PROBED)
    assert_matches(result, reference_runs(*model), f"sequence parallel ({name})")
    # What a block hands to the next: this rank's half of the sequence.
    kind, placements, local_shape, global_shape = result["hidden"]
    assert kind == "DTensor" and placements == ["S(1)"]
    assert global_shape[1] > 1 and local_shape[1] in (global_shape[1] // 2, (global_shape[1] + 1) // 2)


# Under a pipeline (pp2×tp2) the stages send their sequence shards: what the first stage sends is tensor rank 0's
# part of the batch's width, ceil(width / 2). Batches of 4 rows padded to their own longest: 11, 12 then 7 positions,
# so the shards are uneven (6 + 5, 4 + 3) and their shapes change every step. BERT: post-norm encoder. Llama with
# tied embeddings: the replicated embedding's output is cut into shards on the first stage, the tied head on the last
# gathers them, and the gradients of the two copies are summed.
SMALL_BATCHES = ("--batch-size", "4")


PIPELINED = {
    "bert_pp2xtp2": ("--family", "bert", "--optimizer", "sgd", "--lr", "0.1", *SMALL_BATCHES),
    "llama_tied_pp2xtp2": (*LLAMA, *SMALL_BATCHES, "--config", '{"tie_word_embeddings": true}'),
}


PP2_TP2 = {"pipeline_parallel_size": 2, "tensor_parallel_size": 2, "data_parallel_size": 1, "microbatches": 2}


@pytest.mark.parametrize("name", list(PIPELINED))
def test_sequence_parallel_under_a_pipeline_sends_sequence_shards(name, tmp_path, reference_runs):
    extra = PIPELINED[name]
    result = run_worker(tmp_path, devices=4, layout={**PP2_TP2, "sequence_parallel": True},
                        extra=(*extra, "--probe-sent"))
    reference = reference_runs(*extra)
    assert_matches(result, reference, f"sequence parallel ({name})")
    (rows, width), sent = result["sent"]
    print(f"first stage: input {(rows, width)}, sent {sent}")
    assert width == 7 and sent == (rows, 4, tiny_hf.HIDDEN)  # the last batch: 7 positions, 4 on tensor rank 0
    if "tied" in name:
        state = result["state_dict"]
        assert state["model.lm_head.weight"].equal(state["model.model.embed_tokens.weight"])


def test_loss_and_sequence_parallel_under_a_pipeline_with_data_parallelism(tmp_path, reference_runs):
    """pp2×dp2×tp2 with sequence and loss parallelism (8 ranks, about 3 minutes): the last stage's head keeps the
    logits vocabulary-sharded and the loss and its backward run inside the schedule; the stages send sequence
    shards whose shapes are derived for every new width without torch's re-inference (data-parallel peers'
    batches differ in width); in validation the sharded logits reach the first stage's ranks shard by shard, where
    the model's ``.loss`` is the same number (22 rows: the last local batches are padded to the microbatches)."""
    extra = (*LLAMA, "--batch-size", "8", "--validate")
    layout = {**PP2_TP2, "data_parallel_size": 2, "sequence_parallel": True, "loss_parallel": True}
    result, reference = run_worker(tmp_path, devices=8, layout=layout, extra=(*extra, "--probe-sent"), timeout=600), \
        reference_runs(*extra)
    assert_matches(result, reference, "loss and sequence parallel under a pipeline")
    val_loss, expected = result["validation"]["val_loss"], reference["validation"]["val_loss"]
    print(f"val_loss {val_loss:.7f}, one process {expected:.7f}; first stage {result['sent']}")
    assert val_loss == pytest.approx(expected, abs=FP32_TOLERANCE)
    (rows, width), sent = result["sent"]
    assert sent == (rows, (width + 1) // 2, tiny_hf.HIDDEN)
