"""Inference with an exported NER model: words in, entity spans out."""

from __future__ import annotations

from pathlib import Path

import torch

from lightning_mp.tasks.ner.metric import extract_entities


def tag_sentences(model_dir: str | Path, sentences: list[list[str]], batch_size: int = 32,
                  scheme: str = "BIO") -> list[list[tuple[str, str]]]:
    """For each sentence (a list of words) the (type, text) of every entity found."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForTokenClassification.from_pretrained(str(model_dir)).eval()
    id2label = model.config.id2label
    results = []
    for start in range(0, len(sentences), batch_size):
        chunk = sentences[start:start + batch_size]
        encoding = tokenizer(chunk, is_split_into_words=True, truncation=True, padding=True, return_tensors="pt")
        with torch.no_grad():
            predictions = model(**encoding).logits.argmax(-1).tolist()
        for row, words in enumerate(chunk):
            tags, previous = ["O"] * len(words), None
            for position, word in enumerate(encoding.word_ids(row)):
                if word is not None and word != previous:  # the first sub-token speaks for the word
                    tags[word] = id2label[predictions[row][position]]
                previous = word
            spans = sorted(extract_entities(tags, scheme), key=lambda span: span[1])
            results.append([(kind, " ".join(words[first:last + 1])) for kind, first, last in spans])
    return results
