"""Answer chat prompts greedily with a fine-tuned causal LM.

    python recipes/llm_generate.py outputs/<date>/<time>/hf_model "Hello, how are you?" "Tell me a joke."
    python recipes/llm_generate.py outputs/<date>/<time>/checkpoints/best-....ckpt "Hi"   # any layout's checkpoint
    echo "Hi" | python recipes/llm_generate.py outputs/<date>/<time>/hf_model             # prompts on stdin
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent
if (CHECKOUT / "lightning_mp").is_dir():  # a checkout, runnable without install (installed, this is the package)
    sys.path.insert(0, str(CHECKOUT))

from lightning_mp.tasks.llm.generate import answer, load_for_generation  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="an exported Hugging Face directory, a .ckpt file or a sharded checkpoint")
    parser.add_argument("prompts", nargs="*", help="prompts (default: one per line on stdin)")
    parser.add_argument("--tokenizer", help="tokenizer directory for a checkpoint (default: its base model)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    prompts = args.prompts or [line.strip() for line in sys.stdin if line.strip()]
    model, tokenizer = load_for_generation(args.model, args.tokenizer)
    for prompt, reply in zip(prompts, answer(model, tokenizer, prompts, args.max_new_tokens)):
        print(f"{prompt}\n  -> {reply}")


if __name__ == "__main__":
    main()
