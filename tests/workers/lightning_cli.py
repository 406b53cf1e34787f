"""LightningCLI over the tiny BERT: ``python lightning_cli.py fit --config config.yaml --out result.pt``.

A user's script imports lightning_mp so that ``trainer.strategy: lightning_mp`` is a known name (Lightning
reads no entry points for strategies); a ``class_path`` needs no import. Rank 0 writes what ran.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.cli import LightningCLI

import lightning_mp  # noqa: F401  registers the strategy names
from helpers.tiny_bert import TinyBertModule, loader


class TinyData(L.LightningDataModule):
    def train_dataloader(self):
        return loader(8)


class CLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--out", required=True)

    def after_fit(self) -> None:
        trainer = self.trainer
        if trainer.is_global_zero:
            torch.save({"strategy": type(trainer.strategy).__name__, "world_size": trainer.world_size,
                        "mesh_shape": trainer.strategy.mesh_shape, "steps": trainer.global_step},
                       self.config.fit.out)


if __name__ == "__main__":
    CLI(TinyBertModule, TinyData, seed_everything_default=0,
        trainer_defaults={"max_steps": 2, "logger": False, "enable_checkpointing": False,
                          "enable_progress_bar": False, "enable_model_summary": False})
