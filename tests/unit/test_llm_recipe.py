"""The causal-LM recipe's checks in one process: bad overrides fail before anything loads, and the module loads a
model directory through lightning_mp.from_pretrained (the recipe run end to end: ``tests/e2e/test_llm_recipe.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers.launch import ROOT
from helpers.llm_tiny import recipe_llama_dir
from helpers.recipes import compose_config
from lightning_mp.tasks.llm.recipe import check_config


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return recipe_llama_dir(tmp_path_factory.mktemp("tiny-llama"))


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
        check_config(compose_config("sft_llm", overrides), ROOT)
