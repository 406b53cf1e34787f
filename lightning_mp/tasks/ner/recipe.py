"""From a composed Hydra config (conf/ner_bert.yaml) to a trained, tested and exported NER model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig

from lightning_mp.checkpoint.export import export_hf_model
from lightning_mp.config import ParallelConfig
from lightning_mp.planner import Candidate, Cluster, ModelShape, choose, device_memory_gb
from lightning_mp.tasks import common
from lightning_mp.tasks.ner.data import NERDataModule, minilm_path
from lightning_mp.tasks.ner.module import TokenClassifier


def parallel_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """The short recipe names (parallel.tensor=2) mapped to the strategy's argument names; with
    ``parallel=auto``, the planner's choice."""
    return common.parallel_kwargs(cfg, auto=lambda cfg: planned_layout(cfg).layout.strategy_kwargs())


def bert_config(cfg: DictConfig) -> Any:
    """The BertConfig of the shape the ``model`` group describes (uncased BERT vocabulary)."""
    from transformers import BertConfig

    m = cfg.model
    return BertConfig(vocab_size=30522, hidden_size=m.hidden_size, num_hidden_layers=m.num_hidden_layers,
                      num_attention_heads=m.num_attention_heads, intermediate_size=m.intermediate_size)


def model_shape(cfg: DictConfig, labels: int = 21) -> ModelShape:
    return ModelShape.from_config(bert_config(cfg), labels=labels)


def planned_layout(cfg: DictConfig) -> Candidate:
    """The planner's choice for this model, cluster, batch and sequence length (``parallel=auto``)."""
    t = cfg.trainer
    memory_gb = t.get("device_memory_gb") or device_memory_gb(t.accelerator)
    cluster = Cluster(devices_per_node=int(t.devices), num_nodes=int(t.num_nodes), device_memory_gb=float(memory_gb))
    best, _ = choose(model_shape(cfg), cluster, int(t.batch_size), int(cfg.data.max_length), str(t.precision))
    return best


def parallel_config(cfg: DictConfig) -> ParallelConfig:
    return ParallelConfig(**parallel_kwargs(cfg))


def model_source(cfg: DictConfig, original_cwd: Path) -> Any:
    """A path/hub id of pretrained weights, or a BertConfig of the chosen shape (random init)."""
    m = cfg.model
    if m.name_or_path:
        return common.local_or_hub(m.name_or_path, original_cwd)
    if m.pretrained:
        return str(minilm_path())
    return bert_config(cfg)


def check_config(cfg: DictConfig) -> None:
    """Fail on bad overrides at once, before data, models or processes are touched."""
    if cfg.parallel.get("auto"):
        print(f"parallel=auto: {planned_layout(cfg).summary()}", flush=True)
    if cfg.model.get("task", "token_classification") != "token_classification":
        raise ValueError(f"model={cfg.model.name} is a {cfg.model.task} model; the NER recipe fine-tunes BERT-family"
                         " token classifiers (model=minilm, bert-tiny ... bert-large).")
    # Shapes the model group states are checked without loading anything; a name_or_path is checked by the
    # strategy itself once the model is built.
    build = None if cfg.model.name_or_path else (lambda: _token_classifier(bert_config(cfg)))
    common.check_parallel(cfg, parallel_kwargs(cfg), build, int(cfg.model.num_hidden_layers))


def _token_classifier(config: Any) -> Any:
    from transformers import BertForTokenClassification

    return BertForTokenClassification(config)


def run_ner(cfg: DictConfig, original_cwd: Path, run_dir: Path) -> float:
    """Train, test the best checkpoint, export an HF directory; returns the test entity F1."""
    L.seed_everything(cfg.seed, workers=True)
    t, d = cfg.trainer, cfg.data
    kwargs = parallel_kwargs(cfg)
    data_size = common.mesh_shape(cfg, kwargs).data
    absolute = lambda path: str(original_cwd / path) if path else None  # noqa: E731
    source = model_source(cfg, original_cwd)
    tokenizer = cfg.model.tokenizer and common.local_or_hub(cfg.model.tokenizer, original_cwd)
    datamodule = NERDataModule(
        tokenizer_path=tokenizer or (source if isinstance(source, str) else None),
        train_file=absolute(d.train_file), val_file=absolute(d.val_file),
        test_file=absolute(d.test_file), batch_size=int(t.batch_size) // data_size, max_length=d.max_length,
        num_workers=d.num_workers, split_seed=d.split_seed, shuffle_seed=cfg.seed, hf_dataset=d.hf_dataset,
    )
    module = TokenClassifier(source, datamodule.label_list, learning_rate=t.learning_rate,
                             weight_decay=t.weight_decay, warmup_ratio=t.warmup_ratio, scheme=d.scheme)
    checkpoint = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best-{epoch}-{val_f1:.4f}",
                                 monitor="val_f1", mode="max", save_top_k=1)
    trainer = common.build_trainer(cfg, kwargs, run_dir, checkpoint)
    trainer.fit(module, datamodule=datamodule)
    trainer.test(module, datamodule=datamodule, ckpt_path="best" if checkpoint.best_model_path else None)
    f1 = float(trainer.callback_metrics.get("test_f1", float("nan")))
    export_dir = export_hf_model(module, "model", run_dir / cfg.export_dir, tokenizer=datamodule.tokenizer)
    if trainer.is_global_zero:
        print(f"\nTest entities (best checkpoint {checkpoint.best_model_path or 'last weights'}):\n"
              f"{module.test_report}")
        print(f"\ntest entity F1 = {f1:.4f}; Hugging Face model exported to {export_dir}")
    return f1
