"""lightning_mp: FSDP2, tensor and pipeline parallelism for ordinary LightningModules."""

from lightning_mp.config import ParallelConfig
from lightning_mp.plans import ModelPlan, register_plan
from lightning_mp.strategy import ModelParallelStrategy

__all__ = ["ModelParallelStrategy", "ModelPlan", "ParallelConfig", "register_plan"]
