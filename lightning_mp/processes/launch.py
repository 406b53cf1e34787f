"""Processes of a job: checking the model before Lightning starts child processes, and ending the
process group cleanly at exit."""

from __future__ import annotations

import atexit
import time
from typing import Any, Optional

import lightning.pytorch as pl

from lightning_mp._compat import SubprocessScriptLauncher, destroy_dist_connection

_exit_hook_registered = False
# How long the interpreter leaves the GIL to the process groups' worker threads before it shuts down.
_SETTLE_SECONDS = 0.25


def _end_process_groups() -> None:
    destroy_dist_connection()
    # A gloo worker thread drops its reference to a finished collective's tensors only after the caller has
    # seen the result, and that drop needs the GIL (the tensors have Python objects). A job whose last act
    # is a collective can reach interpreter shutdown first; Python then ends the waiting thread by unwinding
    # it through a noexcept destructor, which aborts the process ("terminate called without an active
    # exception", SIGABRT) after training succeeded. destroy_process_group does not stop those threads
    # (the device mesh still references its groups), so hand them the GIL for a moment instead.
    time.sleep(_SETTLE_SECONDS)


def destroy_process_group_at_exit() -> None:
    global _exit_hook_registered
    if not _exit_hook_registered:
        atexit.register(_end_process_groups)
        _exit_hook_registered = True


class CheckModelThenLaunch(SubprocessScriptLauncher):
    """Lightning's script launcher, but a model that cannot be parallelized fails before any child
    process is started."""

    def __init__(self, strategy: Any, *args: Any) -> None:
        super().__init__(*args)
        self._strategy = strategy

    def launch(self, function: Any, *args: Any, trainer: Optional[pl.Trainer] = None, **kwargs: Any) -> Any:
        if args and isinstance(args[0], pl.LightningModule):
            self._strategy.check_model(args[0])
        return super().launch(function, *args, trainer=trainer, **kwargs)
