"""Entity-level precision / recall / F1 with strict span matching (the CoNLL / seqeval definition).

An entity counts as correct only when its type and both boundaries match a gold entity exactly.

Decoding rules, per scheme:
- BIO (IOB2): ``B-X`` starts an entity; ``I-X`` continues an entity of type X. An ``I-X`` that does not
  continue an X entity (after ``O``, or after another type) starts a new entity, as conlleval does.
- IOB1: ``I-X`` starts or continues an X entity; ``B-X`` appears only between two adjacent entities of
  the same type and starts the second one.
- ``E-X`` / ``S-X`` (IOBES) are read as the end of / a single-token entity.

With these (conlleval's) rules one decoder reads both schemes: a valid IOB1 sequence and its BIO
rewrite give the same spans. ``scheme`` is checked so that a typo fails loudly.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torchmetrics

Span = tuple[str, int, int]  # (type, first token, last token inclusive)


def _split(tag: str) -> tuple[str, str]:
    if tag in ("O", ""):
        return "O", ""
    prefix, _, kind = tag.partition("-")
    return prefix, kind


def extract_entities(tags: Iterable[str], scheme: str = "BIO") -> set[Span]:
    if scheme not in ("BIO", "IOB1"):
        raise ValueError(f"scheme must be 'BIO' or 'IOB1', got {scheme!r}.")
    spans: set[Span] = set()
    current: list = []  # [type, start] of the open entity, or empty

    def close(end: int) -> None:
        if current:
            spans.add((current[0], current[1], end))
            current.clear()

    tags = list(tags)
    for i, tag in enumerate(tags):
        prefix, kind = _split(tag)
        if prefix == "O":
            close(i - 1)
        elif prefix == "S":
            close(i - 1)
            spans.add((kind, i, i))
        elif prefix == "B":
            close(i - 1)
            current.extend([kind, i])
        elif prefix in ("I", "E"):
            if not current or current[0] != kind:
                close(i - 1)
                current.extend([kind, i])
            if prefix == "E":
                close(i)
        else:
            raise ValueError(f"Tag {tag!r} at position {i} is not O, B-, I-, E- or S-.")
    close(len(tags) - 1)
    return spans


class EntityF1(torchmetrics.Metric):
    """Micro and per-type entity P/R/F1; counts are summed across ranks on ``compute``.

    ``update(predicted, gold)`` takes lists of tag sequences (one list of tag strings per sentence).
    The entity types are fixed at construction so that every rank holds states of the same shape.
    """

    full_state_update = False

    def __init__(self, entity_types: Iterable[str], scheme: str = "BIO") -> None:
        super().__init__()
        self.entity_types = sorted(set(entity_types))
        self._index = {kind: i for i, kind in enumerate(self.entity_types)}
        self.scheme = scheme
        size = len(self.entity_types)
        for name in ("true_positive", "predicted", "gold"):
            self.add_state(name, default=torch.zeros(size, dtype=torch.long), dist_reduce_fx="sum")

    @staticmethod
    def types_from_labels(labels: Iterable[str]) -> list[str]:
        return sorted({_split(label)[1] for label in labels if label != "O"})

    def update(self, predicted: list[list[str]], gold: list[list[str]]) -> None:
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
                    if kind in self._index:
                        counts[row, self._index[kind]] += 1
        self.true_positive += counts[0].to(self.true_positive.device)
        self.predicted += counts[1].to(self.predicted.device)
        self.gold += counts[2].to(self.gold.device)

    def compute(self) -> dict[str, torch.Tensor]:
        result = _scores(self.true_positive.sum(), self.predicted.sum(), self.gold.sum())
        for kind, i in self._index.items():
            for name, value in _scores(self.true_positive[i], self.predicted[i], self.gold[i]).items():
                result[f"{kind}_{name}"] = value
        return result

    def format_report(self) -> str:
        """A per-type table, like seqeval's classification_report."""
        values = self.compute()
        lines = [f"{'type':<16}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>9}"]
        for kind, i in self._index.items():
            lines.append(f"{kind:<16}{values[f'{kind}_precision']:>10.3f}{values[f'{kind}_recall']:>10.3f}"
                         f"{values[f'{kind}_f1']:>10.3f}{int(self.gold[i]):>9d}")
        lines.append(f"{'micro avg':<16}{values['precision']:>10.3f}{values['recall']:>10.3f}"
                     f"{values['f1']:>10.3f}{int(self.gold.sum()):>9d}")
        return "\n".join(lines)


def _scores(tp: torch.Tensor, predicted: torch.Tensor, gold: torch.Tensor) -> dict[str, torch.Tensor]:
    tp, predicted, gold = tp.double(), predicted.double(), gold.double()
    precision = tp / predicted if predicted > 0 else torch.zeros((), dtype=torch.double)
    recall = tp / gold if gold > 0 else torch.zeros((), dtype=torch.double)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else torch.zeros((), dtype=torch.double)
    return {"precision": precision.float(), "recall": recall.float(), "f1": f1.float()}
