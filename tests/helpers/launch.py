"""The one way tests start processes: a worker script (or any command) as its own job, killed whole when it
fails or overruns, and what it wrote read back.

Workers import ``helpers`` like the tests do: the job's environment puts ``tests/`` on ``PYTHONPATH``, so no
file edits ``sys.path``. Every job runs in a new session, so a timeout (the job's own or pytest-timeout's)
kills the ranks a launcher started as well, not only the process the test started.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import torch

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
WORKERS = TESTS / "workers"
# Set by an in-process Trainer run; a child that inherited them would think torchrun had launched it.
LAUNCH_VARIABLES = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "GROUP_RANK",
                    "MASTER_ADDR", "MASTER_PORT")


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without launcher variables, one thread per rank (2 cores are shared by up
    to 8 ranks), and ``tests/`` importable."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    path = os.pathsep.join(p for p in (str(TESTS), env.get("PYTHONPATH", "")) if p)
    return env | {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": path} | extra


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_job(cmd: Sequence[str], *, timeout: float, cwd: Path | None = None, env: dict[str, str] | None = None,
            check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
    """Run ``cmd`` to its end (stdout and stderr captured); on a timeout or any interruption kill its whole
    process group. ``check``: a non-zero exit raises AssertionError with the command and the end of its output;
    ``input``: written to its standard input."""
    proc = subprocess.Popen(list(map(str, cmd)), stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=env or clean_env(),
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(input, timeout=timeout)
    except BaseException:
        kill_group(proc)
        raise
    done = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    if check and done.returncode != 0:
        raise AssertionError(failure_text(done))
    return done


def start_job(cmd: Sequence[str], *, cwd: Path | None = None, env: dict[str, str] | None = None,
              **popen: object) -> subprocess.Popen:
    """A job the test watches while it runs (signals, progress files); stop it with ``kill_group``."""
    return subprocess.Popen(list(map(str, cmd)), cwd=cwd, env=env or clean_env(), start_new_session=True,
                            **popen)  # type: ignore[arg-type]


def kill_group(proc: subprocess.Popen) -> None:
    """Kill ``proc`` and every process of its session (the ranks a launcher started)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def failure_text(done: subprocess.CompletedProcess) -> str:
    return (f"job failed ({done.returncode}): {' '.join(map(str, done.args))}\n"
            f"{(done.stdout or '')[-3000:]}\n{(done.stderr or '')[-6000:]}")


def run_worker_script(script: str, *args: str, cwd: Path, timeout: float = 300,
                      launcher: Sequence[str] = (), out_suffix: str = ".pt") -> object:
    """Run ``tests/workers/<script>`` with ``--out FILE`` and ``args``; what rank 0 wrote to FILE (torch or JSON)."""
    out = cwd / f"result-{os.urandom(4).hex()}{out_suffix}"
    done = run_job([*(launcher or (sys.executable,)), str(WORKERS / script), "--out", str(out), *args],
                   cwd=cwd, timeout=timeout)
    if not out.exists():
        raise AssertionError(f"no result written to {out}\n" + failure_text(done))
    return json.loads(out.read_text()) if out_suffix == ".json" else torch.load(out, weights_only=False)


def run_worker(tmp_path: Path, *, devices: int = 1, layout: dict | None = None, strategy: str = "lightning_mp",
               extra: tuple[str, ...] = (), launcher: tuple[str, ...] = (), timeout: int = 300,
               script: str = "train.py", layouts: list[dict] | None = None) -> dict | list[dict]:
    """``train.py`` (or a script taking the same arguments) under ``layout``; with ``layouts``, one launch trains
    under each in turn and the result is a list."""
    choice = ("--layouts", json.dumps(layouts)) if layouts is not None else ("--layout", json.dumps(layout or {}))
    return run_worker_script(script, "--devices", str(devices), "--strategy", strategy, *choice, *extra,
                             cwd=tmp_path, timeout=timeout, launcher=launcher)  # type: ignore[return-value]
