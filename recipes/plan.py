"""Print the ranked layouts the planner considers for a model on a hypothetical cluster (nothing runs).

    python recipes/plan.py model=bert-large trainer.devices=8 trainer.num_nodes=16 device_memory_gb=80
    python recipes/plan.py model=bert-10b trainer.devices=8 trainer.num_nodes=128 batch_size=512 seq_len=512
    python recipes/plan.py model=llama3-70b trainer.devices=8 trainer.num_nodes=32 batch_size=256 seq_len=8192

Models: the BERT shapes (token classifier) and the causal LMs of conf/model (llama3-8b, llama3-70b,
llama3-405b, qwen2.5-7b, smollm2, or model.name_or_path=<a Hugging Face directory>: its config.json only).

Per layout: memory per device (parameters, gradients, optimizer state, activations), estimated step
time and, for layouts that do not qualify, why. The first row is what parallel=auto would choose.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

CHECKOUT = Path(__file__).resolve().parent.parent
if (CHECKOUT / "lightning_mp").is_dir():  # a checkout, runnable without install (installed, this is the package)
    sys.path.insert(0, str(CHECKOUT))

from lightning_mp.planner import Cluster, choose, format_table  # noqa: E402


def model_shape(cfg: DictConfig) -> object:
    """The planner's shape of the ``model`` group: a causal LM's from its transformers config, else BERT's."""
    if cfg.model.get("task") == "causal_lm":
        from lightning_mp.tasks.llm.recipe import model_shape as causal_lm_shape

        return causal_lm_shape(cfg, Path.cwd())
    from lightning_mp.tasks.ner.recipe import model_shape as token_classifier_shape

    return token_classifier_shape(cfg)


@hydra.main(config_path="../conf", config_name="plan", version_base="1.3")
def main(cfg: DictConfig) -> None:
    t = cfg.trainer
    cluster = Cluster(devices_per_node=int(t.devices), num_nodes=int(t.num_nodes),
                      device_memory_gb=float(cfg.device_memory_gb))
    batch = int(cfg.batch_size)
    model = model_shape(cfg)
    start = time.perf_counter()
    best, ranked = choose(model, cluster, batch, int(cfg.seq_len), str(cfg.precision))
    planned_in = time.perf_counter() - start
    print(f"{cfg.model.name}: {model.parameters() / 1e6:,.0f}M parameters, {cluster.world_size} devices"
          f" ({t.devices} per node × {t.num_nodes} nodes, {cfg.device_memory_gb:g} GB each), global batch {batch}"
          f" × {cfg.seq_len} tokens, {cfg.precision}\n")
    print(format_table(ranked, int(cfg.show)))
    print(f"\nchosen: {best.layout.describe()}\n  ModelParallelStrategy(**{best.layout.strategy_kwargs()})")
    print(f"({len(ranked)} layouts considered in {planned_in:.1f} s)")


if __name__ == "__main__":
    main()
