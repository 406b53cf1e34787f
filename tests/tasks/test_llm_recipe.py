"""The causal-LM recipe end to end on a tiny random Llama: compose API in-process (one device), then the
real command line under the layouts the README advertises, and generation from what it wrote."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import clean_env
from hydra import compose, initialize_config_dir
from llm_tiny import tiny_llama_dir

from lightning_mp.tasks.llm.recipe import check_config, run_sft

ROOT = Path(__file__).resolve().parents[2]
# 48 training conversations, 3 steps of 16, short replies, one held-out pass of 2 batches.
SMALL = ["trainer.limit_train_batches=3", "data.max_train_examples=48", "trainer.batch_size=16", "data.max_length=64",
         "trainer.limit_val_batches=2", "trainer.learning_rate=3e-3", "trainer.log_every_n_steps=1",
         "generation.max_new_tokens=4", "generation.prompts=[Hello]"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    # Tied word embeddings, as SmolLM2's: loaded through lightning_mp.from_pretrained (tied on meta, retied
    # after materializing; under a pipeline one copy per end stage).
    return tiny_llama_dir(tmp_path_factory.mktemp("tiny-llama"), heads=6, kv_heads=3, tied=True)


def compose_config(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("sft_llm", overrides=overrides)


def test_recipe_evaluates_trains_exports_and_answers(tmp_path, tiny_model, in_process_run):
    cfg = compose_config([*SMALL, f"model.name_or_path={tiny_model}"])
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
        answered = subprocess.run([sys.executable, str(ROOT / "recipes" / "llm_generate.py"), str(source), "Hello",
                                   "--max-new-tokens", "4", *(["--tokenizer", str(tiny_model)] if source == best else [])],
                                  capture_output=True, text=True, timeout=300, env=clean_env())
        assert answered.returncode == 0, answered.stderr[-3000:]
        assert answered.stdout.startswith(f"Hello\n  -> {generations['answers'][0]['after']}".rstrip())


def test_module_loads_a_directory_through_lightning_mp_from_pretrained(tmp_path, tiny_model):
    """Built on meta (the strategy loads each rank's shards); load_from_checkpoint materializes it first, so the
    checkpoint's trained weights land in real tensors, and the tied embedding stays one parameter."""
    import lightning
    import torch
    from safetensors.torch import load_file

    from lightning_mp.checkpoint.pretrained import is_meta, materialize
    from lightning_mp.tasks.llm.module import CausalLM

    module = CausalLM(tiny_model)
    assert is_meta(module.model) and module.model.training
    materialize(module.model)
    stored = load_file(tiny_model / "model.safetensors")
    assert "lm_head.weight" not in stored
    assert torch.equal(module.model.lm_head.weight, stored["model.embed_tokens.weight"])
    with torch.no_grad():
        module.model.model.embed_tokens.weight.add_(1.0)  # as if trained
    path = tmp_path / "module.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": lightning.__version__}, path)
    loaded = CausalLM.load_from_checkpoint(path).model
    assert not is_meta(loaded) and loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, module.model.lm_head.weight)


@pytest.mark.parametrize("overrides,message", [
    (["model=bert-base"], "model=bert-base is not a causal LM"),
    (["data=wnut16"], "data=wnut16 is not chat data"),
    (["model=llama3-8b", "trainer.devices=3", "parallel.tensor=3"], "tensor_parallel_size=3 does not divide"),
    (["trainer.devices=2", "trainer.batch_size=15"], "trainer.batch_size=15 is not divisible by the 2 data-parallel"),
])
def test_bad_overrides_fail_before_anything_loads(overrides, message):
    with pytest.raises(ValueError, match=message):
        check_config(compose_config(overrides), ROOT)


def run_command_line(tmp_path: Path, model: Path, *overrides: str) -> str:
    cmd = [sys.executable, str(ROOT / "recipes" / "sft_llm.py"), *SMALL, f"model.name_or_path={model}",
           "generation.enabled=false", f"hydra.run.dir={tmp_path / 'run'}", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=900, env=clean_env())
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("layout", [
    ["trainer.devices=3", "parallel.tensor=3"],  # 6 heads / 3 KV heads
    ["trainer.devices=2", "parallel.pipeline=2"],
    ["trainer.devices=4", "parallel.pipeline=2"],  # pipeline × data: each rank's batch has its own width
], ids=["tp3", "pp2", "pp2xdp2"])
def test_recipe_runs_under_the_advertised_layouts(tmp_path, tiny_model, layout):
    stdout = run_command_line(tmp_path, tiny_model, *layout)
    before, after = (float(x) for x in stdout.strip().splitlines()[-1].removeprefix("held-out perplexity ").split(" -> "))
    assert after < before
    assert (tmp_path / "run" / "hf_model" / "config.json").is_file()
