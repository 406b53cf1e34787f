"""Readers on real-format fixtures, the deterministic split, label alignment and padding."""

from __future__ import annotations

import pytest

from lightning_mp.tasks.ner.data import (
    NERDataModule,
    Sentence,
    TokenClassificationCollator,
    build_label_list,
    encode_sentence,
    minilm_path,
    read_conll,
    read_ner_file,
    read_wnut,
    split_sentences,
    wnut16_path,
)

CONLL = """-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC

Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER
"""

WNUT = "@user\tO\nParis\tB-geo-loc\nrocks\tO\n\t\nnew\tO\nyork\tB-geo-loc\ncity\tI-geo-loc\n"


def test_conll_reader(tmp_path):
    path = tmp_path / "eng.train"
    path.write_text(CONLL)
    sentences = read_ner_file(path)
    assert sentences == [Sentence(["EU", "rejects", "German"], ["B-ORG", "O", "B-MISC"]),
                         Sentence(["Peter", "Blackburn"], ["B-PER", "I-PER"])]


def test_wnut_reader_uses_tab_only_separators(tmp_path):
    path = tmp_path / "wnut.txt"
    path.write_text(WNUT)
    sentences = read_ner_file(path)
    assert [s.tokens for s in sentences] == [["@user", "Paris", "rocks"], ["new", "york", "city"]]
    assert sentences[1].tags == ["O", "B-geo-loc", "I-geo-loc"]


@pytest.mark.parametrize("reader,text,line", [
    (read_conll, "EU NNP B-ORG\nrejects\n", 2),
    (read_conll, "EU NNP B-ORG\nrejects VBZ Q-ORG\n", 2),
    (read_wnut, "Paris\tB-geo-loc\nrocks O\n", 2),
])
def test_malformed_lines_name_file_and_line(tmp_path, reader, text, line):
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"bad\.txt:{line}: malformed NER line"):
        reader(path)


def test_packaged_wnut16_and_deterministic_split():
    sentences = read_ner_file(wnut16_path())
    assert len(sentences) == 2394
    first = split_sentences(sentences, seed=13)
    again = split_sentences(sentences, seed=13)
    assert [len(part) for part in first] == [1915, 239, 240]
    assert all(a == b for a, b in zip(first, again))
    ids = [id(s) for part in first for s in part]
    assert len(set(ids)) == len(sentences)  # disjoint and complete
    assert split_sentences(sentences, seed=14)[2] != first[2]


def test_label_list_has_o_first_and_inside_tags():
    labels = build_label_list([Sentence(["a", "b"], ["B-PER", "O"]), Sentence(["c"], ["B-LOC"])])
    assert labels == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]


def test_first_subtoken_carries_the_label():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
    sentence = Sentence(["Kuala", "Lumpurians", "#unbelievable"], ["B-LOC", "I-LOC", "O"])
    labels = {"O": 0, "B-LOC": 1, "I-LOC": 2}
    encoded = encode_sentence(tokenizer, sentence, labels, max_length=32)
    pieces = tokenizer.convert_ids_to_tokens(encoded["input_ids"])
    assert pieces[0] == "[CLS]" and pieces[-1] == "[SEP]"
    assert len(pieces) > 5  # the words split into several sub-tokens
    word_ids = encoded["word_ids"]
    for position, word in enumerate(word_ids):
        first = word is not None and (position == 0 or word_ids[position - 1] != word)
        expected = labels[sentence.tags[word]] if first else -100
        assert encoded["labels"][position] == expected, (pieces[position], position)
    assert sum(label != -100 for label in encoded["labels"]) == 3


def test_collator_pads_to_longest():
    batch = TokenClassificationCollator(pad_token_id=0)([
        {"input_ids": [101, 5, 102], "attention_mask": [1, 1, 1], "labels": [-100, 3, -100]},
        {"input_ids": [101, 102], "attention_mask": [1, 1], "labels": [-100, -100]},
    ])
    assert batch["input_ids"].tolist() == [[101, 5, 102], [101, 102, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, 3, -100], [-100, -100, -100]]


def test_datamodule_batches(tmp_path):
    path = tmp_path / "wnut.txt"
    path.write_text(WNUT)
    datamodule = NERDataModule(train_file=path, val_file=path, test_file=path, batch_size=2)
    datamodule.setup("fit")
    batch = next(iter(datamodule.val_dataloader()))
    assert datamodule.label_list == ["O", "B-geo-loc", "I-geo-loc"]
    assert batch["input_ids"].shape == batch["labels"].shape and batch["input_ids"].shape[0] == 2
    assert (batch["labels"] != -100).sum().item() == 6  # one label per word
