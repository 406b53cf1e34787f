"""TokenClassifier: a tiny BERT learns a synthetic tagging rule; the real MiniLM loads with our labels."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_mp.checkpoint.pretrained import is_meta, materialize
from lightning_mp.tasks.ner.data import NERDataModule, TokenClassificationCollator, minilm_path
from lightning_mp.tasks.ner.module import TokenClassifier

LABELS = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
CLS, SEP, PAD, PIECE = 1, 2, 0, 3  # PIECE: a non-first sub-token (label -100)


def tiny_config():
    from transformers import BertConfig

    return BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64)


def synthetic_examples(count: int, seed: int) -> list[dict]:
    """Word ids decide the tag: 10-19 B-PER (then maybe 20-29 I-PER), 30-39 B-LOC, 40-99 O."""
    rng = torch.Generator().manual_seed(seed)
    pick = lambda low, high: int(torch.randint(low, high, (1,), generator=rng))  # noqa: E731
    examples = []
    for _ in range(count):
        ids, labels = [CLS], [-100]

        def add(token: int, label: int) -> None:
            ids.append(token)
            labels.append(label)

        for _ in range(pick(3, 9)):
            kind = pick(0, 4)
            if kind == 0:
                add(pick(10, 20), 3)
                if pick(0, 2):
                    add(pick(20, 30), 4)
            elif kind == 1:
                add(pick(30, 40), 1)
            else:
                add(pick(40, 100), 0)
            if pick(0, 4) == 0:  # a word split into two sub-tokens
                add(PIECE, -100)
        add(SEP, -100)
        examples.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return examples


def loader(examples: list[dict], shuffle: bool = False) -> DataLoader:
    return DataLoader(examples, batch_size=8, shuffle=shuffle, collate_fn=TokenClassificationCollator(PAD),
                      generator=torch.Generator().manual_seed(0) if shuffle else None)


class Record(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def trainer(**kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, **kwargs)


@pytest.fixture(scope="module")
def trained():
    L.seed_everything(0, verbose=False)
    module = TokenClassifier(tiny_config(), LABELS, learning_rate=3e-3, warmup_ratio=0.1)
    record = Record()
    fit = trainer(max_steps=48, callbacks=[record], num_sanity_val_steps=0)
    fit.fit(module, train_dataloaders=loader(synthetic_examples(64, 1), shuffle=True),
            val_dataloaders=loader(synthetic_examples(24, 2)))
    return module, record, fit


def test_loss_goes_down_and_validation_logs_entity_scores(trained):
    module, record, fit = trained
    assert len(record.losses) == 48 and all(math.isfinite(loss) for loss in record.losses)
    first, last = sum(record.losses[:6]) / 6, sum(record.losses[-6:]) / 6
    assert last < 0.5 * first, (first, last)
    metrics = fit.callback_metrics
    assert {"train_loss", "val_loss", "val_f1", "val_precision", "val_recall"} <= set(metrics)
    assert metrics["val_f1"].item() > 0.8  # the rule is easy; chance level is far below


def test_warmup_then_linear_decay_per_step(trained):
    _, record, _ = trained
    peak = 3e-3
    # 48 steps, warmup_ratio 0.1 -> 4 warmup steps: lr = peak * (step + 1) / 4, then peak * (48 - step) / 44.
    assert record.lrs[:5] == pytest.approx([peak / 4, peak / 2, 3 * peak / 4, peak, peak * 44 / 44])
    assert record.lrs[-1] == pytest.approx(peak / 44)


def test_test_report_and_predictions(trained):
    module, _, fit = trained
    examples = synthetic_examples(16, 3)
    fit.test(module, dataloaders=loader(examples), verbose=False)
    assert fit.callback_metrics["test_f1"].item() > 0.8
    report = module.test_report.splitlines()
    assert [line.split()[0] for line in report] == ["type", "LOC", "PER", "micro"]
    support = sum(sum(label in (1, 3) for label in example["labels"]) for example in examples)
    assert int(report[-1].split()[-1]) == support  # gold entities = B- labels here

    predictions = [tags for batch in fit.predict(module, dataloaders=loader(examples)) for tags in batch]
    assert len(predictions) == len(examples)
    gold = [[LABELS[label] for label in example["labels"] if label != -100] for example in examples]
    assert [len(tags) for tags in predictions] == [len(tags) for tags in gold]  # one tag per word
    assert all(tag in LABELS for tags in predictions for tag in tags)
    correct = sum(p == g for tags, ref in zip(predictions, gold) for p, g in zip(tags, ref))
    assert correct / sum(map(len, gold)) > 0.9


def test_optimizer_groups_and_hyperparameters():
    config = tiny_config()
    module = TokenClassifier(config, LABELS, weight_decay=0.05)
    assert config.num_labels == 2  # the caller's config is not changed
    assert module.model.config.id2label == dict(enumerate(LABELS))
    assert module.model.config.label2id == {label: i for i, label in enumerate(LABELS)}
    assert module.model.classifier.out_features == len(LABELS)
    optimizer = module.configure_optimizers()  # no trainer attached: no schedule
    assert isinstance(optimizer, torch.optim.AdamW)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in module.model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "bert.embeddings.LayerNorm.weight" in no_decay_names and "classifier.bias" in no_decay_names
    assert all(n.endswith("bias") or "LayerNorm" in n for n in no_decay_names)
    assert len(decay["params"]) + len(no_decay["params"]) == len(names)
    assert all(p.ndim == 2 for p in decay["params"])

    rebuilt = TokenClassifier(**module.hparams)  # what load_from_checkpoint does
    assert rebuilt.model.config.num_hidden_layers == 2 and rebuilt.label_list == LABELS
    assert {n: p.shape for n, p in rebuilt.named_parameters()} == {n: p.shape for n, p in module.named_parameters()}


def test_real_minilm_with_wnut_labels():
    from safetensors import safe_open

    datamodule = NERDataModule(batch_size=4)
    datamodule.setup("fit")
    module = TokenClassifier(minilm_path(), datamodule.label_list)
    assert is_meta(module.model)  # the strategy would load each rank's shards; here: the whole model
    materialize(module.model)
    assert module.model.training  # from_pretrained hands back eval mode; fine-tuning needs dropout
    assert module.model.config.num_labels == 21 and module.model.config.id2label[0] == "O"
    with safe_open(str(minilm_path() / "model.safetensors"), "pt") as weights:
        expected = weights.get_tensor("encoder.layer.5.output.dense.weight")
    assert torch.equal(module.model.bert.encoder.layer[5].output.dense.weight, expected)  # pretrained, not random
    batch = next(iter(datamodule.val_dataloader()))
    module.eval()
    with torch.no_grad():
        output = module(**batch)
    assert output.logits.shape == (*batch["input_ids"].shape, 21)
    assert 1.5 < output.loss.item() < 6.0  # an untrained head: about ln(21) = 3.0


def test_load_from_checkpoint_of_a_module_built_from_pretrained_weights(tmp_path):
    """The rebuilt module starts on meta; the checkpoint's (trained) weights must land in real tensors."""
    import lightning
    from transformers import BertModel

    BertModel(tiny_config()).save_pretrained(tmp_path / "pretrained")
    module = TokenClassifier(tmp_path / "pretrained", LABELS)
    materialize(module.model)
    with torch.no_grad():
        module.model.classifier.weight.add_(1.0)  # as if trained
    path = tmp_path / "module.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": lightning.__version__}, path)
    loaded = TokenClassifier.load_from_checkpoint(path)
    assert not is_meta(loaded.model)
    assert all(torch.equal(value, module.state_dict()[key]) for key, value in loaded.state_dict().items())
