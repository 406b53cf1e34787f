"""A tiny causal LM with a chat template, for the LLM recipe's tests (offline: the packaged MiniLM
vocabulary with a ChatML-like template, a 2-layer random Llama)."""

from __future__ import annotations

from pathlib import Path

import torch

from lightning_mp.tasks.ner.data import minilm_path

CHAT_TEMPLATE = ("{% for m in messages %}[CLS] {{ m['role'] }} : {{ m['content'] }} [SEP]{% endfor %}"
                 "{% if add_generation_prompt %}[CLS] assistant :{% endif %}")


def chat_tokenizer():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_llama_dir(path: Path, heads: int = 4, kv_heads: int = 2, layers: int = 2, hidden: int = 48,
                   tied: bool = False) -> Path:
    """A random Llama (``heads`` / ``kv_heads``, ``layers``; ``tied`` word embeddings, as SmolLM2's) with the chat
    tokenizer, saved as an HF directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = chat_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=256, tie_word_embeddings=tied,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.convert_tokens_to_ids("[SEP]"))
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def recipe_llama_dir(root: Path) -> Path:
    """The causal-LM recipe's test model: tied word embeddings, as SmolLM2's (loaded through
    lightning_mp.from_pretrained: tied on meta, retied after materializing; under a pipeline one copy per end
    stage), 6 heads / 3 KV heads."""
    return tiny_llama_dir(root, heads=6, kv_heads=3, tied=True)
