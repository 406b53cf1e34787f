"""Checkpoints move between layouts, resume loses nothing, bad checkpoints fail clearly, failures never hang.

Multi-process jobs run ``tests/workers/resume.py`` (tiny 4-layer BERT, AdamW with an LR that halves every
step, 64 rows, global batch 16: 4 steps per epoch, so checkpoints at steps 2 and 3 are mid-epoch). The
reference is one uninterrupted run; every resumed step must see the same batch and give the same loss,
and the final weights must match.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed.checkpoint
from transformers import BertForTokenClassification

from helpers.tiny_bert import tiny_config
from lightning_mp.checkpoint.convert import full_to_sharded, sharded_to_full
from lightning_mp.checkpoint.convert import main as convert_main
from lightning_mp.checkpoint.io import CheckpointMismatchError, save_full
from lightning_mp.checkpoint.state import load_into


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
    with pytest.raises(CheckpointMismatchError,
                       match=r"not a complete sharded checkpoint: its .metadata file is missing"):
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


def test_pipeline_checkpoint_buffers_live_where_the_backend_needs_them(monkeypatch):
    """A full checkpoint under a pipeline streams entries to rank 0 with send/recv: over NCCL they must be on the
    rank's GPU. The device once came from the first state entry, which for AdamW is ``step``, a host tensor."""
    import torch.distributed as dist

    from lightning_mp.checkpoint import state

    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert state.collective_device(None) == torch.device("cpu")
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda: torch.device("cuda"))
    monkeypatch.setattr(torch.accelerator, "current_device_index", lambda: 3)
    assert state.collective_device(None) == torch.device("cuda", 3)


def test_a_checkpoint_holding_code_is_refused_unless_the_user_trusts_it(tmp_path):
    """torch's safe loading by default (Lightning passes weights_only=None on to torch): a pickled callable is
    refused with what to do; weights_only=False, the user's explicit choice, still loads it."""
    import os

    from lightning_mp.checkpoint.io import CheckpointMismatchError, read_full, save_full

    path = tmp_path / "planted.ckpt"
    save_full({"state_dict": tiny_module().state_dict(), "callback": os.system}, path)
    with pytest.raises(CheckpointMismatchError, match=r"planted.ckpt.*weights_only=False"):
        read_full(path)
    assert read_full(path, weights_only=False)["callback"] is os.system
