"""``fsdp_settings`` (lightning_mp.config.FSDPSettings): checked before any process exists, applied to every
FSDP unit as configured (one rank, in process), and a 2-rank job with every non-default setting matching the
single-process run. What each setting costs or saves is measured by benchmarks/fsdp_settings.py."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from helpers.launch import ROOT
from lightning_mp import FSDPSettings, ModelParallelStrategy
from lightning_mp._compat import fsdp_unit_settings
from lightning_mp.parallel.fsdp import apply_fsdp, mixed_precision_policy


@pytest.mark.parametrize("settings, message", [
    ({"forward_prefech": 1}, "unknown setting(s) forward_prefech; valid: reshard_after_forward, forward_prefetch"),
    ({"reshard_after_forward": True}, "reshard_after_forward=True is not one of 'except_last', 'all', 'none'"),
    ({"backward_prefetch": -1}, "backward_prefetch must be an int >= 0"),
    ({"reduce_dtype": "fp32"}, "reduce_dtype='fp32' is not one of None (follow the precision), 'float32'"),
])
def test_bad_settings_fail_in_the_constructor(settings, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ModelParallelStrategy(data_parallel_size=2, fsdp_settings=settings)
    with pytest.raises(ValueError, match=r"fsdp_settings \{'forward_prefetch': 1\} apply to FSDP2, which"
                                         r" data_parallel_mode='replicated' does not use"):
        ModelParallelStrategy(data_parallel_mode="replicated", fsdp_settings={"forward_prefetch": 1})


def test_recipe_defaults_are_the_strategy_defaults_and_overrides_reach_it():
    from omegaconf import OmegaConf

    from lightning_mp.tasks.common import parallel_kwargs

    parallel = OmegaConf.load(ROOT / "conf" / "parallel" / "default.yaml")
    assert FSDPSettings.of(parallel_kwargs(OmegaConf.create({"parallel": parallel}))["fsdp_settings"]) == FSDPSettings()
    parallel.fsdp.backward_prefetch = 2  # parallel.fsdp.backward_prefetch=2 on the command line
    strategy = ModelParallelStrategy(**parallel_kwargs(OmegaConf.create({"parallel": parallel})))
    assert strategy.parallel_config.fsdp_settings == FSDPSettings(backward_prefetch=2)


def test_reduce_dtype_follows_the_precision_unless_set():
    assert mixed_precision_policy("bf16-mixed").reduce_dtype == torch.float32
    assert mixed_precision_policy("bf16-true").reduce_dtype is None  # the parameters' own dtype
    policy = mixed_precision_policy("bf16-mixed", "bfloat16")
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.bfloat16)
    policy = mixed_precision_policy("32-true", "bfloat16")
    assert (policy.param_dtype, policy.reduce_dtype) == (None, torch.bfloat16)


class Blocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.fixture
def one_rank_mesh(in_process_run):
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    return init_device_mesh("cpu", (1,))


@pytest.mark.parametrize("settings, gathered, forward, backward", [
    (FSDPSettings(), [3], [[], [], [], []], [[], [], [], []]),
    (FSDPSettings(reshard_after_forward="all"), [], [[], [], [], []], [[], [], [], []]),
    # Depth 2: every block gathers the next two ahead; the last one has nobody left (FSDP2's implicit order).
    (FSDPSettings(reshard_after_forward="none", forward_prefetch=2, backward_prefetch=1, reduce_dtype="bfloat16"),
     [0, 1, 2, 3], [[1, 2], [2, 3], [3], []], [[], [0], [1], [2]]),
    (FSDPSettings(forward_prefetch=1, backward_prefetch=2), [3], [[1], [2], [3], []], [[], [0], [1, 0], [2, 1]]),
])
def test_units_are_configured_as_set(one_rank_mesh, settings, gathered, forward, backward):
    root = nn.Module()
    root.model = Blocks()
    blocks = list(root.model.layers)
    apply_fsdp(root, root.model, blocks, one_rank_mesh, mixed_precision_policy("32-true", settings.reduce_dtype),
               settings)
    configured = [fsdp_unit_settings(block) for block in blocks]
    assert [[blocks.index(m) for m in c["forward_prefetch"]] for c in configured] == forward
    assert [[blocks.index(m) for m in c["backward_prefetch"]] for c in configured] == backward
    assert {c["reduce_dtype"] for c in configured} == {getattr(torch, settings.reduce_dtype or "", None)}
    root.model(torch.randn(2, 8))
    # After forward, a resharded block holds DTensor shards again; one kept gathered holds plain tensors.
    assert [i for i, block in enumerate(blocks) if not isinstance(block.weight, DTensor)] == gathered
