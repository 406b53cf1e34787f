"""Rank r of a large world in one process: torch's fake process group (every collective a no-op) lets the real
mesh, plans, pipeline split and FSDP wrapping run for any rank of any layout without launching it. What is
checked here needs no numbers from peers (placements, shapes, which stage owns what); numbers are checked by
the parity tests in tests/distributed/."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard
from transformers import AutoConfig, AutoModelForCausalLM

from helpers import tiny_hf
from lightning_mp._compat import fake_process_group_store
from lightning_mp.config import ParallelConfig
from lightning_mp.mesh import build_device_mesh
from lightning_mp.parallel.apply import parallelize, resolve_plan

COLWISE = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROWWISE = ("o_proj", "down_proj")


@pytest.fixture
def fake_world():
    """``start(rank, world_size)`` makes this process that rank of a fake world; destroyed afterwards."""
    def start(rank: int, world_size: int) -> None:
        dist.init_process_group("fake", store=fake_process_group_store(), rank=rank, world_size=world_size)

    yield start
    if dist.is_initialized():
        dist.destroy_process_group()


def llama_module(layers: int) -> torch.nn.Module:
    """A LightningModule holding a tiny Llama that tensor parallelism of 4 divides (8 heads, 4 KV heads)."""
    module = tiny_hf.TinyHFModule("llama", layers=layers)
    config = AutoConfig.for_model("llama", vocab_size=128, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4)
    module.model = AutoModelForCausalLM.from_config(config)
    return module


def build_rank(module: torch.nn.Module, rank: int, world_size: int, **layout) -> tuple[dict, dict]:
    """Parallelize ``module`` as ``rank`` would; the parameters it holds and its mesh coordinates."""
    config = ParallelConfig(**layout)
    shape = config.resolve(world_size)
    mesh, _ = build_device_mesh(shape, torch.device("cpu"))
    planned = resolve_plan(module, None, shape, config)
    parallelize(module, planned, mesh, shape.data_replicate * shape.data_shard, config, "32-true", torch.device("cpu"))
    coordinates = dict(zip(mesh.mesh_dim_names, mesh.get_coordinate()))
    return dict(module.named_parameters()), coordinates


@pytest.mark.parametrize("world_size,rank,layout", [
    (8, 0, {"data_parallel_size": 2, "tensor_parallel_size": 2, "pipeline_parallel_size": 2}),
    (8, 7, {"data_parallel_size": 2, "tensor_parallel_size": 2, "pipeline_parallel_size": 2}),
    (64, 37, {"data_parallel_size": 4, "tensor_parallel_size": 4, "pipeline_parallel_size": 4}),
    (64, 63, {"data_parallel_size": 4, "tensor_parallel_size": 4, "pipeline_parallel_size": 4}),
], ids=["8-first", "8-last", "64-middle", "64-last"])
def test_one_rank_of_a_3d_layout_holds_its_stage_sharded_by_the_plan(fake_world, world_size, rank, layout):
    layers = 8
    full = {name: tuple(p.shape) for name, p in llama_module(layers).named_parameters()}
    fake_world(rank, world_size)
    held, at = build_rank(llama_module(layers), rank, world_size, **layout)
    tp, dp, pp = layout["tensor_parallel_size"], layout["data_parallel_size"], layout["pipeline_parallel_size"]
    stage = at["pipeline_parallel"]

    # The stage: its share of the blocks under their unsplit names, embeddings first, norm and head last.
    blocks = sorted({int(name.split(".")[3]) for name in held if ".layers." in name})
    assert len(blocks) == layers // pp, blocks
    assert ("model.model.embed_tokens.weight" in held) == (stage == 0)
    assert ("model.lm_head.weight" in held) == (stage == pp - 1)
    assert ("model.model.norm.weight" in held) == (stage == pp - 1)
    assert set(held) <= set(full)

    for name, parameter in held.items():
        assert isinstance(parameter, DTensor), f"{name} is not sharded"
        placements = dict(zip(parameter.device_mesh.mesh_dim_names, parameter.placements))
        assert parameter.shape == full[name], name  # the global shape is the unsplit model's
        fsdp = placements["data_parallel_shard"]
        # (strided where tensor parallelism shards the same dimension first)
        assert getattr(fsdp, "dim", None) == 0, f"{name}: FSDP shards dim 0 over data ranks, got {fsdp}"
        tensor = placements.get("tensor_parallel", Replicate())  # not tensor-parallel: on the data mesh alone
        if name.endswith(tuple(f"{linear}.weight" for linear in COLWISE)):
            assert tensor == Shard(0), f"{name}: colwise, got {tensor}"
        elif name.endswith(tuple(f"{linear}.weight" for linear in ROWWISE)):
            assert tensor == Shard(1), f"{name}: rowwise, got {tensor}"
        elif "norm" in name:
            assert tensor == Replicate(), f"{name}: {tensor}"
        rows, columns = (full[name] + (1,))[:2]
        local_rows, local_columns = (tuple(parameter.to_local().shape) + (1,))[:2]
        tensor_rows = rows // tp if tensor == Shard(0) else rows
        # FSDP pads the last shard: a rank holds ceil(rows / dp) rows or fewer.
        assert local_rows <= -(-tensor_rows // dp), f"{name}: {local_rows} rows of {rows}"
        assert local_columns == (columns // tp if tensor == Shard(1) else columns), name


@pytest.mark.parametrize("world_size,layout", [
    (2, {"tensor_parallel_size": 2}),
    (4, {"tensor_parallel_size": 2, "data_parallel_size": 2}),
], ids=["tp2", "dp2xtp2"])
@pytest.mark.parametrize("form", ["dict", "ModelPlan"])
def test_a_plan_given_to_the_strategy_splits_the_users_model(fake_world, world_size, layout, form):
    """A plan passed as ``ModelParallelStrategy(plan=...)`` is relative to the LightningModule; it once reached no
    module at all (the module itself was skipped as "not a model"), and every rank trained a full replica."""
    from helpers.plain_gpt import TENSOR_PLAN, GPTModule
    from lightning_mp.plans import ModelPlan, as_model_plan

    # What ModelParallelStrategy(plan=...) makes of either form.
    given = TENSOR_PLAN if form == "dict" else ModelPlan(tensor_parallel=TENSOR_PLAN, blocks="model.blocks")
    plan = as_model_plan(given)
    full = {name: tuple(p.shape) for name, p in GPTModule().named_parameters()}
    fake_world(world_size - 1, world_size)
    config = ParallelConfig(**layout)
    shape = config.resolve(world_size)
    mesh, _ = build_device_mesh(shape, torch.device("cpu"))
    module = GPTModule()
    parallelize(module, resolve_plan(module, plan, shape, config), mesh, shape.data_shard, config, "32-true",
                torch.device("cpu"))
    held = dict(module.named_parameters())
    assert set(held) == set(full)
    for name, style in (("q.weight", Shard(0)), ("v.weight", Shard(0)), ("proj.weight", Shard(1)),
                        ("up.weight", Shard(0)), ("down.weight", Shard(1))):
        parameter = held[f"model.blocks.1.{name}"]
        assert isinstance(parameter, DTensor), f"{name} was not split"
        placements = dict(zip(parameter.device_mesh.mesh_dim_names, parameter.placements))
        assert placements["tensor_parallel"] == style, (name, placements)
        local = list(full[f"model.blocks.1.{name}"])
        local[style.dim] //= 2  # half of each split weight per tensor rank
        if "data_parallel_shard" in placements:
            local[0] = -(-local[0] // 2)  # FSDP: at most half the rows per data rank
        assert list(parameter.to_local().shape) <= local and parameter.to_local().shape[1] == local[1], name
    assert not isinstance(module, type(module.model)), "the LightningModule keeps its class"
