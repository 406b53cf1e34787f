"""Fine-tune a causal LM on chat data with lightning_mp (loss on the replies only).

    python recipes/sft_llm.py                                     # offline, CPU: SmolLM2-135M on chatterbot
    python recipes/sft_llm.py trainer.devices=3 parallel.tensor=3
    python recipes/sft_llm.py trainer.devices=4 parallel.pipeline=2
    python recipes/sft_llm.py model.name_or_path=/models/Qwen2.5-0.5B-Instruct data.train_file=chats.jsonl

Prints ``held-out perplexity <before> -> <after>`` last. With trainer.devices > 1 on one node the recipe
starts its ranks itself (torchrun); across nodes, run it under torchrun or srun on every node.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

CHECKOUT = Path(__file__).resolve().parent.parent
if (CHECKOUT / "lightning_mp").is_dir():  # a checkout, runnable without install (installed, this is the package)
    sys.path.insert(0, str(CHECKOUT))

from lightning_mp.tasks.launch import launch_ranks_if_needed  # noqa: E402
from lightning_mp.tasks.llm.recipe import check_config, model_source, run_sft  # noqa: E402


@hydra.main(config_path="../conf", config_name="sft_llm", version_base="1.3")
def main(cfg: DictConfig) -> dict | None:
    original_cwd = Path(hydra.utils.get_original_cwd())
    check_config(cfg, original_cwd)  # bad overrides fail here, before any rank is started
    model_source(cfg, original_cwd)  # convert the packaged GGUF once, before the ranks would race for it
    exit_code = launch_ranks_if_needed(cfg, Path(__file__).resolve())
    if exit_code is not None:
        if exit_code != 0:
            raise SystemExit(exit_code)
        return None
    return run_sft(cfg, original_cwd=original_cwd, run_dir=Path(os.getcwd()))


if __name__ == "__main__":
    main()
