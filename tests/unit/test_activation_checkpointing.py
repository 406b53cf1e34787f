"""Activation checkpointing modes on one process: the same gradients as no checkpointing; "full"
recomputes every block's matmuls in backward, "selective" none of them (only element-wise ops)."""

from __future__ import annotations

import copy

import pytest
import torch

from helpers import tiny_hf
from helpers.ops import MATMULS, backward_ops
from lightning_mp.config import ParallelConfig
from lightning_mp.parallel.activation_checkpointing import apply_activation_checkpointing
from lightning_mp.plans import find_plan


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_selective_checkpointing_keeps_matmuls_and_recomputes_element_wise_ops(family):
    torch.manual_seed(0)
    reference = tiny_hf.tiny_model(family, layers=2)
    batch = tiny_hf.collate([tiny_hf.PaddedTokens(tiny_hf.FAMILIES[family][1], size=4)[i] for i in range(4)])
    runs = {}
    for mode in (None, "full", "selective"):
        model = copy.deepcopy(reference).train()
        if mode is not None:
            # As the strategy applies it: the blocks, and the module that calls them (which must not hand them a
            # KV cache: the decoders' config has use_cache=True, and a replayed block would write it twice).
            _, hf, plan = find_plan(model)
            owner = hf.get_submodule(plan.blocks.rpartition(".")[0])
            apply_activation_checkpointing(list(hf.get_submodule(plan.blocks)), mode, owner)
        runs[mode] = backward_ops(model, batch)
    plain_ops, plain_grads = runs[None]
    for mode in ("full", "selective"):
        ops, grads = runs[mode]
        assert grads.keys() == plain_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, plain_grads[name], rtol=0, atol=1e-6, msg=f"{mode}: {name}")
    # full: every block's forward matmuls run again in backward; selective: none of them.
    assert runs["full"][0].total(MATMULS) > plain_ops.total(MATMULS)
    assert runs["selective"][0].total(MATMULS) == plain_ops.total(MATMULS)
    # selective still recomputes something (the element-wise ops), and less than full does.
    assert plain_ops.total() < runs["selective"][0].total() < runs["full"][0].total()


def test_unknown_checkpointing_mode_is_rejected_with_the_choices():
    with pytest.raises(ValueError, match=r"activation_checkpointing='partial' is not one of False, True \(= 'full'\),"
                                         r" 'full', 'selective'"):
        ParallelConfig(activation_checkpointing="partial")
