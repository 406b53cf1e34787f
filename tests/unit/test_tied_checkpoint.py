"""Tied weights in checkpoints, in one process: checkpoints written before tied weights were stored once
still load, and the causal-LM recipe's module loads one without the copy strictly (the launches that write
and resume them in other layouts: ``tests/distributed/test_tied_checkpoint.py``)."""

from __future__ import annotations

import pytest
import torch

EMBEDDING, HEAD = "model.model.embed_tokens.weight", "model.lm_head.weight"  # in the LightningModule


@pytest.mark.parametrize("form", ["sharded", "full"])
def test_checkpoints_with_both_names_still_load(tmp_path, form):
    """Written before tied weights were stored once: the copy's entry is accepted (strict) and not read."""
    from workers.tied_checkpoint import TiedLlama

    from lightning_mp.checkpoint.io import MODEL_KEY, save_full, save_sharded
    from lightning_mp.checkpoint.state import load_into
    from lightning_mp.checkpoint.tied import tied_names

    saved = TiedLlama()
    with torch.no_grad():
        saved.model.lm_head.weight.add_(1.0)  # one tensor under both names: the embedding moves too
    state = {MODEL_KEY: {k: v.clone() for k, v in saved.state_dict().items()}}
    assert HEAD in state[MODEL_KEY] and EMBEDDING in state[MODEL_KEY]
    path = tmp_path / form
    save_sharded(state, path, True, lambda: None) if form == "sharded" else save_full(state, path)
    module = TiedLlama()
    load_into(path, module, [], strict=True, tied=tied_names(module))
    assert module.model.lm_head.weight is module.model.model.embed_tokens.weight
    assert module.model.lm_head.weight.equal(saved.model.lm_head.weight)


def test_the_llm_recipe_module_loads_a_checkpoint_without_the_copy_strictly():
    """What CausalLM.load_from_checkpoint does (the generation script): on_load_checkpoint, then a strict load."""
    from helpers import tiny_hf
    from lightning_mp.tasks.llm.module import CausalLM

    config = tiny_hf.tiny_config("llama", tie_word_embeddings=True).to_dict()
    saved = CausalLM(config)
    checkpoint = {"state_dict": {k: v for k, v in saved.state_dict().items() if k != HEAD}}
    module = CausalLM(config)
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"])
    assert module.model.lm_head.weight is module.model.model.embed_tokens.weight
    assert module.model.lm_head.weight.equal(saved.model.lm_head.weight)
