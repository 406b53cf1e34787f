"""Entity decoding and entity F1 against hand-computed cases."""

from __future__ import annotations

import pytest
import torch

from lightning_mp.tasks.ner.metric import EntityF1, entity_types, extract_entities


def scores_of(metric: EntityF1) -> dict[str, float]:
    return {name: value.item() for name, value in metric.compute().items()}


def test_bio_spans_including_adjacent_same_type():
    tags = ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-LOC", "O"]
    assert extract_entities(tags) == {("PER", 0, 1), ("LOC", 3, 3), ("LOC", 4, 5)}
    assert extract_entities(["B-PER", "I-PER"]) == {("PER", 0, 1)}  # an entity that runs to the end
    assert extract_entities([]) == set() and extract_entities(["O", "O"]) == set()


def test_dangling_inside_tag_starts_an_entity():
    # conlleval / seqeval default: an I-X that does not continue an X entity opens a new X entity.
    assert extract_entities(["O", "I-PER", "I-LOC", "I-LOC"]) == {("PER", 1, 1), ("LOC", 2, 3)}
    assert extract_entities(["I-PER", "I-PER", "O"]) == {("PER", 0, 1)}  # at the start of a sentence
    assert extract_entities(["B-PER", "I-LOC", "I-PER"]) == {("PER", 0, 0), ("LOC", 1, 1), ("PER", 2, 2)}


def test_iob1_and_bio_spellings_of_the_same_entities():
    # IOB1 starts entities with I-; B-PER only separates two adjacent PER entities.
    iob1 = ["I-PER", "I-PER", "B-PER", "O", "I-ORG", "I-ORG", "I-LOC"]
    bio = ["B-PER", "I-PER", "B-PER", "O", "B-ORG", "I-ORG", "B-LOC"]
    expected = {("PER", 0, 1), ("PER", 2, 2), ("ORG", 4, 5), ("LOC", 6, 6)}
    assert extract_entities(iob1, "IOB1") == expected
    assert extract_entities(bio, "BIO") == expected
    # The decoders coincide (conlleval reads both), so mixing spellings cannot change scores.
    assert extract_entities(iob1, "BIO") == extract_entities(bio, "IOB1") == expected
    metric = EntityF1(["LOC", "ORG", "PER"], scheme="IOB1")
    metric.update([bio], [iob1])
    assert scores_of(metric)["f1"] == 1.0


def test_iobes_tags():
    assert extract_entities(["S-PER", "B-LOC", "E-LOC", "O"], "IOBES") == {("PER", 0, 0), ("LOC", 1, 2)}
    assert extract_entities(["B-LOC", "I-LOC", "E-LOC", "E-LOC"]) == {("LOC", 0, 2), ("LOC", 3, 3)}
    assert extract_entities(["S-PER", "I-PER", "E-ORG"]) == {("PER", 0, 0), ("PER", 1, 1), ("ORG", 2, 2)}


@pytest.mark.parametrize("tag", ["X-PER", "B-", "PER", "", "b-PER"])
def test_bad_tags_and_schemes_fail(tag):
    with pytest.raises(ValueError, match=f"Tag {tag!r} at position 1"):
        extract_entities(["O", tag])
    with pytest.raises(ValueError, match="scheme must be"):
        extract_entities(["O"], "BILOU")
    with pytest.raises(ValueError, match="scheme must be"):
        EntityF1(["PER"], scheme="bio")


def test_entity_types_from_a_label_list():
    assert entity_types(["O", "B-PER", "I-PER", "B-geo-loc", "I-geo-loc"]) == ["PER", "geo-loc"]
    assert EntityF1.from_labels(["O", "B-PER", "I-PER"]).entity_types == ["PER"]


def test_partial_span_counts_as_one_false_positive_and_one_false_negative():
    metric = EntityF1(["LOC", "PER"])
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-LOC", "I-LOC", "I-LOC"]]
    pred = [["B-PER", "O", "O", "B-LOC"],        # PER span too short: wrong; LOC right
            ["B-LOC", "I-LOC", "I-LOC"]]         # right
    metric.update(pred, gold)
    scores = scores_of(metric)
    # predicted: PER(0,0) LOC(3,3) LOC(0,2) -> 3; gold: PER(0,1) LOC(3,3) LOC(0,2) -> 3; correct 2
    assert scores["precision"] == pytest.approx(2 / 3) and scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(2 / 3)
    assert scores["PER_f1"] == 0.0 and scores["PER_support"] == 1
    assert scores["LOC_precision"] == scores["LOC_recall"] == scores["LOC_f1"] == 1.0
    assert scores["support"] == 3 and scores["macro_f1"] == pytest.approx(0.5)


def test_wrong_type_nested_and_merged_spans_are_wrong():
    metric = EntityF1(["LOC", "ORG", "PER"])
    metric.update([["B-ORG", "I-ORG", "I-ORG"]], [["B-LOC", "I-LOC", "I-LOC"]])  # right span, wrong type
    metric.update([["B-ORG", "I-ORG", "B-ORG"]], [["B-ORG", "I-ORG", "I-ORG"]])  # two spans inside one gold
    metric.update([["O", "B-PER", "O"]], [["B-PER", "I-PER", "I-PER"]])          # nested in the gold span
    metric.update([["B-PER", "I-PER"]], [["B-PER", "B-PER"]])                    # two adjacent merged in one
    assert metric.true_positive.tolist() == [0, 0, 0]
    assert metric.predicted.tolist() == [0, 3, 2] and metric.gold.tolist() == [1, 1, 3]
    scores = scores_of(metric)
    assert scores["f1"] == scores["precision"] == scores["recall"] == 0.0
    # LOC: gold only -> precision 0 (zero_division=0), recall 0.
    assert scores["LOC_precision"] == 0.0 and scores["LOC_support"] == 1


def test_mixed_sentences_micro_scores():
    metric = EntityF1(["LOC", "PER"])
    # Sentence 1: gold PER(0,1), LOC(3,3); pred PER(0,1) right, LOC(2,3) wrong.
    # Sentence 2: gold none; pred PER(1,1) wrong. Sentence 3: gold LOC(0,0); pred none.
    metric.update([["B-PER", "I-PER", "B-LOC", "I-LOC"], ["O", "B-PER"], ["O"]],
                  [["B-PER", "I-PER", "O", "B-LOC"], ["O", "O"], ["B-LOC"]])
    scores = scores_of(metric)
    # tp 1, predicted 3, gold 3.
    assert scores["precision"] == pytest.approx(1 / 3) and scores["recall"] == pytest.approx(1 / 3)
    # PER: tp 1, predicted 2, gold 1 -> p 0.5, r 1, f1 2/3.
    assert scores["PER_precision"] == 0.5 and scores["PER_recall"] == 1.0
    assert scores["PER_f1"] == pytest.approx(2 / 3)


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric EntityF1 was called before")
def test_sentences_are_decoded_separately():
    # An entity ending one sentence and an I- starting the next are two entities, not one.
    metric = EntityF1(["PER"])
    metric.update([["O", "B-PER"], ["I-PER", "O"]], [["O", "B-PER"], ["I-PER", "O"]])
    assert metric.gold.tolist() == [2] and metric.true_positive.tolist() == [2]
    metric.update([["B-PER"]], [["O"]])  # a later update adds to the same counts
    assert metric.predicted.tolist() == [3]
    assert scores_of(metric)["precision"] == pytest.approx(2 / 3)
    metric.reset()
    assert metric.predicted.tolist() == [0] and scores_of(metric)["f1"] == 0.0


def test_update_rejects_inconsistent_input():
    metric = EntityF1(["PER"])
    with pytest.raises(ValueError, match="2 predicted sentences but 1 gold"):
        metric.update([["O"], ["O"]], [["O"]])
    with pytest.raises(ValueError, match="2 predicted vs 1 gold"):
        metric.update([["O", "O"]], [["O"]])
    with pytest.raises(ValueError, match="Entity type 'LOC' is not one of"):
        metric.update([["B-LOC"]], [["O"]])  # never silently left out of the scores


def test_report_lists_every_type_with_support():
    metric = EntityF1(["LOC", "PER", "geo-loc"])
    metric.update([["B-PER", "O", "O"], ["B-LOC", "O"]], [["B-PER", "B-LOC", "O"], ["B-PER", "O"]])
    report = metric.format_report().splitlines()
    assert report[0].split() == ["type", "precision", "recall", "f1", "support"]
    # LOC: predicted 1 (wrong), gold 1; PER: predicted 1 right, gold 2; geo-loc: nothing.
    assert report[1].split() == ["LOC", "0.000", "0.000", "0.000", "1"]
    assert report[2].split() == ["PER", "1.000", "0.500", "0.667", "2"]
    assert report[3].split() == ["geo-loc", "0.000", "0.000", "0.000", "0"]
    assert report[4].split() == ["micro", "avg", "0.500", "0.333", "0.400", "3"]
    assert len(report) == 5


BATCHES = [([["B-PER", "O"]], [["B-PER", "O"]]),
           ([["O", "B-LOC"], ["B-PER", "I-PER"]], [["B-LOC", "O"], ["B-PER", "I-PER"]])]


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric EntityF1 was called before")
def test_states_sum_like_a_two_rank_sync():
    whole = EntityF1(["LOC", "PER"])
    ranks = [EntityF1(["LOC", "PER"]), EntityF1(["LOC", "PER"])]
    for (pred, gold), rank in zip(BATCHES, ranks):
        whole.update(pred, gold)
        rank.update(pred, gold)
    assert scores_of(ranks[0]) != scores_of(whole)  # each rank alone sees a different picture
    summed = EntityF1(["LOC", "PER"])
    for name in ("true_positive", "predicted", "gold"):
        setattr(summed, name, sum(getattr(rank, name) for rank in ranks))
    assert scores_of(summed) == scores_of(whole)
    assert whole.gold.tolist() == [1, 2] and whole.true_positive.tolist() == [0, 2]
    ranks[0].merge_state(ranks[1])  # torchmetrics' own merge uses dist_reduce_fx ("sum")
    assert scores_of(ranks[0]) == scores_of(whole)


def test_compute_syncs_through_torchmetrics_reduction():
    """Run torchmetrics' real sync path with a fake all_gather standing for two ranks."""
    other = EntityF1(["LOC", "PER"])
    other.update(*BATCHES[1])
    names = ("true_positive", "predicted", "gold")  # add_state order, which torchmetrics gathers in
    gathered: list[str] = []

    def all_gather(tensor: torch.Tensor, group=None) -> list[torch.Tensor]:
        name = names[len(gathered) % 3]
        gathered.append(name)
        assert torch.equal(tensor, getattr(rank0, name))  # the local state it stands for
        return [tensor, getattr(other, name).clone()]  # ... and "rank 1"'s matching state

    rank0 = EntityF1(["LOC", "PER"], dist_sync_fn=all_gather, distributed_available_fn=lambda: True)
    rank0.update(*BATCHES[0])
    whole = EntityF1(["LOC", "PER"])
    for pred, gold in BATCHES:
        whole.update(pred, gold)
    assert scores_of(rank0) == scores_of(whole)
    assert gathered == list(names)
    assert rank0.gold.tolist() == [0, 1]  # the local state is restored after compute (unsync)
    # The report's support column is the global count (2 PER), not this rank's (1).
    assert rank0.format_report().splitlines()[2].split() == ["PER", "1.000", "1.000", "1.000", "2"]
