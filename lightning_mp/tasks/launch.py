"""Start the ranks of a Hydra job with torchrun.

Lightning's own script launcher re-runs ``sys.argv`` in each child, which under Hydra's multirun
(``-m``) would start a whole new sweep in every child. Instead the Hydra job (one run, or one job of a
sweep) re-executes itself under ``torch.distributed.run`` with exactly its own overrides and run
directory; the ranks then see an external launcher, as on a cluster.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from omegaconf import DictConfig


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_ranks_if_needed(cfg: DictConfig, script: Path) -> int | None:
    """Return None when this process should train itself, else the exit code of the launched ranks."""
    devices = int(cfg.trainer.devices)
    if devices <= 1 or int(cfg.trainer.num_nodes) > 1 or "LOCAL_RANK" in os.environ:
        return None  # single process, an external launcher already ran us, or the user runs torchrun per node
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd

    hydra_cfg = HydraConfig.get()
    run_dir = hydra_cfg.runtime.output_dir
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(devices),
        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
        str(script), *hydra_cfg.overrides.task,
        f"hydra.run.dir={run_dir}", "hydra.output_subdir=null",
    ]
    return subprocess.run(cmd, cwd=get_original_cwd()).returncode
