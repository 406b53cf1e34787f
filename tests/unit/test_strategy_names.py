"""The strategy by name: Lightning's registry after `import lightning_mp`, the presets, LightningCLI YAML
(2 ranks), and the checks that run under an external launcher (SLURM's numbers against the Trainer's)."""

from __future__ import annotations

import lightning as L
import pytest
from lightning.pytorch.strategies import StrategyRegistry

import lightning_mp
from lightning_mp.config import MeshShape, ParallelConfig

SLURM_TASK = {"SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "2", "SLURM_JOB_NAME": "train",
              "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
              "SLURM_NODELIST": "127.0.0.[1-2]"}


@pytest.mark.parametrize("name,devices,num_nodes,shape", [
    ("lightning_mp", 2, 1, MeshShape(pipeline=1, data_replicate=1, data_shard=2, tensor=1)),
    ("lightning_mp", 2, 2, MeshShape(pipeline=1, data_replicate=1, data_shard=4, tensor=1)),
    ("lightning_mp_hybrid", 2, 2, MeshShape(pipeline=1, data_replicate=2, data_shard=2, tensor=1)),
    ("lightning_mp_hybrid", 4, 3, MeshShape(pipeline=1, data_replicate=3, data_shard=4, tensor=1)),
    ("lightning_mp_tensor_parallel", 2, 2, MeshShape(pipeline=1, data_replicate=1, data_shard=2, tensor=2)),
])
def test_names_give_the_preset_layouts(name, devices, num_nodes, shape):
    assert name in StrategyRegistry
    trainer = L.Trainer(strategy=name, accelerator="cpu", devices=devices, num_nodes=num_nodes, logger=False)
    assert isinstance(trainer.strategy, lightning_mp.ModelParallelStrategy)
    assert trainer.strategy.mesh_shape == shape  # resolved in the constructor, nothing launched


def test_every_preset_is_registered_with_a_description():
    for name, (description, params) in lightning_mp.ModelParallelStrategy.PRESETS.items():
        entry = StrategyRegistry[name]
        assert entry["strategy"] is lightning_mp.ModelParallelStrategy and entry["init_params"] == params
        assert entry["description"] == description


def test_one_replica_per_node_needs_a_data_parallel_size_the_nodes_divide():
    config = ParallelConfig(data_parallel_mode="hybrid", data_parallel_replicate_size="auto", tensor_parallel_size=4)
    assert config.resolve(world_size=8, devices_per_node=4).data_replicate == 2
    with pytest.raises(ValueError, match=r"one replica on each of the 4 nodes, which needs data_parallel_size=2 to be"
                                         r" a multiple of 4; valid sizes: \[1, 2\]"):
        config.resolve(world_size=8, devices_per_node=2)
    with pytest.raises(ValueError, match="data_parallel_replicate_size must be a positive int, got 'nodes'"):
        ParallelConfig(data_parallel_mode="hybrid", data_parallel_replicate_size="nodes")


def test_slurm_numbers_are_used_and_checked_against_the_trainer(monkeypatch):
    for key, value in SLURM_TASK.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_NODEID", "1")
    trainer = L.Trainer(strategy="lightning_mp", accelerator="cpu", devices=2, num_nodes=2, logger=False)
    env = trainer.strategy.cluster_environment
    assert type(env).__name__ == "SLURMEnvironment" and env.creates_processes_externally
    assert (trainer.global_rank, trainer.node_rank, trainer.local_rank, trainer.world_size) == (3, 1, 1, 4)
    assert env.main_address == "127.0.0.1"  # the first host of SLURM_NODELIST
    # Lightning checks these only in its own launcher; under srun the strategy must, before anything starts.
    with pytest.raises(ValueError, match=r"`num_nodes=1` in Lightning, but the number of nodes configured in SLURM"
                                         r" `--nodes=2`"):
        L.Trainer(strategy="lightning_mp", accelerator="cpu", devices=2, num_nodes=1, logger=False)
    with pytest.raises(ValueError, match=r"`devices=4` in Lightning, but the number of tasks per node configured in"
                                         r" SLURM `--ntasks-per-node=2`"):
        L.Trainer(strategy="lightning_mp", accelerator="cpu", devices=4, num_nodes=2, logger=False)
