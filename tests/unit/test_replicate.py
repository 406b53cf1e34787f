"""The replicated data-parallel mode's gradient buckets, in one process (a gloo group of one rank):
bucket assignment, all-reduces launched during backward in bucket order, gradients written back at the
end of backward. Averages over real ranks are checked by the parity tests (tests/distributed/test_parity.py,
tests/distributed/test_pipeline_parity.py)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lightning_mp.parallel.fsdp import is_parallelized
from lightning_mp.parallel.replicate import ReplicatedGradients, _assign_buckets, replicate


@pytest.fixture
def one_rank_group(in_process_run):
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    return dist.group.WORLD


def test_buckets_follow_reverse_registration_order_and_split_by_size_and_dtype():
    layers = [nn.Linear(256, 256) for _ in range(6)]  # 256 KiB weight, 1 KiB bias each
    layers[2].half()
    parameters = [p for layer in layers for p in layer.parameters()][::-1]
    buckets = _assign_buckets(parameters, first_bytes=2**20, later_bytes=3 * 2**20)
    # Reversed: layers 5, 4, 3 (771 KiB, under the first bucket's 1 MiB), then the fp16 layer 2 alone (a bucket
    # is flattened into one tensor: one dtype), then layers 1 and 0.
    assert [len(b.parameters) for b in buckets] == [6, 2, 4]
    assert [p for b in buckets for p in b.parameters] == parameters
    assert [{p.dtype for p in b.parameters} for b in buckets] == [{torch.float32}, {torch.float16}, {torch.float32}]
    # Without the dtype change: the first bucket closes once it reaches 1 MiB (4 layers), the next takes the rest.
    layers[2].float()
    assert [len(b.parameters) for b in _assign_buckets(parameters, 2**20, 3 * 2**20)] == [8, 4]


def test_averages_are_written_back_and_unused_parameters_keep_none(one_rank_group):
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(32, 32) for _ in range(4)], nn.Linear(32, 2))
    unused = nn.Linear(32, 32)
    root = nn.ModuleDict({"model": model, "unused": unused})
    reference = copy.deepcopy(model)
    reducer = replicate(root, one_rank_group)
    # One rank standing for two: the sum over "ranks" is this rank's gradient, so the average written back to
    # .grad is half of it (a missing write-back or division would leave it whole).
    reducer.world_size = 2
    inputs = torch.randn(8, 32)
    model(inputs).sum().backward()
    reference(inputs).sum().backward()
    for mine, theirs in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(mine.grad, theirs.grad / 2)
    # A second backward (gradient accumulation) reduces the accumulated .grad: (g/2 + g) / 2.
    model(inputs).sum().backward()
    for mine, theirs in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(mine.grad, theirs.grad * 0.75)
    assert unused.weight.grad is None and unused.bias.grad is None
    assert is_parallelized(root)  # a second setup (validate, then fit) must not replicate again


def test_full_buckets_are_launched_before_backward_ends(one_rank_group):
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(32, 32) for _ in range(4)])
    reducer = ReplicatedGradients(model.parameters(), one_rank_group, first_bucket_bytes=1, bucket_bytes=1)
    events = []
    launch, finish = reducer._launch, reducer._finish
    reducer._launch = lambda bucket: (events.append(reducer.buckets.index(bucket)), launch(bucket))[1]
    reducer._finish = lambda: (events.append("end of backward"), finish())[1]
    model(torch.randn(8, 32)).sum().backward()
    # Backward produces the last layer's gradients first: each bucket goes out as soon as it is full, in order,
    # and the end-of-backward callback finds nothing left to launch.
    assert events == [*range(8), "end of backward"]
