"""Entity-level precision / recall / F1 with strict span matching (the CoNLL / seqeval definition).

An entity counts as correct only when its type and both boundaries match a gold entity exactly; a
partial overlap or a wrong type is one false positive plus one false negative.

Decoding (:func:`extract_entities`) follows conlleval, which is also seqeval's default mode:

- ``O`` ends the open entity.
- ``B-X`` always ends the open entity and starts an X entity.
- ``I-X`` continues the open entity if it has type X; otherwise (after ``O``, at the start of the
  sentence, or after another type) it ends the open entity and starts a new X entity. So a "dangling"
  ``I-X`` in BIO is an entity, not an error and not dropped.
- ``E-X`` continues an open X entity (or starts one) and closes it; ``S-X`` is a one-token entity.

These rules read a valid sequence of every scheme exactly as that scheme means it: in BIO (IOB2) every
entity starts with ``B-``; in IOB1 entities start with ``I-`` and ``B-X`` only marks the boundary
between two adjacent X entities; IOBES adds ``E-``/``S-``. The BIO and IOB1 spellings of one set of
entities therefore decode to the same spans, and one decoder serves all schemes; ``scheme`` is still
checked so that a typo fails loudly.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
import torchmetrics

Span = tuple[str, int, int]  # (type, first token, last token inclusive)
SCHEMES = ("BIO", "IOB2", "IOB1", "IOBES")


def _split(tag: str, position: int) -> tuple[str, str]:
    if tag == "O":
        return "O", ""
    prefix, dash, kind = tag.partition("-")
    if prefix not in ("B", "I", "E", "S") or not dash or not kind:
        raise ValueError(f"Tag {tag!r} at position {position} is not O, B-X, I-X, E-X or S-X.")
    return prefix, kind


def extract_entities(tags: Iterable[str], scheme: str = "BIO") -> set[Span]:
    """The set of (type, start, end) entities in one tag sequence; ``end`` is inclusive."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {', '.join(SCHEMES)}; got {scheme!r}.")
    spans: set[Span] = set()
    kind_open, start = "", -1  # the open entity, if kind_open

    for i, tag in enumerate(tags):
        prefix, kind = _split(tag, i)
        continues = prefix in ("I", "E") and kind_open == kind
        if not continues:  # everything except a same-type I-/E- closes the open entity
            if kind_open:
                spans.add((kind_open, start, i - 1))
            kind_open, start = (kind, i) if prefix != "O" else ("", -1)
        if prefix in ("E", "S"):  # these close on themselves
            spans.add((kind, start, i))
            kind_open, start = "", -1
    if kind_open:
        spans.add((kind_open, start, i))
    return spans


def entity_types(labels: Iterable[str]) -> list[str]:
    """Sorted entity types of a label list: ["O", "B-PER", "I-PER", "B-LOC"] -> ["LOC", "PER"]."""
    return sorted({_split(label, i)[1] for i, label in enumerate(labels) if label != "O"})


class EntityF1(torchmetrics.Metric):
    """Micro and per-type entity precision / recall / F1 over sentences.

    API: ``update(predicted, gold)`` with two equally long lists of sentences, each sentence a list of tag
    strings of equal length (for a token classifier: the tags at first-sub-token positions, i.e. where
    ``labels != -100``). Entity types are fixed at construction, so every rank holds states of the same
    shape: per-type counts ``true_positive``, ``predicted`` and ``gold`` (LongTensors, summed across
    ranks on ``compute``). An entity of a type not in the list raises ``ValueError`` rather than being
    silently left out of the scores. Extra keyword arguments go to ``torchmetrics.Metric`` (e.g.
    ``process_group`` to sync over the data-parallel ranks only).
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, entity_types: Iterable[str], scheme: str = "BIO", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {', '.join(SCHEMES)}; got {scheme!r}.")
        self.entity_types = sorted(set(entity_types))
        self._index = {kind: i for i, kind in enumerate(self.entity_types)}
        self.scheme = scheme
        for name in ("true_positive", "predicted", "gold"):
            self.add_state(name, default=torch.zeros(len(self.entity_types), dtype=torch.long), dist_reduce_fx="sum")

    @classmethod
    def from_labels(cls, labels: Iterable[str], scheme: str = "BIO", **kwargs: Any) -> "EntityF1":
        return cls(entity_types(labels), scheme, **kwargs)

    def update(self, predicted: Sequence[Sequence[str]], gold: Sequence[Sequence[str]]) -> None:
        if len(predicted) != len(gold):
            raise ValueError(f"{len(predicted)} predicted sentences but {len(gold)} gold sentences.")
        counts = torch.zeros(3, len(self.entity_types), dtype=torch.long)
        for pred_tags, gold_tags in zip(predicted, gold):
            if len(pred_tags) != len(gold_tags):
                raise ValueError(f"Sentence lengths differ: {len(pred_tags)} predicted vs {len(gold_tags)} gold tags.")
            pred_spans = extract_entities(pred_tags, self.scheme)
            gold_spans = extract_entities(gold_tags, self.scheme)
            for row, spans in ((0, pred_spans & gold_spans), (1, pred_spans), (2, gold_spans)):
                for kind, _, _ in spans:
                    if kind not in self._index:
                        raise ValueError(f"Entity type {kind!r} is not one of {self.entity_types}.")
                    counts[row, self._index[kind]] += 1
        device = self.true_positive.device
        self.true_positive += counts[0].to(device)
        self.predicted += counts[1].to(device)
        self.gold += counts[2].to(device)

    def merge_state(self, incoming_state: dict[str, Any] | torchmetrics.Metric) -> None:
        super().merge_state(incoming_state)
        self._computed = None  # torchmetrics would otherwise keep returning a compute() cached before the merge

    def compute(self) -> dict[str, torch.Tensor]:
        """``precision``/``recall``/``f1`` (micro: from counts summed over types), ``macro_f1`` (mean over the types
        that were predicted or gold), ``support``
        (gold entities), and ``{type}_precision``/``_recall``/``_f1``/``_support`` per type. A ratio with a
        zero denominator is 0 (seqeval's zero_division=0)."""
        tp, predicted, gold = self.true_positive, self.predicted, self.gold
        result = _scores(tp.sum(), predicted.sum(), gold.sum())
        result["support"] = gold.sum()
        per_type_f1 = []
        for kind, i in self._index.items():
            scores = _scores(tp[i], predicted[i], gold[i])
            if predicted[i] + gold[i] > 0:  # macro average over the types that occur, as seqeval
                per_type_f1.append(scores["f1"])
            for name, value in scores.items():
                result[f"{kind}_{name}"] = value
            result[f"{kind}_support"] = gold[i]
        result["macro_f1"] = torch.stack(per_type_f1).mean() if per_type_f1 else torch.zeros(())
        return result

    def format_report(self, digits: int = 3) -> str:
        """A per-type table like seqeval's classification_report: type, precision, recall, f1, support.

        Built from ``compute()`` only, so under several ranks every number (support included) is global.
        """
        values = self.compute()
        width = max([len("micro avg"), *(len(kind) for kind in self.entity_types)]) + 2
        row = lambda name, p, r, f, s: (f"{name:<{width}}{float(p):>10.{digits}f}{float(r):>10.{digits}f}"  # noqa: E731
                                        f"{float(f):>10.{digits}f}{int(s):>9d}")
        lines = [f"{'type':<{width}}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>9}"]
        for kind in self.entity_types:
            lines.append(row(kind, *(values[f"{kind}_{name}"] for name in ("precision", "recall", "f1", "support"))))
        lines.append(row("micro avg", values["precision"], values["recall"], values["f1"], values["support"]))
        return "\n".join(lines)


def _scores(tp: torch.Tensor, predicted: torch.Tensor, gold: torch.Tensor) -> dict[str, torch.Tensor]:
    tp, predicted, gold = tp.double(), predicted.double(), gold.double()
    precision = tp / predicted.clamp(min=1)  # tp <= predicted, so a zero denominator gives 0
    recall = tp / gold.clamp(min=1)
    f1 = 2 * tp / (predicted + gold).clamp(min=1)  # = harmonic mean of precision and recall
    return {"precision": precision.float(), "recall": recall.float(), "f1": f1.float()}
