"""The NER recipe end to end: Hydra compose API in-process, then the real command line with ranks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import clean_env
from hydra import compose, initialize_config_dir

from lightning_mp.tasks.ner.recipe import check_config, run_ner

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["model=bert-tiny", "trainer.max_epochs=1", "trainer.limit_train_batches=4", "trainer.limit_val_batches=2",
         "trainer.batch_size=16", "data.max_length=48", "trainer.learning_rate=1e-3", "trainer.log_every_n_steps=1"]


def compose_config(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("ner_bert", overrides=overrides)


def test_recipe_trains_tests_and_exports(tmp_path, in_process_run):
    from transformers import AutoModelForTokenClassification

    cfg = compose_config(SMALL)
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

    predicted = subprocess.run([sys.executable, str(ROOT / "recipes" / "ner_predict.py"), str(export)],
                               input="Obama visited Paris\n", capture_output=True, text=True, timeout=120,
                               env=clean_env())
    assert predicted.returncode == 0, predicted.stderr
    assert predicted.stdout.startswith("Obama visited Paris\n  -> ")


@pytest.mark.parametrize("overrides,message", [
    (["model=bert-tiny", "trainer.devices=4", "parallel.tensor=4"],
     "tensor_parallel_size=4 does not divide num_attention_heads=2 of BertForTokenClassification; valid tensor_parallel_size values for this model: 1, 2"),
    (["trainer.devices=4", "parallel.tensor=2", "parallel.data=3"], "world size is 4"),
    (["trainer.devices=2", "trainer.batch_size=7"], "trainer.batch_size=7 is not divisible by the 2 data-parallel ranks"),
    (["trainer.precision=fp8"], "precision='fp8' is not supported by lightning_mp; choose one of 32-true"),
    (["model=bert-tiny", "trainer.devices=4", "parallel.pipeline=4"],
     "pipeline_parallel_size=4 with schedule '1f1b': 4 pipeline stages need at least 4 blocks (one each), but the model has 2"),
    (["trainer.devices=2", "parallel.pipeline=2", "parallel.microbatches=4", "trainer.batch_size=18"],
     "the batch size per data-parallel rank, 18, is not divisible by microbatches=4; use a multiple of 4"),
])
def test_bad_overrides_fail_at_once(overrides, message):
    with pytest.raises(ValueError) as error:
        check_config(compose_config(overrides))
    assert message in str(error.value)


def test_unknown_model_size_lists_the_valid_ones(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "recipes" / "ner_bert.py"), "model=bert-huge"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120, env=clean_env())
    assert result.returncode != 0
    assert "Could not find 'model/bert-huge'" in result.stderr
    assert "bert-base" in result.stderr and "minilm" in result.stderr


@pytest.mark.slow
def test_recipe_with_tensor_and_data_parallel_ranks(tmp_path):
    env = clean_env()
    cmd = [sys.executable, str(ROOT / "recipes" / "ner_bert.py"), *SMALL, "trainer.devices=4", "parallel.tensor=2",
           f"hydra.run.dir={tmp_path}"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "test entity F1 =" in result.stdout
    assert (tmp_path / "hf_model" / "config.json").is_file()
    assert len(list((tmp_path / "checkpoints").glob("best-*.ckpt"))) == 1


@pytest.mark.slow
def test_recipe_with_pipeline_and_tensor_parallel_ranks(tmp_path):
    cmd = [sys.executable, str(ROOT / "recipes" / "ner_bert.py"), *SMALL, "trainer.devices=4", "parallel.pipeline=2",
           "parallel.tensor=2", "parallel.microbatches=4", f"hydra.run.dir={tmp_path}"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600, env=clean_env())
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


@pytest.mark.slow
def test_recipe_loads_the_pretrained_minilm_shard_by_shard(tmp_path):
    """The default model (MiniLM, pretrained) under tensor x data parallelism goes through
    lightning_mp.from_pretrained; with a learning rate of 0 the exported encoder is MiniLM's, bit for bit."""
    from safetensors.torch import load_file

    from lightning_mp.tasks.ner.data import minilm_path

    overrides = [o for o in SMALL if not o.startswith(("model=", "trainer.learning_rate"))]
    cmd = [sys.executable, str(ROOT / "recipes" / "ner_bert.py"), *overrides, "trainer.learning_rate=0",
           "trainer.devices=4", "parallel.tensor=2", "trainer.limit_train_batches=1", f"hydra.run.dir={tmp_path}"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600, env=clean_env())
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    pretrained = load_file(minilm_path() / "model.safetensors")
    exported = {}
    for file in (tmp_path / "hf_model").glob("*.safetensors"):
        exported.update(load_file(file))
    # MiniLM's file also holds the legacy buffer embeddings.position_ids, no longer a weight of the model.
    encoder = [key for key in pretrained if key.startswith(("embeddings.", "encoder.")) and f"bert.{key}" in exported]
    assert len(encoder) == len(pretrained) - 3  # all but position_ids and the pooler (weight, bias)
    assert [key for key in encoder if not torch.equal(exported[f"bert.{key}"], pretrained[key])] == []
