"""The Lightning side of pipeline parallelism, without processes: the per-rank shell and its stage views,
microbatch weights, padding of a last batch, and how logged values are combined."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import BertForTokenClassification

from helpers.tiny_bert import VOCAB, tiny_config
from lightning_mp.pipeline.split import build_rank_modules
from lightning_mp.pipeline.steps import PipelineLoop, _combine_logs
from lightning_mp.plans import find_plan


def loop(microbatches: int, token_weighted: bool = True, shifted_labels: bool = False) -> PipelineLoop:
    # Only the batch arithmetic is exercised: it needs the microbatch count, not a process group.
    instance = PipelineLoop.__new__(PipelineLoop)
    instance.runtime = SimpleNamespace(microbatches=microbatches)
    instance.labels_key, instance.ignore_index, instance.token_weighted = "labels", -100, token_weighted
    instance.shifted_labels = shifted_labels
    instance.host_counts = None
    return instance


def test_shell_holds_every_part_of_the_rank_and_stages_share_its_parameters():
    model = BertForTokenClassification(tiny_config(layers=4))
    _, hf, plan = find_plan(model)
    # Interleaved placement on rank 0 of 2: stages 0 (block 0) and 2 (block 2) of 4.
    shell, stages = build_rank_modules(hf, plan, {0: [0], 2: [2]}, num_stages=4)
    shell_names = {n for n, _ in shell.named_parameters()}
    assert any(n.startswith("bert.embeddings.") for n in shell_names)
    assert {n.split(".")[3] for n in shell_names if n.startswith("bert.encoder.layer.")} == {"0", "2"}
    assert not any(n.startswith("classifier.") for n in shell_names)  # the last stage (3) is on rank 1
    shell_params = {id(p) for p in shell.parameters()}
    stage_params = [{id(p) for p in stage.parameters()} for stage in stages]
    assert stage_params[0] | stage_params[1] == shell_params and not stage_params[0] & stage_params[1]
    # A step on the shell's parameters is a step of the stages, and train()/eval() reaches shared modules.
    with torch.no_grad():
        shell.bert.encoder.layer["2"].output.dense.weight.add_(1.0)
    assert torch.equal(stages[1].bert.encoder.layer["2"].output.dense.weight,
                       shell.bert.encoder.layer["2"].output.dense.weight)
    shell.eval()
    assert not stages[0].bert.embeddings.training
    # Stage forward runs what the rank owns; the unsplit model is untouched.
    ids = torch.randint(1, VOCAB, (2, 6))
    hidden = stages[0](ids)
    reference = build_rank_modules(hf.eval(), plan, {0: [0]}, 4)[1][0](ids)
    torch.testing.assert_close(hidden, reference)
    assert isinstance(hf.get_submodule(plan.blocks), torch.nn.ModuleList) and len(hf.bert.encoder.layer) == 4


def test_microbatch_weights_are_token_shares():
    labels = torch.full((4, 3), -100)
    labels[0, :] = 1  # 3 labelled tokens in microbatch 0, 1 in microbatch 1
    labels[3, 0] = 2
    assert loop(2)._microbatch_weights({"labels": labels}, 4) == [0.75, 0.25]
    assert loop(2, token_weighted=False)._microbatch_weights({"labels": labels}, 4) == [0.5, 0.5]
    assert loop(4)._microbatch_weights({"input_ids": labels}, 4) == [0.25] * 4


def test_microbatch_weights_counted_on_the_host_before_transfer_equal_the_device_count():
    # 5 rows in 4 microbatches: padded to 8, two rows each; the padding rows (no labels) weigh nothing.
    labels = torch.full((5, 3), -100)
    labels[0, :2] = 1
    labels[2, 0] = 1
    labels[4, :] = 1
    padded, size = loop(4)._pad({"input_ids": labels.clone(), "labels": labels}, 5, training=True)
    device_count = loop(4)._microbatch_weights(padded, size)
    assert device_count == [2 / 6, 1 / 6, 3 / 6, 0.0]
    counted = loop(4)
    counted.count_on_host({"input_ids": labels, "labels": labels})
    assert counted.host_counts == (5, [2, 1, 3, 0])
    labels_elsewhere = labels.clone()
    labels_elsewhere[:] = -100  # the step reads the host count, not the (here changed) labels it is handed
    assert counted._microbatch_weights({"labels": labels_elsewhere}, 5) == device_count
    assert counted.host_counts is None  # used once
    # A count of a batch of another size is not used for this one.
    counted.count_on_host({"labels": labels[:4]})
    assert counted._microbatch_weights({"labels": labels}, 5) == device_count


def test_microbatch_weights_of_a_causal_lm_count_shifted_labels():
    # A causal LM never predicts the first label of a row: rows with 3 and 1 labels give 2 and 0 targets.
    labels = torch.tensor([[5, 6, 7, -100], [5, -100, -100, -100]])
    assert loop(2)._microbatch_weights({"labels": labels}, 2) == [0.75, 0.25]
    assert loop(2, shifted_labels=True)._microbatch_weights({"labels": labels}, 2) == [1.0, 0.0]


def test_last_batch_is_padded_with_ignored_labels_or_rejected_without_them():
    batch = {"input_ids": torch.arange(15).view(5, 3), "labels": torch.ones(5, 3, dtype=torch.long), "note": "x"}
    padded, size = loop(4)._pad(batch, 5, training=True)
    assert size == 8 and padded["input_ids"].shape == (8, 3) and padded["note"] == "x"
    assert torch.equal(padded["input_ids"][5:], batch["input_ids"][:1].expand(3, 3))
    assert (padded["labels"][5:] == -100).all() and (padded["labels"][:5] == 1).all()
    evaluation, _ = loop(4)._pad(batch, 5, training=False)
    assert (evaluation["labels"][5:] == 1).all()  # outputs of padded rows are cut off instead
    with pytest.raises(ValueError, match=r"the batch size 5 is not divisible by microbatches=4, and without"
                                         r" token-weighted labels \('labels'\).*multiple of 4"):
        loop(4)._pad({"input_ids": batch["input_ids"]}, 5, training=True)


def test_logged_values_combine_with_the_microbatch_weights():
    records = [
        (torch.tensor(0.0), {"train_loss": (torch.tensor(2.0), {"prog_bar": True, "batch_size": 2}),
                             "lr": (torch.tensor(0.1), {})}, 0.75),
        (torch.tensor(0.0), {"train_loss": (torch.tensor(4.0), {"prog_bar": True, "batch_size": 2}),
                             "lr": (torch.tensor(0.1), {})}, 0.25),
    ]
    combined = _combine_logs(records, batch_size=4)
    assert float(combined["train_loss"][0]) == pytest.approx(2.5)
    assert combined["train_loss"][1] == {"prog_bar": True, "batch_size": 4}
    assert float(combined["lr"][0]) == pytest.approx(0.1) and combined["lr"][1] == {}


def test_microbatch_logs_combine_as_their_reduction_asks():
    """A pipeline logs once per step what its microbatches logged: a loss as the token-weighted mean, a count
    (``reduce_fx="sum"``) as the sum, "max" / "min" as the extreme, whatever the weights."""
    logged = [({"loss": (torch.tensor(2.0), {}), "rows": (torch.tensor(3.0), {"reduce_fx": "sum"}),
                "widest": (torch.tensor(7.0), {"reduce_fx": torch.max}), "shortest": (torch.tensor(4.0),
                                                                                     {"reduce_fx": "min"})}, 1.0),
              ({"loss": (torch.tensor(5.0), {}), "rows": (torch.tensor(2.0), {"reduce_fx": torch.sum}),
                "widest": (torch.tensor(9.0), {"reduce_fx": torch.max}), "shortest": (torch.tensor(6.0),
                                                                                     {"reduce_fx": "min"})}, 3.0)]
    combined = _combine_logs([(torch.tensor(0.0), logs, weight) for logs, weight in logged], batch_size=8)
    assert {name: float(value) for name, (value, _) in combined.items()} == {
        "loss": (2.0 * 1 + 5.0 * 3) / 4, "rows": 5.0, "widest": 9.0, "shortest": 4.0}
