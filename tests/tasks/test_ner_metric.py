"""Entity F1 against hand-computed cases."""

from __future__ import annotations

import pytest
import torch

from lightning_mp.tasks.ner.metric import EntityF1, extract_entities


def test_bio_spans():
    tags = ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-LOC", "O"]
    assert extract_entities(tags) == {("PER", 0, 1), ("LOC", 3, 3), ("LOC", 4, 5)}


def test_dangling_inside_tag_starts_an_entity():
    # conlleval: I-X after O, or after another type, opens a new entity.
    assert extract_entities(["O", "I-PER", "I-LOC", "I-LOC"]) == {("PER", 1, 1), ("LOC", 2, 3)}


def test_iob1_adjacent_entities_and_entity_at_end():
    # IOB1: entities start with I-; B- only separates two adjacent entities of one type.
    tags = ["I-PER", "I-PER", "B-PER", "O", "I-ORG"]
    assert extract_entities(tags, "IOB1") == {("PER", 0, 1), ("PER", 2, 2), ("ORG", 4, 4)}


def test_iobes_tags():
    assert extract_entities(["S-PER", "B-LOC", "E-LOC", "O"]) == {("PER", 0, 0), ("LOC", 1, 2)}


def test_unknown_scheme_and_tag_fail():
    with pytest.raises(ValueError, match="scheme must be"):
        extract_entities(["O"], "BILOU")
    with pytest.raises(ValueError, match="Tag 'X-PER' at position 0"):
        extract_entities(["X-PER"])


def test_strict_match_counts():
    metric = EntityF1(["LOC", "PER"])
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-LOC", "I-LOC", "I-LOC"]]
    pred = [["B-PER", "O", "O", "B-LOC"],        # partial PER span: wrong; LOC right
            ["B-LOC", "I-LOC", "I-LOC"]]         # right
    metric.update(pred, gold)
    scores = metric.compute()
    # predicted: PER(0,0) LOC(3,3) LOC(0,2) -> 3; gold: PER(0,1) LOC(3,3) LOC(0,2) -> 3; correct 2
    assert scores["precision"].item() == pytest.approx(2 / 3)
    assert scores["recall"].item() == pytest.approx(2 / 3)
    assert scores["PER_f1"].item() == 0.0
    assert scores["LOC_f1"].item() == pytest.approx(1.0)


def test_wrong_type_is_wrong_and_nested_spans_do_not_count():
    metric = EntityF1(["LOC", "ORG"])
    metric.update([["B-ORG", "I-ORG", "I-ORG"]], [["B-LOC", "I-LOC", "I-LOC"]])
    metric.update([["B-ORG", "I-ORG", "B-ORG"]], [["B-ORG", "I-ORG", "I-ORG"]])  # split inside a gold span
    scores = metric.compute()
    assert scores["f1"].item() == 0.0
    assert metric.predicted.tolist() == [0, 3] and metric.gold.tolist() == [1, 1]


def test_report_lists_every_type_with_support():
    metric = EntityF1(["LOC", "PER"])
    metric.update([["B-PER", "O"]], [["B-PER", "B-LOC"]])
    report = metric.format_report().splitlines()
    assert report[1].split() == ["LOC", "0.000", "0.000", "0.000", "1"]
    assert report[2].split() == ["PER", "1.000", "1.000", "1.000", "1"]
    assert report[3].split()[:2] == ["micro", "avg"] and report[3].split()[-1] == "2"


def test_states_sum_like_a_two_rank_sync():
    batches = [([["B-PER", "O"]], [["B-PER", "O"]]), ([["O", "B-LOC"]], [["B-LOC", "O"]])]
    whole = EntityF1(["LOC", "PER"])
    ranks = [EntityF1(["LOC", "PER"]), EntityF1(["LOC", "PER"])]
    for (pred, gold), rank in zip(batches, ranks):
        whole.update(pred, gold)
        rank.update(pred, gold)
    merged = EntityF1(["LOC", "PER"])
    for name in ("true_positive", "predicted", "gold"):
        setattr(merged, name, sum(getattr(rank, name) for rank in ranks))
    assert {k: v.item() for k, v in merged.compute().items()} == {k: v.item() for k, v in whole.compute().items()}
    assert torch.equal(whole.gold, torch.tensor([1, 1]))
