"""Chat data for the causal-LM recipe: reply-only labels, the held-out split, rank-aware batches."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch

from helpers.llm_tiny import chat_tokenizer
from lightning_mp.tasks.llm.data import (
    IGNORE_INDEX,
    Conversation,
    EncodedChats,
    RankBatches,
    chatterbot_dir,
    collate,
    encode,
    read_chatterbot,
    read_jsonl,
    split_held_out,
)


def pair(prompt: str, reply: str) -> Conversation:
    return Conversation(({"role": "user", "content": prompt}, {"role": "assistant", "content": reply}))


def test_only_the_reply_is_labelled():
    tokenizer = chat_tokenizer()
    encoded = encode(pair("what is ai", "a branch of science"), tokenizer, max_length=64)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "what is ai"}], tokenize=True,
                                           add_generation_prompt=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    assert encoded["input_ids"][: len(prompt)] == prompt
    assert encoded["labels"][: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    reply = encoded["labels"][len(prompt):]
    assert reply == encoded["input_ids"][len(prompt):] and IGNORE_INDEX not in reply
    assert tokenizer.decode(reply, skip_special_tokens=True).strip() == "a branch of science"
    cut = encode(pair("what is ai", "a branch of science"), tokenizer, max_length=len(prompt) + 2)
    assert len(cut["input_ids"]) == len(cut["labels"]) == len(prompt) + 2


def test_chatterbot_pairs_and_a_deterministic_prompt_disjoint_split():
    pairs = read_chatterbot(chatterbot_dir())
    assert len(pairs) == 2306  # consecutive lines of every list-shaped conversation of the 21 English files
    train, held_out = split_held_out(pairs, 0.1, seed=13)
    assert 0.03 < len(held_out) / len(pairs) < 0.15
    assert not {c.prompt_key for c in train} & {c.prompt_key for c in held_out}
    again = split_held_out(list(reversed(pairs)), 0.1, seed=13)[1]
    assert sorted(c.prompt_key for c in again) == sorted(c.prompt_key for c in held_out)
    assert split_held_out(pairs, 0.1, seed=14)[1] != held_out
    with pytest.raises(ValueError, match="held_out_fraction=1.5"):
        split_held_out(pairs, 1.5, seed=13)


def test_jsonl_messages_and_prompt_response(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "system", "content": "be brief"},
                                             {"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n\n"
                    + json.dumps({"prompt": "2+2", "response": "4"}) + "\n")
    first, second = read_jsonl(path)
    assert [m["role"] for m in first.messages] == ["system", "user", "assistant"]
    assert second.messages[-1] == {"role": "assistant", "content": "4"}
    path.write_text(json.dumps({"text": "no chat"}) + "\n")
    with pytest.raises(ValueError, match=r"chats.jsonl:1: needs 'messages' or 'prompt' \+ 'response'"):
        read_jsonl(path)


def test_ranks_share_every_global_batch_and_pad_the_uneven_one_with_ignored_rows():
    tokenizer = chat_tokenizer()
    conversations = [pair(f"question {i}", "answer " * (1 + i % 5)) for i in range(21)]
    data = EncodedChats(conversations, tokenizer, max_length=64)
    for shuffle in (True, False):
        single = list(RankBatches(data.lengths, 8, shuffle=shuffle, seed=3))
        ranks = [list(RankBatches(data.lengths, 8, rank=r, replicas=2, shuffle=shuffle, seed=3)) for r in range(2)]
        assert len(ranks[0]) == len(ranks[1]) == len(single) == (2 if shuffle else 3)
        for step, whole in enumerate(single):
            real = sorted(i for r in range(2) for i, ignored in ranks[r][step] if not ignored)
            assert real == sorted(i for i, _ in whole)
    last = [list(RankBatches(data.lengths, 8, rank=r, replicas=2))[-1] for r in range(2)]  # 5 rows: 3 + 2
    assert [len(rows) for rows in last] == [3, 3] and last[1][-1][1] is True
    batch = collate([data[key] for key in last[1]], pad_id=tokenizer.pad_token_id)
    assert (batch["labels"][-1] == IGNORE_INDEX).all() and batch["attention_mask"][-1].sum() > 0
    widths = {collate([data[k] for k in rows], pad_id=0)["input_ids"].shape[1] for rows in ranks[0] + ranks[1]}
    assert len(widths) > 1  # each rank pads to its own longest row


def test_training_batches_group_similar_lengths():
    lengths = [5 + (i * 37) % 60 for i in range(256)]
    grouped = RankBatches(lengths, 8, shuffle=True, seed=0, group_window=16).global_batches()
    plain = RankBatches(lengths, 8, shuffle=True, seed=0, group_window=1).global_batches()
    spread = lambda batches: sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches)  # noqa: E731
    assert spread(grouped) < spread(plain) / 3
    assert sorted(i for b in grouped for i in b) == list(range(256))


def test_collate_pads_right_with_mask_and_ignored_labels():
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = partial(collate, pad_id=0)(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["input_ids"].dtype == torch.long
