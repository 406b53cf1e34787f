"""The planner: exact state bytes, the strategy's own pipeline split, choices that fit, and its memory
model checked against real jobs (benchmarks/planner_memory.py) on CPU ranks."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForTokenClassification

from helpers.launch import ROOT
from lightning_mp.config import ParallelConfig
from lightning_mp.pipeline.split import plan_split
from lightning_mp.planner import Cluster, Layout, ModelShape, choose, chunk_size, stage_parts, state_bytes
from lightning_mp.plans import find_plan

LARGE = ModelShape(layers=24, hidden=1024, heads=16, intermediate=4096)


TEN_B = ModelShape(layers=48, hidden=4096, heads=32, intermediate=16384)


def test_chunk_sizes_are_torch_chunk_sizes():
    for n in (0, 1, 5, 9, 30522, 64):
        for parts in (1, 2, 3, 4, 8):
            expected = [len(c) for c in torch.arange(n).chunk(parts)] if n else []
            expected += [0] * (parts - len(expected))
            assert [chunk_size(n, parts, i) for i in range(parts)] == expected, (n, parts)


def test_parameter_count_is_the_hf_models():
    config = BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64, num_labels=7)
    model = BertForTokenClassification(config)
    shape = ModelShape.from_config(config)
    assert shape.parameters() == sum(p.numel() for p in model.parameters())
    (single,) = state_bytes(shape, Layout(1, 1, 1))
    assert single == {"parameters": 4 * shape.parameters(), "gradients": 4 * shape.parameters(),
                      "optimizer": 8 * shape.parameters()}
    # Sharding loses nothing and duplicates nothing: over the 6 ranks of dp=3 × tp=2, every tensor is
    # present once per tensor rank if tensor parallelism replicates it, else once.
    tensors = shape.embedding_tensors() + shape.head_tensors() + shape.layer_tensors() * config.num_hidden_layers
    expected = sum(torch.Size(s).numel() * (2 if style == "replicated" else 1) for s, style in tensors)
    ranks = state_bytes(shape, Layout(3, 2, 1))
    assert len(ranks) == 6 and sum(r["parameters"] for r in ranks) == 4 * expected


def test_pipeline_split_is_the_strategys():
    config = BertConfig(vocab_size=5000, hidden_size=64, num_hidden_layers=8, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64, num_labels=7)
    _, model, plan = find_plan(BertForTokenClassification(config))
    shape = ModelShape.from_config(config)
    for stages in (2, 4):
        points = plan_split(model, plan, stages)
        bounds = [*points, 8]
        expected = [bounds[i + 1] - bounds[i] for i in range(stages)]
        assert [p["layers"] for p in stage_parts(shape, Layout(1, 1, stages, schedule="1f1b"))] == expected


def test_choices_fit_and_keep_tensor_parallelism_inside_a_node():
    best, ranked = choose(LARGE, Cluster(devices_per_node=8, num_nodes=16), global_batch=256, seq=512)
    assert best.rejected is None and best.memory.total < 80 * 2**30 * 0.9
    assert all(c.layout.tensor <= 8 for c in ranked if c.rejected is None)
    crossing = [c for c in ranked if c.layout.tensor == 16]
    assert crossing and all("would cross nodes" in c.rejected for c in crossing)
    ParallelConfig(**best.layout.strategy_kwargs()).resolve(128, 8)  # a layout the strategy accepts

    best_10b, ranked_10b = choose(TEN_B, Cluster(devices_per_node=8, num_nodes=1), global_batch=64, seq=512)
    assert best_10b.memory.total < 80 * 2**30 * 0.9
    too_big = [c for c in ranked_10b if c.rejected and "GiB per device" in c.rejected]
    assert too_big, "some 10B layouts on 8 GPUs must be rejected for memory"


def test_nothing_fits_says_why():
    with pytest.raises(ValueError, match=r"no layout of 2 devices fits this model:"
                                         r" .*GiB per device, more than 90% of 16 GB"):
        choose(TEN_B, Cluster(devices_per_node=2, num_nodes=1, device_memory_gb=16), global_batch=8, seq=512)


def test_strategy_auto_layout_is_chosen_from_the_model_before_launch():
    import lightning as L

    from helpers.tiny_bert import TinyBertModule
    from lightning_mp import ModelParallelStrategy

    with pytest.raises(ValueError, match="layout='auto' needs global_batch_size"):
        ModelParallelStrategy(layout="auto", sequence_length=12)
    with pytest.raises(ValueError, match="layout='fast': use 'manual'"):
        ModelParallelStrategy(layout="fast")
    strategy = ModelParallelStrategy(layout="auto", global_batch_size=16, sequence_length=12, device_memory_gb=16)
    L.Trainer(accelerator="cpu", devices=4, strategy=strategy, logger=False)  # no model yet: nothing decided
    with pytest.raises(RuntimeError, match="decided when the model is connected"):
        _ = strategy.mesh_shape
    strategy.check_model(TinyBertModule(layers=4))  # what the launcher does before starting any process
    shape = strategy.mesh_shape
    assert shape.world_size == 4 and shape.tensor in (1, 2, 4)
    assert strategy.parallel_config.tensor_parallel_size == shape.tensor


def test_recipe_parallel_auto_gives_a_valid_layout(capsys):
    from hydra import compose, initialize_config_dir

    from lightning_mp.tasks.ner.recipe import check_config, parallel_config

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("ner_bert", overrides=["parallel=auto", "trainer.devices=4", "model=bert-tiny"])
    check_config(cfg)
    assert "parallel=auto: dp=" in capsys.readouterr().out
    assert parallel_config(cfg).resolve(4, 4).world_size == 4
