"""Each rank holds only its shard of parameters and optimizer state."""

from __future__ import annotations

import pytest
from transformers import BertForTokenClassification

from helpers.launch import run_worker
from helpers.tiny_bert import tiny_config

_SPLIT_BY_TENSOR_PARALLEL = ("query", "key", "value", "attention.output.dense", "intermediate.dense",
                             "layer.0.output.dense", "layer.1.output.dense")


def _expected_bytes(data: int, tensor: int) -> float:
    model = BertForTokenClassification(tiny_config())
    total = 0.0
    for name, param in model.named_parameters():
        split = data * (tensor if any(key in name for key in _SPLIT_BY_TENSOR_PARALLEL) else 1)
        total += param.numel() * 4 / split
    return total


@pytest.mark.parametrize("data,tensor", [(4, 1), (2, 2)])
def test_bytes_per_rank_follow_the_sharding_degree(data, tensor, tmp_path):
    result = run_worker(tmp_path, devices=4, layout={"data_parallel_size": data, "tensor_parallel_size": tensor},
                        extra=("--steps", "1"))
    expected = _expected_bytes(data, tensor)
    unsharded = _expected_bytes(1, 1)
    for rank_bytes in result["bytes_per_rank"]:
        # FSDP pads each parameter to a multiple of the shard count: allow a few percent.
        assert rank_bytes["parameters"] == pytest.approx(expected, rel=0.05)
        assert rank_bytes["optimizer"] == pytest.approx(2 * expected, rel=0.05)  # AdamW: exp_avg + exp_avg_sq
        assert rank_bytes["parameters"] < unsharded / 3
