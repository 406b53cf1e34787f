"""The NER recipe end to end: Hydra compose API in-process, then the real command line with ranks."""

from __future__ import annotations

import sys

import torch

from helpers.launch import ROOT, run_job
from helpers.recipes import compose_config
from lightning_mp.tasks.ner.recipe import check_config, run_ner

SMALL = ["model=bert-tiny", "trainer.max_epochs=1", "trainer.limit_train_batches=4", "trainer.limit_val_batches=2",
         "trainer.batch_size=16", "data.max_length=48", "trainer.learning_rate=1e-3", "trainer.log_every_n_steps=1"]


def test_recipe_trains_tests_and_exports(tmp_path, in_process_run):
    from transformers import AutoModelForTokenClassification

    cfg = compose_config("ner_bert", SMALL)
    check_config(cfg)
    f1 = run_ner(cfg, original_cwd=ROOT, run_dir=tmp_path)
    assert 0.0 <= f1 <= 1.0
    metrics = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text()
    assert "train_loss" in metrics and "val_f1" in metrics and "test_f1" in metrics and "tokens_per_s" in metrics
    assert list((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
    assert len(list((tmp_path / "checkpoints").glob("best-*.ckpt"))) == 1

    export = tmp_path / "hf_model"
    model = AutoModelForTokenClassification.from_pretrained(export).eval()
    assert model.config.id2label[0] == "O" and model.config.num_labels == 21  # WNUT-16: 10 types × B/I + O
    assert (export / "tokenizer.json").is_file()
    ids = torch.tensor([[101, 7592, 2088, 102]])
    checkpoint = torch.load(next((tmp_path / "checkpoints").glob("best-*.ckpt")), weights_only=False)
    best = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    reference = AutoModelForTokenClassification.from_config(model.config)
    reference.load_state_dict(best)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, reference.eval()(input_ids=ids).logits, atol=1e-6)

    predicted = run_job([sys.executable, str(ROOT / "recipes" / "ner_predict.py"), str(export)],
                        input="Obama visited Paris\n", timeout=120, check=False)
    assert predicted.returncode == 0, predicted.stderr
    assert predicted.stdout.startswith("Obama visited Paris\n  -> ")


def test_unknown_model_size_lists_the_valid_ones(tmp_path):
    result = run_job([sys.executable, str(ROOT / "recipes" / "ner_bert.py"), "model=bert-huge"], cwd=tmp_path,
                     timeout=120, check=False)
    assert result.returncode != 0
    assert "Could not find 'model/bert-huge'" in result.stderr
    assert "bert-base" in result.stderr and "minilm" in result.stderr


def test_recipe_with_pipeline_and_tensor_parallel_ranks(tmp_path):
    cmd = [sys.executable, str(ROOT / "recipes" / "ner_bert.py"), *SMALL, "trainer.devices=4", "parallel.pipeline=2",
           "parallel.tensor=2", "parallel.microbatches=4", f"hydra.run.dir={tmp_path}"]
    result = run_job(cmd, cwd=tmp_path, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "test entity F1 =" in result.stdout
    # The full checkpoint and the export hold both stages, merged under the unsplit model's names.
    checkpoint = torch.load(next((tmp_path / "checkpoints").glob("best-*.ckpt")), weights_only=False)
    names = set(checkpoint["state_dict"])
    assert {"model.bert.embeddings.word_embeddings.weight", "model.bert.encoder.layer.0.output.dense.weight",
            "model.bert.encoder.layer.1.output.dense.weight", "model.classifier.weight"} <= names
    from transformers import AutoModelForTokenClassification

    model = AutoModelForTokenClassification.from_pretrained(tmp_path / "hf_model")
    torch.testing.assert_close(model.classifier.weight, checkpoint["state_dict"]["model.classifier.weight"])


def test_recipe_with_tensor_and_data_parallel_ranks_loads_the_pretrained_minilm_shard_by_shard(tmp_path):
    """The default model (MiniLM, pretrained) under tensor x data parallelism (4 ranks) goes through
    lightning_mp.from_pretrained, trains, tests, keeps its best checkpoint and exports; with a learning rate of 0
    the exported encoder is MiniLM's, bit for bit."""
    from safetensors.torch import load_file

    from lightning_mp.tasks.ner.data import minilm_path

    overrides = [o for o in SMALL if not o.startswith(("model=", "trainer.learning_rate"))]
    cmd = [sys.executable, str(ROOT / "recipes" / "ner_bert.py"), *overrides, "trainer.learning_rate=0",
           "trainer.devices=4", "parallel.tensor=2", "trainer.limit_train_batches=1", f"hydra.run.dir={tmp_path}"]
    result = run_job(cmd, cwd=tmp_path, timeout=600)
    assert "test entity F1 =" in result.stdout
    assert len(list((tmp_path / "checkpoints").glob("best-*.ckpt"))) == 1
    assert (tmp_path / "hf_model" / "config.json").is_file()
    pretrained = load_file(minilm_path() / "model.safetensors")
    exported = {}
    for file in (tmp_path / "hf_model").glob("*.safetensors"):
        exported.update(load_file(file))
    # MiniLM's file also holds the legacy buffer embeddings.position_ids, no longer a weight of the model.
    encoder = [key for key in pretrained if key.startswith(("embeddings.", "encoder.")) and f"bert.{key}" in exported]
    assert len(encoder) == len(pretrained) - 3  # all but position_ids and the pooler (weight, bias)
    assert [key for key in encoder if not torch.equal(exported[f"bert.{key}"], pretrained[key])] == []
