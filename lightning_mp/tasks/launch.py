"""Start the ranks of a Hydra job with torchrun.

Lightning's own script launcher re-runs ``sys.argv`` in each child, which under Hydra's multirun
(``-m``) would start a whole new sweep in every child. Instead the Hydra job (one run, or one job of a
sweep) re-executes itself under ``torch.distributed.run`` with exactly its own configuration (config
sources, Hydra and task overrides) and run directory; the ranks then see an external launcher, as on a
cluster.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

# Hydra overrides the relaunch sets itself: the ranks run one job in the parent's directory.
_SET_BY_RELAUNCH = ("hydra.mode=", "hydra.run.dir=", "hydra.output_subdir=")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launched_externally() -> bool:
    """True under torchrun (LOCAL_RANK) or srun (Lightning's SLURM detection: SLURM_NTASKS, not an
    interactive job): the ranks already exist and must not start ranks of their own."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    return "LOCAL_RANK" in os.environ or SLURMEnvironment.detect()


def entry_point(script: Path) -> list[str]:
    """How this process was started, for torchrun: ``-m module`` when run as a module (the installed
    ``lightning-mp run`` / ``python -m lightning_mp.recipes.X``), else the script's path (a checkout)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return ["-m", spec.name] if spec is not None and spec.name else [str(script)]


def hydra_arguments(hydra_cfg: Any) -> list[str]:
    """The command-line arguments that make a new process compose exactly this job's configuration."""
    args = ["--config-name", hydra_cfg.job.config_name]
    for source in hydra_cfg.runtime.config_sources:
        if source.schema != "file":
            continue  # Hydra's own (pkg://hydra.conf) and structured configs are found again by themselves
        if source.provider == "main":
            args += ["--config-path", source.path]  # absolute: --config-path is otherwise relative to the script
        elif source.provider == "command-line":
            args += ["--config-dir", source.path]
    hydra_overrides = [o for o in hydra_cfg.overrides.hydra if not o.startswith(_SET_BY_RELAUNCH)]
    return args + hydra_overrides + list(hydra_cfg.overrides.task)


def launch_ranks_if_needed(cfg: DictConfig, script: Path) -> int | None:
    """Return None when this process should train itself, else the exit code of the launched ranks."""
    devices = int(cfg.trainer.devices)
    if devices <= 1 or int(cfg.trainer.num_nodes) > 1 or launched_externally():
        return None  # single process, an external launcher already ran us, or the user runs torchrun per node
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd

    hydra_cfg = HydraConfig.get()
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(devices),
        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
        *entry_point(script), *hydra_arguments(hydra_cfg),
        f"hydra.run.dir={hydra_cfg.runtime.output_dir}", "hydra.output_subdir=null",
    ]
    return subprocess.run(cmd, cwd=get_original_cwd()).returncode
