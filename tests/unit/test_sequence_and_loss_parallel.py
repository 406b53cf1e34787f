"""Sequence parallelism and loss parallelism give the single-process losses and weights (3 SGD steps,
fp32, right-padded rows of different lengths) while each rank holds only its share of the sequence
between tensor-parallel regions (block outputs ``Shard(1)``; under a pipeline, what the stages send) and
of the logits (``Shard(2)``); what cannot work is refused before launch."""

from __future__ import annotations

import lightning as L
import pytest

from helpers import tiny_hf
from lightning_mp import ModelParallelStrategy


def fit(devices: int, module: L.LightningModule, **strategy_kwargs) -> None:
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=ModelParallelStrategy(**strategy_kwargs),
                        logger=False, enable_checkpointing=False, max_steps=1)
    trainer.fit(module, tiny_hf.loader("llama", 4))


def test_loss_parallel_with_tied_embeddings_is_refused_before_launch(no_child_processes):
    module = tiny_hf.TinyHFModule("llama", layers=2, tie_word_embeddings=True)
    with pytest.raises(ValueError, match="loss_parallel=True needs a column-sharded output head, but"
                                         " LlamaForCausalLM has none: its output head is replicated"):
        fit(2, module, tensor_parallel_size=2, loss_parallel=True)


def test_sequence_parallel_without_a_plan_for_it_is_refused_before_launch(no_child_processes):
    module = tiny_hf.TinyHFModule("llama", layers=2)
    module.model = module.model.model  # a bare LlamaModel would hand back sequence-sharded hidden states
    with pytest.raises(ValueError, match="sequence_parallel=True, but LlamaModel has no sequence-parallel plan"):
        fit(2, module, tensor_parallel_size=2, sequence_parallel=True)
