"""Named-entity recognition: data readers and a DataModule, the entity F1 metric, a LightningModule."""

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
from lightning_mp.tasks.ner.metric import EntityF1, entity_types, extract_entities
from lightning_mp.tasks.ner.module import TokenClassifier

__all__ = [
    "EntityF1",
    "NERDataModule",
    "Sentence",
    "TokenClassificationCollator",
    "TokenClassifier",
    "build_label_list",
    "encode_sentence",
    "entity_types",
    "extract_entities",
    "load_hf_dataset",
    "minilm_path",
    "read_conll",
    "read_ner_file",
    "read_wnut",
    "split_sentences",
    "wnut16_path",
]
