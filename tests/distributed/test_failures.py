"""A job that stops making progress ends itself and says where every rank is; SIGTERM ends a stuck job.

The job: 4 data-parallel ranks; at its second step rank 1 enters an all-reduce on a side group that rank 0
never enters, so rank 1 waits there and the others wait for rank 1 in the next FSDP collective. Neither main
thread returns to Python (no signal handler runs, no exception is raised) until the process-group timeout
(set to 10 minutes here).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from helpers.launch import clean_env

STUCK_JOB = """
import os
from datetime import timedelta
import lightning as L
import torch
import torch.distributed as dist
from helpers.tiny_bert import TinyBertModule, loader
from lightning_mp import ModelParallelStrategy

class Stuck(TinyBertModule):
    def on_fit_start(self):
        self.side = dist.new_group([0, 1])  # every rank creates it; only rank 1 uses it

    def training_step(self, batch, batch_idx):
        if self.global_rank == 1 and batch_idx == 1:
            open(f"stuck-{{os.getpid()}}", "w").close()
            dist.all_reduce(torch.ones(1), group=self.side)  # rank 0 never enters this collective
        return super().training_step(batch, batch_idx)

L.seed_everything(0)
strategy = ModelParallelStrategy(data_parallel_size=4, timeout=timedelta(minutes=10), progress_timeout={progress})
L.Trainer(accelerator="cpu", devices=4, strategy=strategy, max_steps=4, logger=False, enable_checkpointing=False,
          enable_progress_bar=False, enable_model_summary=False).fit(Stuck(), loader(4))
"""


def start(tmp_path, progress) -> subprocess.Popen:
    script = tmp_path / "stuck.py"
    script.write_text(STUCK_JOB.format(progress=progress))
    return subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=clean_env(), cwd=tmp_path)


def wait_until_stuck(job: subprocess.Popen, tmp_path) -> int:
    """Returns the pid of rank 1 once it is about to enter the collective nobody else enters."""
    deadline = time.monotonic() + 240
    while not list(tmp_path.glob("stuck-*")):
        assert job.poll() is None and time.monotonic() < deadline, "the job ended before it got stuck"
        time.sleep(0.2)
    return int(next(tmp_path.glob("stuck-*")).name.split("-")[1])


def test_a_stuck_job_ends_itself_and_names_the_stuck_rank(tmp_path):
    job = start(tmp_path, progress=10)
    wait_until_stuck(job, tmp_path)
    stuck_at = time.monotonic()
    _, stderr = job.communicate(timeout=240)
    elapsed = time.monotonic() - stuck_at
    print(f"stuck job ended {elapsed:.1f} s after rank 1 got stuck")
    assert job.returncode != 0
    assert elapsed < 60, elapsed  # 10 s without progress, then the report
    report = re.search(r"\[lightning_mp\] stopping rank \d: no rank completed a training step or evaluation batch"
                       r" for \d+ s \(progress_timeout=10 s\): rank 1 is where no other rank is .*"
                       r"rank 1: 1 steps completed, at all_reduce .*called from training_step \(.*stuck\.py:\d+\)",
                       stderr)
    assert report, stderr[-4000:]
    # Every rank stops and prints where its main thread was: rank 1 in the side all-reduce.
    assert set(re.findall(r"\[lightning_mp\] stopping rank (\d)", stderr)) == {"0", "1", "2", "3"}
    rank1_stack = stderr[stderr.index("[lightning_mp] rank 1 main thread"):]
    assert "dist.all_reduce(torch.ones(1), group=self.side)" in rank1_stack


@pytest.mark.parametrize("target", ["launcher", "rank 1"])
def test_sigterm_ends_a_stuck_job_within_seconds(tmp_path, target):
    job = start(tmp_path, progress=None)  # only the signal can end it
    stuck_pid = wait_until_stuck(job, tmp_path)
    time.sleep(3)  # rank 1 is inside the all-reduce, the others wait for it
    os.kill(job.pid if target == "launcher" else stuck_pid, signal.SIGTERM)
    sent = time.monotonic()
    _, stderr = job.communicate(timeout=120)
    elapsed = time.monotonic() - sent
    print(f"SIGTERM to the {target}: the job ended {elapsed:.1f} s later")
    assert job.returncode != 0
    # signal_grace (5 s) + a watch round + 2.5 s for the other ranks to read the report and print: about 7 s on
    # an idle machine; the bound leaves room for a loaded one.
    assert elapsed < 30, elapsed
    rank = "0" if target == "launcher" else "1"
    assert re.search(rf"stopping rank {rank}: rank {rank} received SIGTERM and its main thread did not stop within 5 s",
                     stderr), stderr[-4000:]
