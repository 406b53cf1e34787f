"""The chat DataModule: reads, splits and encodes once per rank (nothing cached on disk), and hands each
data-parallel rank its rows of every global batch (``RankBatches``)."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Optional

import lightning as L
from torch.utils.data import DataLoader

from lightning_mp.tasks.llm.data import (
    EncodedChats,
    RankBatches,
    chatterbot_dir,
    collate,
    read_chatterbot,
    read_jsonl,
    split_held_out,
)


class ChatDataModule(L.LightningDataModule):
    """Chat pairs (default: the English chatterbot corpus) for a causal LM with a chat template.

    ``global_batch_size`` sequences make one step over all data-parallel ranks; which rank this process is
    comes from the strategy (``distributed_sampler_kwargs``), so the Trainer must run with
    ``use_distributed_sampler=False``. ``max_train_examples`` caps the training split (after the split).
    """

    def __init__(self, tokenizer: Any, train_file: Optional[str | Path] = None, global_batch_size: int = 16,
                 max_length: int = 256, held_out_fraction: float = 0.1, split_seed: int = 13, shuffle_seed: int = 0,
                 max_train_examples: Optional[int] = None, num_workers: int = 0) -> None:
        super().__init__()
        self.tokenizer, self.train_file = tokenizer, train_file
        self.global_batch_size, self.max_length, self.num_workers = global_batch_size, max_length, num_workers
        self.held_out_fraction, self.split_seed, self.shuffle_seed = held_out_fraction, split_seed, shuffle_seed
        self.max_train_examples = max_train_examples
        self.train: Optional[EncodedChats] = None
        self.held_out: Optional[EncodedChats] = None

    def setup(self, stage: str) -> None:
        if self.train is not None:
            return
        conversations = read_jsonl(Path(self.train_file)) if self.train_file else read_chatterbot(chatterbot_dir())
        train, held_out = split_held_out(conversations, self.held_out_fraction, self.split_seed)
        if self.max_train_examples:
            train = train[: self.max_train_examples]
        self.train = EncodedChats(train, self.tokenizer, self.max_length)
        self.held_out = EncodedChats(held_out, self.tokenizer, self.max_length)

    def _loader(self, data: EncodedChats, shuffle: bool) -> DataLoader:
        placement = {"rank": 0, "replicas": 1}
        if self.trainer is not None and self.trainer.world_size > 1:
            kwargs = self.trainer.strategy.distributed_sampler_kwargs
            placement = {"rank": kwargs["rank"], "replicas": kwargs["num_replicas"]}
        sampler = RankBatches(data.lengths, self.global_batch_size, shuffle=shuffle, seed=self.shuffle_seed,
                              **placement)
        return DataLoader(data, batch_sampler=sampler, num_workers=self.num_workers,
                          collate_fn=partial(collate, pad_id=self.tokenizer.pad_token_id))

    def train_dataloader(self) -> DataLoader:
        assert self.train is not None
        return self._loader(self.train, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        assert self.held_out is not None
        return self._loader(self.held_out, shuffle=False)
