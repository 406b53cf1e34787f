"""Fine-tune a BERT for named-entity recognition with lightning_mp.

    python recipes/ner_bert.py                                   # offline, CPU: MiniLM on WNUT-16
    python recipes/ner_bert.py trainer.devices=4 parallel.tensor=2
    python recipes/ner_bert.py model=bert-base model.name_or_path=/path/to/bert-base-cased
    python recipes/ner_bert.py data.train_file=eng.train data.val_file=eng.testa data.test_file=eng.testb \
        data.scheme=IOB1
    python recipes/ner_bert.py -m parallel.tensor=1,2 trainer.devices=2

With trainer.devices > 1 on one node the recipe starts its ranks itself (torchrun); across nodes, run
it under torchrun on every node with trainer.num_nodes set.
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
from lightning_mp.tasks.ner.recipe import check_config, run_ner  # noqa: E402


@hydra.main(config_path="../conf", config_name="ner_bert", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    check_config(cfg)  # bad overrides fail here, before any rank is started
    exit_code = launch_ranks_if_needed(cfg, Path(__file__).resolve())
    if exit_code is not None:
        if exit_code != 0:
            raise SystemExit(exit_code)
        return None
    return run_ner(cfg, original_cwd=Path(hydra.utils.get_original_cwd()), run_dir=Path(os.getcwd()))


if __name__ == "__main__":
    main()
