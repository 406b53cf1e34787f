"""Bad layouts fail with the numbers in the message, before any process or process group exists."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

from helpers.tiny_bert import TinyBertModule
from lightning_mp import ModelParallelStrategy, ParallelConfig

pytestmark = pytest.mark.usefixtures("no_child_processes")  # tests/conftest.py


def trainer(devices: int, **strategy_kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=devices, strategy=ModelParallelStrategy(**strategy_kwargs),
                     logger=False, enable_checkpointing=False, max_steps=1)


def test_degrees_must_multiply_to_world_size():
    with pytest.raises(ValueError) as error:
        trainer(4, data_parallel_size=3, tensor_parallel_size=2)
    message = str(error.value)
    assert "data_parallel_size (3) × tensor_parallel_size (2) × pipeline_parallel_size (1) = 6" in message
    assert "world size is 4" in message
    assert "(data=2, tensor=2, pipeline=1)" in message  # a valid suggestion


def test_auto_data_parallel_needs_a_divisor():
    with pytest.raises(ValueError, match=r"tensor_parallel_size \(3\) × pipeline_parallel_size \(1\) = 3"
                                         r" does not divide the world size 4"):
        trainer(4, tensor_parallel_size=3)


def test_hybrid_needs_a_dividing_replicate_size():
    with pytest.raises(ValueError, match=r"data_parallel_replicate_size=3 does not divide data_parallel_size=4;"
                                         r" valid values: \[1, 2, 4\]"):
        trainer(4, data_parallel_mode="hybrid", data_parallel_replicate_size=3)
    with pytest.raises(ValueError, match="needs data_parallel_replicate_size"):
        trainer(4, data_parallel_mode="hybrid")


def test_tensor_parallel_must_divide_heads_before_launch():
    strategy_trainer = trainer(3, tensor_parallel_size=3)
    with pytest.raises(ValueError) as error:
        strategy_trainer.fit(TinyBertModule())
    assert "tensor_parallel_size=3 does not divide num_attention_heads=4" in str(error.value)
    assert "valid tensor_parallel_size values for this model: 1, 2, 4" in str(error.value)


class PlainMLP(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))


def test_model_without_plan_says_how_to_supply_one():
    with pytest.raises(ValueError) as error:
        trainer(2, tensor_parallel_size=2).fit(PlainMLP())
    message = str(error.value)
    assert "no tensor-parallel plan is known" in message and "PlainMLP" in message
    assert "plan=" in message and "register_plan" in message and "configure_model" in message


def test_unknown_precision_lists_valid_ones():
    with pytest.raises(ValueError, match=r"precision='64-true'.*32-true, bf16-mixed, bf16-true"):
        L.Trainer(accelerator="cpu", devices=2, precision="64-true", strategy=ModelParallelStrategy())


@pytest.mark.parametrize("kwargs,pattern", [
    ({"data_parallel_mode": "zero3"}, "data_parallel_mode='zero3' is not one of fully_sharded, hybrid, replicated"),
    ({"pipeline_schedule": "pipedream"}, "valid schedules: gpipe, 1f1b, interleaved_1f1b"),
    ({"tensor_parallel_size": 0}, "tensor_parallel_size must be a positive int or 'auto', got 0"),
    ({"data_parallel_replicate_size": 2}, "only applies to data_parallel_mode='hybrid'"),
])
def test_config_errors(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        ParallelConfig(**kwargs)


def test_plan_glob_matching_nothing_is_an_error():
    from lightning_mp.parallel.tensor import expand_globs

    with pytest.raises(ValueError, match=r"'net\.\*\.weights' matches no module"):
        expand_globs(PlainMLP(), {"net.*.weights": "colwise"})
    resolved = expand_globs(PlainMLP(), {"net.*": "colwise"})
    assert sorted(resolved) == ["net.0", "net.1", "net.2"]


def test_bert_plan_covers_every_layer():
    from lightning_mp.plans import find_plan

    path, model, plan = find_plan(TinyBertModule())
    assert path == "model" and plan.blocks == "bert.encoder.layer"
    from lightning_mp.parallel.tensor import expand_globs

    resolved = expand_globs(model, plan.tensor_parallel)
    assert len(resolved) == 6 * 2  # six linears in each of two layers
    assert plan.divisible_sizes == {"num_attention_heads": 4, "intermediate_size": 64}


# ---------------------------------------------------------------- pipeline parallelism
def test_more_pipeline_stages_than_blocks_before_launch():
    with pytest.raises(ValueError, match=r"pipeline_parallel_size=2 with schedule 'interleaved_1f1b': 4 pipeline stages"
                                         r" need at least 4 blocks \(one each\), but the model has 2; use at most 1"
                                         r" pipeline ranks \(2 stages per rank\)"):
        trainer(2, pipeline_parallel_size=2, pipeline_schedule="interleaved_1f1b", microbatches=4).fit(TinyBertModule())


def test_too_few_microbatches_before_launch():
    with pytest.raises(ValueError, match=r"microbatches=2 is fewer than pipeline_parallel_size=4; schedule '1f1b'"
                                         r" needs at least 4 microbatches"):
        trainer(4, pipeline_parallel_size=4, microbatches=2).fit(TinyBertModule(layers=4))


def test_model_without_pipeline_plan_before_launch():
    with pytest.raises(ValueError, match=r"pipeline_parallel_size=2, but no plan is known for the models"
                                         r" inside PlainMLP"
                                         r".*register_plan"):
        trainer(2, pipeline_parallel_size=2).fit(PlainMLP())


class MaskedLMModule(L.LightningModule):
    def __init__(self):
        super().__init__()
        from transformers import BertForMaskedLM

        from helpers.tiny_bert import tiny_config

        self.model = BertForMaskedLM(tiny_config(layers=4))  # decoder tied to the word embedding


def test_model_whose_plan_cannot_be_split_before_launch():
    with pytest.raises(ValueError, match=r"the plan for BertForMaskedLM describes no pipeline split"):
        trainer(2, pipeline_parallel_size=2).fit(MaskedLMModule())


class ExtraHead(TinyBertModule):
    def __init__(self):
        super().__init__(layers=4)
        self.extra = nn.Linear(4, 4)


def test_parameters_outside_the_pipelined_model_before_launch():
    with pytest.raises(ValueError, match=r"parameters extra.weight, extra.bias of ExtraHead lie outside the pipelined"
                                         r" model 'model'"):
        trainer(2, pipeline_parallel_size=2).fit(ExtraHead())


def test_pinned_split_points_checked_before_launch():
    with pytest.raises(ValueError, match=r"split_points=\[0, 4\] must be strictly increasing and below the number of"
                                         r" blocks \(4\)"):
        trainer(2, pipeline_parallel_size=2, pipeline_split_points=[0, 4]).fit(TinyBertModule(layers=4))


def test_fp16_mixed_with_a_pipeline_is_rejected():
    # On CPU the Trainer turns 16-mixed into bf16-mixed, so the plugin a GPU run gets is set by hand.
    from lightning.pytorch.plugins.precision import MixedPrecision

    strategy = ModelParallelStrategy(pipeline_parallel_size=2)
    strategy.precision_plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(ValueError, match=r"precision='16-mixed'.*use 'bf16-mixed', 'bf16-true' or '32-true'"):
        strategy._validate_precision()
