"""The causal-LM recipe end to end on a tiny random Llama: compose API in-process (one device), then the
real command line under the layouts the README advertises, and generation from what it wrote."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from helpers.launch import ROOT, run_job
from helpers.llm_tiny import recipe_llama_dir
from helpers.recipes import compose_config
from lightning_mp.tasks.llm.recipe import check_config, run_sft

# 48 training conversations, 3 steps of 16, short replies, one held-out pass of 2 batches.
SMALL = ["trainer.limit_train_batches=3", "data.max_train_examples=48", "trainer.batch_size=16", "data.max_length=64",
         "trainer.limit_val_batches=2", "trainer.learning_rate=3e-3", "trainer.log_every_n_steps=1",
         "generation.max_new_tokens=4", "generation.prompts=[Hello]"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return recipe_llama_dir(tmp_path_factory.mktemp("tiny-llama"))


def test_recipe_evaluates_trains_exports_and_answers(tmp_path, tiny_model, in_process_run):
    cfg = compose_config("sft_llm", [*SMALL, f"model.name_or_path={tiny_model}"])
    check_config(cfg, ROOT)
    result = run_sft(cfg, original_cwd=ROOT, run_dir=tmp_path)
    assert result["perplexity_after"] < result["perplexity_before"]  # lr 3e-3 on a random model: it must learn
    metrics = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text()
    for name in ("train_loss", "val_loss", "val_perplexity", "tokens_per_s", "lr-AdamW"):
        assert name in metrics, name
    generations = json.loads((tmp_path / "generations.json").read_text())
    assert generations["answers"][0]["prompt"] == "Hello"
    assert generations["perplexity_after"] == pytest.approx(result["perplexity_after"])
    export = tmp_path / "hf_model"
    assert (export / "config.json").is_file() and (export / "tokenizer_config.json").is_file()

    best = next((tmp_path / "checkpoints").glob("best-*.ckpt"))
    for source in (export, best):  # an exported directory and a checkpoint answer the same
        answered = run_job([sys.executable, str(ROOT / "recipes" / "llm_generate.py"), str(source), "Hello",
                            "--max-new-tokens", "4", *(["--tokenizer", str(tiny_model)] if source == best else [])],
                           timeout=300, check=False)
        assert answered.returncode == 0, answered.stderr[-3000:]
        assert answered.stdout.startswith(f"Hello\n  -> {generations['answers'][0]['after']}".rstrip())


def run_command_line(tmp_path: Path, model: Path, *overrides: str) -> str:
    cmd = [sys.executable, str(ROOT / "recipes" / "sft_llm.py"), *SMALL, f"model.name_or_path={model}",
           "generation.enabled=false", f"hydra.run.dir={tmp_path / 'run'}", *overrides]
    proc = run_job(cmd, cwd=tmp_path, timeout=900, check=False)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


# Pipeline alone (pp2) is covered by the HF parity matrix (tests/distributed/test_hf_parity.py).
@pytest.mark.parametrize("layout", [
    ["trainer.devices=3", "parallel.tensor=3"],  # 6 heads / 3 KV heads
    ["trainer.devices=4", "parallel.pipeline=2"],  # pipeline × data: each rank's batch has its own width
], ids=["tp3", "pp2xdp2"])
def test_recipe_runs_under_the_advertised_layouts(tmp_path, tiny_model, layout):
    stdout = run_command_line(tmp_path, tiny_model, *layout)
    before, after = (float(x)
                     for x in stdout.strip().splitlines()[-1].removeprefix("held-out perplexity ").split(" -> "))
    assert after < before
    assert (tmp_path / "run" / "hf_model" / "config.json").is_file()
