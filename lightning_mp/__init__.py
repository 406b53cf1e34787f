"""lightning_mp: FSDP2, tensor and pipeline parallelism for ordinary LightningModules."""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_mp.checkpoint.pretrained import from_pretrained
from lightning_mp.config import FSDPSettings, ParallelConfig
from lightning_mp.plans import ModelPlan, register_plan
from lightning_mp.strategy import ModelParallelStrategy

# Lightning finds only its own strategies by name (it reads no entry points for them), so importing the
# package registers ours: Trainer(strategy="lightning_mp") works after `import lightning_mp`.
ModelParallelStrategy.register_strategies(StrategyRegistry)

__all__ = ["FSDPSettings", "ModelParallelStrategy", "ModelPlan", "ParallelConfig", "from_pretrained", "register_plan"]
