"""Checkpoints move between layouts, resume loses nothing, bad checkpoints fail clearly, failures never hang.

Multi-process jobs run ``tests/workers/resume.py`` (tiny 4-layer BERT, AdamW with an LR that halves every
step, 64 rows, global batch 16: 4 steps per epoch, so checkpoints at steps 2 and 3 are mid-epoch). The
reference is one uninterrupted run; every resumed step must see the same batch and give the same loss,
and the final weights must match.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint

from helpers.compare import max_weight_difference
from helpers.launch import WORKERS, clean_env, run_job, run_worker_script
from helpers.tiny_bert import TinyBertModule
from lightning_mp.checkpoint.convert import main as convert_main
from lightning_mp.checkpoint.convert import sharded_to_full
from lightning_mp.checkpoint.io import is_sharded_checkpoint

TOLERANCE = 1e-5


DP2_TP2 = {"data_parallel_size": 2, "tensor_parallel_size": 2}


PP2_DP2 = {"pipeline_parallel_size": 2, "data_parallel_size": 2, "microbatches": 2}


PP2_TP2 = {"pipeline_parallel_size": 2, "tensor_parallel_size": 2, "data_parallel_size": 1, "microbatches": 4}


def job(tmp_path: Path, devices: int, layout: dict, steps: int, *extra: str) -> dict:
    """``workers/resume.py``: train ``steps`` steps under ``layout`` (resuming, saving, killing as ``extra`` says)."""
    return run_worker_script("resume.py", "--devices", str(devices), "--layout", json.dumps(layout), "--steps",
                             str(steps), *extra, cwd=tmp_path)


def killed_job(tmp_path: Path, devices: int, layout: dict, steps: int, *extra: str) -> subprocess.CompletedProcess:
    """The same job expected to die (``--kill-after``): its exit, not a result."""
    return run_job([sys.executable, WORKERS / "resume.py", "--out", tmp_path / "never-written.pt", "--devices",
                    str(devices), "--layout", json.dumps(layout), "--steps", str(steps), *extra], cwd=tmp_path,
                   timeout=300, check=False)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """6 steps on one device: steps 5-6 are the first two of epoch 2 (a reshuffled order); ``weights_at`` holds
    the weights after step 4 (what a 4-step run ends with)."""
    return job(tmp_path_factory.mktemp("reference"), 1, {}, 6, "--weights-at", "4")


def assert_continues(resumed: dict, reference: dict, steps: range) -> None:
    assert sorted(resumed["losses"]) == list(steps)
    for step in steps:
        assert resumed["first_ids"][step] == reference["first_ids"][step], f"step {step} saw another batch"
        assert resumed["losses"][step] == pytest.approx(reference["losses"][step], abs=TOLERANCE), f"step {step}"


# ---------------------------------------------------------------- round trips across layouts (slow)
def test_sharded_round_trip_dp_tp_to_pp_dp_to_single_device(tmp_path, uninterrupted):
    first = job(tmp_path, 4, DP2_TP2, 2, "--every-step", "a")
    assert is_sharded_checkpoint(tmp_path / "a" / "last.ckpt")
    second = job(tmp_path, 4, PP2_DP2, 4, "--every-step", "b", "--resume", "a/last.ckpt")
    third = job(tmp_path, 1, {}, 6, "--resume", "b/last.ckpt")
    assert_continues(first, uninterrupted, range(1, 3))
    assert_continues(second, uninterrupted, range(3, 5))
    assert_continues(third, uninterrupted, range(5, 7))
    assert third["lr"] == pytest.approx(uninterrupted["lr"])  # the LR schedule resumed too
    assert max_weight_difference(third["state_dict"], uninterrupted["state_dict"]) < TOLERANCE

    # A plain LightningModule, no strategy: the sharded checkpoint converted offline, loaded as usual.
    sharded_to_full(tmp_path / "b" / "last.ckpt", tmp_path / "b.ckpt")
    plain = TinyBertModule.load_from_checkpoint(tmp_path / "b.ckpt", layers=4, map_location="cpu")
    assert max_weight_difference(plain.state_dict(), uninterrupted["weights_at"]) < TOLERANCE


def test_sharded_round_trip_replicated_to_fully_sharded_and_back(tmp_path, uninterrupted):
    """The replicated mode holds plain (unsharded) parameters on every rank, no FSDP: its sharded checkpoint
    must still be written once per tensor and load into FSDP's shards, and theirs into plain tensors."""
    replicated = {"data_parallel_size": 2, "data_parallel_mode": "replicated"}
    first = job(tmp_path, 2, replicated, 2, "--every-step", "a")
    second = job(tmp_path, 2, {"data_parallel_size": 2}, 4, "--every-step", "b", "--resume", "a/last.ckpt")
    third = job(tmp_path, 2, replicated, 6, "--resume", "b/last.ckpt")
    assert_continues(first, uninterrupted, range(1, 3))
    assert_continues(second, uninterrupted, range(3, 5))
    assert_continues(third, uninterrupted, range(5, 7))
    assert max_weight_difference(third["state_dict"], uninterrupted["state_dict"]) < TOLERANCE


def test_full_round_trip_pp_tp_to_dp_and_through_the_sharded_form(tmp_path, uninterrupted):
    first = job(tmp_path, 4, PP2_TP2, 3, "--every-step", "a", "--full")
    full = tmp_path / "a" / "last.ckpt"
    assert full.is_file()
    assert {"model.bert.embeddings.word_embeddings.weight", "model.classifier.weight"} <= set(
        torch.load(full, weights_only=False)["state_dict"])  # both pipeline stages merged
    second = job(tmp_path, 2, {"data_parallel_size": 2}, 5, "--resume", "a/last.ckpt")
    assert_continues(first, uninterrupted, range(1, 4))
    assert_continues(second, uninterrupted, range(4, 6))

    # full -> sharded with the CLI, resumed by tensor parallelism
    convert_main([str(full), str(tmp_path / "converted")])
    third = job(tmp_path, 2, {"tensor_parallel_size": 2}, 5, "--resume", "converted")
    assert_continues(third, uninterrupted, range(4, 6))
    assert max_weight_difference(third["state_dict"], second["state_dict"]) < TOLERANCE


def test_killed_mid_epoch_resumes_on_the_same_trajectory(tmp_path, uninterrupted):
    killed = killed_job(tmp_path, 2, {"data_parallel_size": 2}, 6, "--every-step", "ck", "--kill-after", "3")
    assert killed.returncode != 0
    assert not list(tmp_path.glob("ck/.*.partial"))  # nothing half-written sits where a checkpoint is read
    resumed = job(tmp_path, 2, {"data_parallel_size": 2}, 6, "--resume", "ck/last.ckpt")
    assert_continues(resumed, uninterrupted, range(4, 7))
    assert max_weight_difference(resumed["state_dict"], uninterrupted["state_dict"]) < TOLERANCE


# ---------------------------------------------------------------- failures end the job (slow)
FAILING_JOB = """
from datetime import timedelta
import lightning as L
from helpers.tiny_bert import TinyBertModule, loader
from lightning_mp import ModelParallelStrategy

class Boom(TinyBertModule):
    def training_step(self, batch, batch_idx):
        if self.global_rank == 1 and batch_idx == 1:
            raise ValueError("boom on purpose")
        return super().training_step(batch, batch_idx)

L.seed_everything(0)
strategy = ModelParallelStrategy(data_parallel_size=4, timeout=timedelta(seconds={timeout}))
L.Trainer(accelerator="cpu", devices=4, strategy=strategy, max_steps=3, logger=False, enable_checkpointing=False,
          enable_progress_bar=False, enable_model_summary=False).fit(Boom(), loader(4))
"""


def test_a_rank_raising_mid_step_ends_every_rank_within_the_timeout(tmp_path):
    timeout = 60
    script = tmp_path / "boom.py"
    script.write_text(FAILING_JOB.format(timeout=timeout))
    start = time.monotonic()
    proc = run_job([sys.executable, str(script)], timeout=3 * timeout,
                          env=clean_env(), cwd=tmp_path, check=False)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert elapsed < timeout
    # The ranks that did not fail say which one did, and why.
    assert re.search(r"\[lightning_mp\] stopping rank [023]: rank 1 failed: ValueError: boom on purpose", proc.stderr)
