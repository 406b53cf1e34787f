"""Greedy answers to chat prompts from a Hugging Face directory or from a checkpoint of any layout."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch


def answer(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int = 48) -> list[str]:
    """One greedy reply per prompt, each formatted with the tokenizer's chat template (one at a time: no
    padding, so the answers do not depend on which prompts share a batch)."""
    model.eval()
    replies = []
    for prompt in prompts:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        with torch.no_grad():  # only what a causal LM takes (some tokenizers add token_type_ids)
            out = model.generate(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"],
                                 max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        replies.append(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return replies


def load_for_generation(path: str | Path, tokenizer_path: str | Path | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) from an exported Hugging Face directory, or from a checkpoint this recipe wrote
    (a full ``.ckpt`` file or a sharded directory, of any layout) plus ``tokenizer_path`` (default: the
    model the checkpoint was fine-tuned from)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if (path / "config.json").is_file():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(
            tokenizer_path or path)
    from lightning_mp.checkpoint.convert import sharded_to_full
    from lightning_mp.checkpoint.io import is_sharded_checkpoint
    from lightning_mp.tasks.llm.module import CausalLM

    with tempfile.TemporaryDirectory() as scratch:
        full = path
        if is_sharded_checkpoint(path):
            full = sharded_to_full(path, Path(scratch) / "full.ckpt")
        elif not path.is_file():
            raise FileNotFoundError(f"{path} is neither a Hugging Face directory (config.json), a checkpoint file nor"
                                    " a sharded checkpoint directory (.metadata).")
        module = CausalLM.load_from_checkpoint(full, map_location="cpu", weights_only=False)
    source = tokenizer_path or module.hparams.model_name_or_path
    if not isinstance(source, (str, Path)):
        raise ValueError(f"{path} was trained from a random config; pass the tokenizer's directory.")
    return module.model, AutoTokenizer.from_pretrained(source)
