"""Processes of a job: checking the model before Lightning starts child processes, and ending the
process group cleanly at exit."""

from __future__ import annotations

import atexit
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.fabric.utilities.distributed import _destroy_dist_connection
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

_exit_hook_registered = False


def destroy_process_group_at_exit() -> None:
    # A process group still alive when the interpreter exits can abort it from gloo's worker threads
    # ("terminate called without an active exception", exit code -6) after training succeeded.
    global _exit_hook_registered
    if not _exit_hook_registered:
        atexit.register(_destroy_dist_connection)
        _exit_hook_registered = True


class CheckModelThenLaunch(_SubprocessScriptLauncher):
    """Lightning's script launcher, but a model that cannot be parallelized fails before any child
    process is started."""

    def __init__(self, strategy: Any, *args: Any) -> None:
        super().__init__(*args)
        self._strategy = strategy

    def launch(self, function: Any, *args: Any, trainer: Optional[pl.Trainer] = None, **kwargs: Any) -> Any:
        if args and isinstance(args[0], pl.LightningModule):
            self._strategy.check_model(args[0])
        return super().launch(function, *args, trainer=trainer, **kwargs)
