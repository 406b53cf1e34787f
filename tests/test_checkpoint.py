"""Checkpoints move between layouts, resume loses nothing, bad checkpoints fail clearly, failures never hang.

Multi-process jobs run ``tests/workers/resume.py`` (tiny 4-layer BERT, AdamW with an LR that halves every
step, 64 rows, global batch 16: 4 steps per epoch, so checkpoints at steps 2 and 3 are mid-epoch). The
reference is one uninterrupted run; every resumed step must see the same batch and give the same loss,
and the final weights must match.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint
from conftest import WORKERS, clean_env, max_weight_difference

sys.path.insert(0, str(WORKERS))
from tiny_bert import TinyBertModule, tiny_config  # noqa: E402
from transformers import BertForTokenClassification  # noqa: E402

from lightning_mp.checkpoint.io import CheckpointMismatchError, is_sharded_checkpoint, save_full  # noqa: E402
from lightning_mp.checkpoint.state import load_into  # noqa: E402
from lightning_mp.checkpoint.convert import full_to_sharded, main as convert_main, sharded_to_full  # noqa: E402

TOLERANCE = 1e-5
DP2_TP2 = {"data_parallel_size": 2, "tensor_parallel_size": 2}
PP2_DP2 = {"pipeline_parallel_size": 2, "data_parallel_size": 2, "microbatches": 2}
PP2_TP2 = {"pipeline_parallel_size": 2, "tensor_parallel_size": 2, "data_parallel_size": 1, "microbatches": 4}


def job(tmp_path: Path, devices: int, layout: dict, steps: int, *extra: str, new_session: bool = False,
        expect_ok: bool = True) -> dict | None:
    out = tmp_path / f"result-{os.urandom(4).hex()}.pt"
    cmd = [sys.executable, str(WORKERS / "resume.py"), "--out", str(out), "--devices", str(devices),
           "--layout", json.dumps(layout), "--steps", str(steps), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=clean_env(), cwd=tmp_path,
                          start_new_session=new_session)
    if not expect_ok:
        return {"returncode": proc.returncode, "stderr": proc.stderr}
    if proc.returncode != 0 or not out.exists():
        raise AssertionError(f"job failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-5000:]}")
    return torch.load(out, weights_only=False)


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
@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_killed_mid_epoch_resumes_on_the_same_trajectory(tmp_path, uninterrupted):
    killed = job(tmp_path, 2, {"data_parallel_size": 2}, 6, "--every-step", "ck", "--kill-after", "3",
                 new_session=True, expect_ok=False)
    assert killed["returncode"] != 0
    assert not list(tmp_path.glob("ck/.*.partial"))  # nothing half-written sits where a checkpoint is read
    resumed = job(tmp_path, 2, {"data_parallel_size": 2}, 6, "--resume", "ck/last.ckpt")
    assert_continues(resumed, uninterrupted, range(4, 7))
    assert max_weight_difference(resumed["state_dict"], uninterrupted["state_dict"]) < TOLERANCE


# ---------------------------------------------------------------- bad checkpoints (one process)
def tiny_module(layers: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    module = torch.nn.Module()
    module.model = BertForTokenClassification(tiny_config(layers))
    return module


def test_truncated_and_corrupted_checkpoints_name_the_file(tmp_path):
    full = tmp_path / "model.ckpt"
    save_full({"state_dict": tiny_module().state_dict(), "optimizer_states": []}, full)
    load_into(full, tiny_module(), [], strict=True)  # the intact file loads
    data = full.read_bytes()
    full.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointMismatchError, match=rf"cannot read the checkpoint file {full}"):
        load_into(full, tiny_module(), [], strict=True)

    full.write_bytes(data)
    sharded = full_to_sharded(full, tmp_path / "sharded")
    shard = next(sharded.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointMismatchError, match=rf"cannot read the sharded checkpoint {sharded}"):
        load_into(sharded, tiny_module(), [], strict=True)
    (sharded / ".metadata").unlink()
    with pytest.raises(CheckpointMismatchError, match=r"not a complete sharded checkpoint: its .metadata file is missing"):
        load_into(sharded, tiny_module(), [], strict=True)


def test_mismatched_checkpoint_names_missing_unexpected_and_reshaped_entries(tmp_path):
    path = tmp_path / "two-layers.ckpt"
    save_full({"state_dict": tiny_module(layers=2).state_dict()}, path)
    with pytest.raises(CheckpointMismatchError) as error:
        load_into(path, tiny_module(layers=4), [], strict=True)
    assert "missing 32 model entries: model.bert.encoder.layer.2." in str(error.value)

    state = tiny_module().state_dict()
    state["model.classifier.weight"] = torch.zeros(7, 32)
    state["model.extra.bias"] = torch.zeros(3)
    save_full({"state_dict": state}, path)
    with pytest.raises(CheckpointMismatchError) as error:
        load_into(path, tiny_module(), [], strict=True)
    assert "model.classifier.weight: checkpoint (7, 32) vs model (5, 32)" in str(error.value)
    assert "1 unexpected model entries: model.extra.bias" in str(error.value)

    sharded = full_to_sharded(path, tmp_path / "sharded")
    with pytest.raises(CheckpointMismatchError, match=r"model.classifier.weight: checkpoint \(7, 32\)"):
        load_into(sharded, tiny_module(), [], strict=True)


def test_an_interrupted_save_is_never_taken_for_a_checkpoint(tmp_path):
    # What a crash during save_sharded leaves: a hidden staging directory, nothing at the real path.
    (tmp_path / ".last.ckpt.partial").mkdir()
    (tmp_path / ".last.ckpt.partial" / "__0_0.distcp").write_bytes(b"half")
    with pytest.raises(FileNotFoundError, match=r"No checkpoint at .*last.ckpt.*\.last\.ckpt\.partial is an"
                                                r" interrupted save"):
        load_into(tmp_path / "last.ckpt", tiny_module(), [], strict=True)
    # Replacing an existing checkpoint keeps the old one complete until the new one is.
    path = tmp_path / "model.ckpt"
    save_full({"state_dict": tiny_module().state_dict()}, path)
    save_full({"state_dict": tiny_module().state_dict(), "epoch": 7}, path)
    assert torch.load(path, weights_only=False)["epoch"] == 7 and not list(tmp_path.glob(".model.ckpt*"))


def test_one_process_without_a_process_group_converts_and_loads_without_torch_warnings(tmp_path):
    # Converting or loading in one process is what these paths are for; torch's "assuming the intent is to
    # save in a single process" would read as if something went wrong.
    full = tmp_path / "model.ckpt"
    save_full({"state_dict": tiny_module().state_dict()}, full)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sharded = full_to_sharded(full, tmp_path / "sharded")
        load_into(sharded, tiny_module(), [], strict=True)
        sharded_to_full(sharded, tmp_path / "back.ckpt")
    assert [str(w.message) for w in caught if "torch.distributed" in str(w.message)] == []
    # ... and the filter is scoped: nothing outside these calls is silenced.
    with pytest.warns(UserWarning, match="assuming the intent is to save"):
        torch.distributed.checkpoint.save({"x": torch.zeros(2)}, checkpoint_id=tmp_path / "raw")


def test_convert_refuses_to_overwrite(tmp_path, capsys):
    path = tmp_path / "model.ckpt"
    save_full({"state_dict": tiny_module().state_dict()}, path)
    with pytest.raises(SystemExit):
        convert_main([str(path), str(path)])
    assert "exists; pass --overwrite" in capsys.readouterr().err


# ---------------------------------------------------------------- failures end the job (slow)
FAILING_JOB = """
import sys; sys.path.insert(0, {workers!r})
from datetime import timedelta
import lightning as L
from tiny_bert import TinyBertModule, loader
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


@pytest.mark.slow
def test_a_rank_raising_mid_step_ends_every_rank_within_the_timeout(tmp_path):
    timeout = 60
    script = tmp_path / "boom.py"
    script.write_text(FAILING_JOB.format(workers=str(WORKERS), timeout=timeout))
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=3 * timeout,
                          env=clean_env(), cwd=tmp_path)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert elapsed < timeout
    # The ranks that did not fail say which one did, and why.
    assert re.search(r"\[lightning_mp\] stopping rank [023]: rank 1 failed: ValueError: boom on purpose", proc.stderr)


def test_validate_with_a_checkpoint_after_fit_restores_weights_not_the_optimizer(tmp_path, in_process_run):
    """As Lightning: optimizer state is restored only when fitting. validate(ckpt_path=...) after fit loads the
    weights and leaves the fitted optimizer's state alone (it used to be replaced by the checkpoint's, and the
    checkpoint's optimizer state read for nothing)."""
    import lightning as L

    from lightning_mp import ModelParallelStrategy

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).pow(2).mean()

        def validation_step(self, batch, batch_idx):
            self.log("val", self.layer(batch[0]).pow(2).mean())

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4)), batch_size=4)
    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=ModelParallelStrategy(save_distributed_checkpoint=False),
                        max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    module = Tiny()
    trainer.fit(module, data)
    trainer.save_checkpoint(tmp_path / "saved.ckpt")
    saved_weight = module.layer.weight.detach().clone()
    with torch.no_grad():
        module.layer.weight.add_(1.0)
        for state in trainer.optimizers[0].state.values():
            state["exp_avg"].add_(1.0)
    moved = [state["exp_avg"].clone() for state in trainer.optimizers[0].state.values()]
    trainer.validate(module, data, ckpt_path=tmp_path / "saved.ckpt", verbose=False)
    assert torch.equal(module.layer.weight, saved_weight)
    assert all(torch.equal(state["exp_avg"], m) for state, m in zip(trainer.optimizers[0].state.values(), moved))
