"""The strategy's side of Lightning's checkpointing: which state goes into a checkpoint and how it is
written and read (``io.py`` holds the formats, ``state.py`` the names).
A mixin of ``ModelParallelStrategy``: it uses the
strategy's model, optimizers, collectives and ``pipeline_group``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

from lightning.pytorch.trainer.states import TrainerFn
from torch.optim import Optimizer

from lightning_mp._compat import unwrap_optimizer
from lightning_mp.checkpoint.io import save_full, save_sharded
from lightning_mp.checkpoint.rng import restore_rng_states, with_rng_states
from lightning_mp.checkpoint.state import load_into, model_state
from lightning_mp.checkpoint.state import optimizer_state as flattened_optimizer_state
from lightning_mp.checkpoint.tied import TiedNames
from lightning_mp.processes.watch import FailureWatch


class CheckpointHooks:
    """Gathering, writing and reading a checkpoint pause the progress watch: they may rightly take longer
    than its timeout (a large full checkpoint, a slow file system)."""

    _save_distributed_checkpoint: bool
    _failure_watch: FailureWatch
    _tied_names: TiedNames  # stored once, under the name save_pretrained keeps (checkpoint/tied.py)

    def lightning_module_state_dict(self) -> dict[str, Any]:
        assert self.model is not None
        with self._failure_watch.paused():
            return model_state(self.model, full=not self._save_distributed_checkpoint,
                               pipeline_group=self.pipeline_group,
                               tied=self._tied_names)

    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        optimizer = unwrap_optimizer(optimizer)
        assert self.model is not None
        with self._failure_watch.paused():
            return flattened_optimizer_state(self.model, optimizer, full=not self._save_distributed_checkpoint,
                                             pipeline_group=self.pipeline_group, tied=self._tied_names)

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        pass  # already loaded into the sharded model by load_checkpoint

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        pass  # already loaded into the sharded optimizers by load_checkpoint

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint does not take storage_options.")
        with self._failure_watch.paused():
            path = Path(self.broadcast(str(filepath)))
            checkpoint = with_rng_states(checkpoint)
            if self._save_distributed_checkpoint:
                save_sharded(checkpoint, path, self.is_global_zero, self.barrier)
            elif self.is_global_zero:
                save_full(checkpoint, path)
            self.barrier()

    def load_checkpoint(self, checkpoint_path: Any, weights_only: Optional[bool] = None) -> dict[str, Any]:
        assert self.model is not None and self.lightning_module is not None
        with self._failure_watch.paused():
            path = Path(self.broadcast(str(checkpoint_path)))
            # Optimizer state only when fitting, as Lightning restores it (restore_training_state): validate or
            # test with ckpt_path after fit must neither replace the fitted optimizer's state nor read it.
            fitting = self.lightning_module.trainer.state.fn == TrainerFn.FITTING
            rest = load_into(path, self.model, self.optimizers if fitting else [], self.lightning_module.strict_loading,
                             weights_only, tied=self._tied_names)
            restore_rng_states(rest)
            self.barrier()
        return rest
