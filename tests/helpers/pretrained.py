"""What the from_pretrained tests and their worker (``workers/pretrained.py``) share."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from helpers.launch import WORKERS, run_job

VOCAB = 96
HEAD_SEED = 77  # the seed before from_pretrained: the new head's values depend on it


def model_inputs(vocab: int, rows: int = 8, seq: int = 12) -> dict[str, torch.Tensor]:
    """Deterministic inputs, without token_type_ids so BERT reads its (recomputed) token_type_ids buffer."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, vocab, (rows, seq), generator=g)
    mask = torch.ones(rows, seq, dtype=torch.long)
    mask[::3, -4:] = 0  # some padding, so the attention mask matters
    return {"input_ids": ids, "attention_mask": mask}


def bert_config(**overrides):
    from transformers import BertConfig

    return BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=32, **overrides)


def bert_checkpoints(root: Path) -> dict[str, Path]:
    """A BertModel (no token-classification head: it is new) in an index of several files, and a full
    BertForTokenClassification in one model.safetensors."""
    from transformers import BertForTokenClassification, BertModel

    torch.manual_seed(0)
    BertModel(bert_config()).save_pretrained(root / "base_sharded", max_shard_size="20KB")
    BertForTokenClassification(bert_config(num_labels=5)).save_pretrained(root / "token")
    assert (root / "base_sharded" / "model.safetensors.index.json").exists()
    assert len(list((root / "base_sharded").glob("*.safetensors"))) > 2
    return {"base_sharded": root / "base_sharded", "token": root / "token"}


def tied_llama_config(**overrides):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=True, **overrides)


def tied_llama_checkpoint(path: Path) -> Path:
    """A Llama with tied word embeddings saved by ``save_pretrained``: it stores the embedding only."""
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(tied_llama_config()).save_pretrained(path)
    assert "lm_head.weight" not in load_file(path / "model.safetensors")
    return path


def plain(cls_name: str, path: Path, **kwargs):
    """The class's own from_pretrained, seeded as the worker seeds it (new heads depend on the seed)."""
    import transformers

    torch.manual_seed(HEAD_SEED)
    return getattr(transformers, cls_name).from_pretrained(str(path), **kwargs).eval()


def run_pretrained_worker(tmp_path: Path, model_dir: Path, layout: dict, kwargs: dict, *extra: str,
                          devices: int = 4) -> list[dict] | tuple[list[dict], list[dict]]:
    """Every rank's results; with ``--plain-too`` among ``extra``, (those, the same layout's plain run's)."""
    out = tmp_path / f"result-{os.urandom(4).hex()}"
    run_job([sys.executable, WORKERS / "pretrained.py", "--out", out, "--model-dir", model_dir, "--devices", devices,
             "--layout", json.dumps(layout), "--kwargs", json.dumps(kwargs), *extra], cwd=tmp_path, timeout=300)
    results = [torch.load(f"{out}.rank{rank}.pt", weights_only=False) for rank in range(devices)]
    if "--plain-too" not in extra:
        return results
    return results, [torch.load(f"{out}.plain.rank{rank}.pt", weights_only=False) for rank in range(devices)]


def logits_by_row(results: list[dict]) -> torch.Tensor:
    rows = {index: row for result in results for index, row in result["logits"].items()}
    return torch.stack([rows[i] for i in sorted(rows)])
