"""From a composed Hydra config (conf/sft_llm.yaml) to a fine-tuned, evaluated and exported causal LM.

Held-out reply-token perplexity is measured before and after training (the same held-out split, the
same strategy), a few prompts are answered greedily before and after, and the model is exported as a
Hugging Face directory. The last line printed is ``held-out perplexity <before> -> <after>``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig

from lightning_mp.checkpoint.export import export_hf_model
from lightning_mp.tasks import common
from lightning_mp.tasks.llm.data import cache_dir, smollm2_gguf
from lightning_mp.tasks.llm.datamodule import ChatDataModule
from lightning_mp.tasks.llm.generate import answer, load_for_generation
from lightning_mp.tasks.llm.module import CausalLM, prepare_gguf

SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "max_position_embeddings", "tie_word_embeddings", "rope_theta")


def model_config(cfg: DictConfig) -> Any:
    """The transformers config of the shape the ``model`` group states (``family`` = its model_type)."""
    from transformers import AutoConfig

    m = cfg.model
    return AutoConfig.for_model(m.family, **{k: m[k] for k in SHAPE_KEYS if m.get(k) is not None})


def model_source(cfg: DictConfig, original_cwd: Path, prepare: bool = True) -> Any:
    """A local Hugging Face directory, or a config (random init). The default SmolLM2 GGUF file is turned
    into a Hugging Face directory once, in the cache (``prepare=False``: only where it will be)."""
    m = cfg.model
    if m.name_or_path:
        return common.local_or_hub(m.name_or_path, original_cwd)
    if m.get("gguf"):
        target = cache_dir() / m.gguf
        return str(prepare_gguf(smollm2_gguf(), target) if prepare else target)
    return model_config(cfg)


def architecture(cfg: DictConfig, original_cwd: Path) -> Any:
    """The model's transformers config, read without loading weights (GGUF: its metadata only)."""
    from transformers import AutoConfig

    m = cfg.model
    if m.name_or_path:
        return AutoConfig.from_pretrained(common.local_or_hub(m.name_or_path, original_cwd))
    if m.get("gguf"):
        prepared = cache_dir() / m.gguf
        if (prepared / "config.json").is_file():
            return AutoConfig.from_pretrained(prepared)
        gguf = smollm2_gguf()
        return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return model_config(cfg)


def model_shape(cfg: DictConfig, original_cwd: Path) -> Any:
    """The planner's shape of the model (read from its config only: no weights, no GGUF tensors)."""
    from lightning_mp.planner import shape_from_config

    return shape_from_config(architecture(cfg, original_cwd))


def planned_layout(cfg: DictConfig, original_cwd: Path) -> Any:
    """The planner's choice for this model, cluster, global batch and ``data.max_length`` (``parallel=auto``):
    conversations are padded per batch, so the longest one a batch may hold is what must fit. Loss
    parallelism only where ``parallel.loss_parallel`` allows it (``conf/parallel/auto.yaml`` does: this
    recipe's module reads only ``.loss``)."""
    from lightning_mp.planner import Cluster, choose, device_memory_gb

    t = cfg.trainer
    memory_gb = t.get("device_memory_gb") or device_memory_gb(t.accelerator)
    cluster = Cluster(devices_per_node=int(t.devices), num_nodes=int(t.num_nodes), device_memory_gb=float(memory_gb))
    best, _ = choose(model_shape(cfg, original_cwd), cluster, int(t.batch_size), int(cfg.data.max_length),
                     str(t.precision), loss_parallel=bool(cfg.parallel.get("loss_parallel", False)))
    return best


def parallel_kwargs(cfg: DictConfig, original_cwd: Path) -> dict[str, Any]:
    """The strategy's arguments from ``parallel`` (the degrees given, or the planner's with ``parallel=auto``)."""
    return common.parallel_kwargs(cfg, auto=lambda cfg: planned_layout(cfg, original_cwd).layout.strategy_kwargs())


def check_config(cfg: DictConfig, original_cwd: Path) -> None:
    """Fail on bad overrides at once, before weights are loaded or processes started: the strategy's own
    checks on the model built on the meta device (degrees, heads and KV heads, layers per stage, batch)."""
    if cfg.model.get("task") != "causal_lm":
        raise ValueError(f"model={cfg.model.name} is not a causal LM; this recipe takes model=smollm2, llama3-8b,"
                         " llama3-70b, qwen2.5-7b (or model.name_or_path=<a causal-LM directory>).")
    if cfg.data.get("task") != "causal_lm":
        raise ValueError(f"data={cfg.data.get('name')} is not chat data; this recipe takes data=chatterbot"
                         " (or data.train_file=<jsonl>).")
    from transformers import AutoModelForCausalLM

    if cfg.parallel.get("auto"):
        print(f"parallel=auto: {planned_layout(cfg, original_cwd).summary()}", flush=True)
    config = architecture(cfg, original_cwd)
    common.check_parallel(cfg, parallel_kwargs(cfg, original_cwd), lambda: AutoModelForCausalLM.from_config(config),
                          int(config.num_hidden_layers))


def _say(trainer: L.Trainer, text: str) -> None:
    if trainer.is_global_zero:
        print(text, flush=True)


def _generate(source: Any, prompts: list[str], max_new_tokens: int) -> list[str]:
    model, tokenizer = load_for_generation(source)
    return answer(model, tokenizer, prompts, max_new_tokens)


def _release_training_state(trainer: L.Trainer, module: L.LightningModule) -> None:
    """After fit, gradients and optimizer state (3x the weights with AdamW) are not used again: the final
    validation loads weights only, and rank 0 then loads the exported model for generation beside them."""
    module.zero_grad(set_to_none=True)
    for optimizer in trainer.optimizers:
        optimizer.state.clear()


def run_sft(cfg: DictConfig, original_cwd: Path, run_dir: Path) -> dict[str, float]:
    """Train, evaluate before/after, answer prompts before/after, export; returns the perplexities."""
    from transformers import AutoTokenizer

    L.seed_everything(cfg.seed, workers=True)
    common.unmap_large_allocations()  # freed activations and training state leave the process (see there)
    t, d, g = cfg.trainer, cfg.data, cfg.generation
    kwargs = parallel_kwargs(cfg, original_cwd)
    source = model_source(cfg, original_cwd)
    if not isinstance(source, str):
        raise ValueError(f"model={cfg.model.name} is a shape without weights (for planning and GPUs); fine-tuning"
                         " needs model.name_or_path=<a Hugging Face directory>.")
    tokenizer = AutoTokenizer.from_pretrained(source)
    datamodule = ChatDataModule(
        tokenizer, train_file=str(original_cwd / d.train_file) if d.train_file else None,
        global_batch_size=int(t.batch_size), max_length=int(d.max_length), held_out_fraction=float(d.held_out_fraction),
        split_seed=int(d.split_seed), shuffle_seed=int(cfg.seed), max_train_examples=d.max_train_examples,
        num_workers=int(d.num_workers))
    module = CausalLM(source, learning_rate=t.learning_rate, weight_decay=t.weight_decay, warmup_ratio=t.warmup_ratio)
    checkpoint = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best-{epoch}-{val_loss:.4f}",
                                 monitor="val_loss", mode="min", save_top_k=1)
    # Each data-parallel rank takes its rows of every global batch itself (RankBatches).
    trainer = common.build_trainer(cfg, kwargs, run_dir, checkpoint, use_distributed_sampler=False)
    prompts = list(g.prompts) if g.enabled else []

    # Before the first validate, while the module's model is still on the meta device: rank 0's copy for
    # generation is then the only model in memory (it is freed before the strategy loads the shards).
    answers_before = _generate(source, prompts, int(g.max_new_tokens)) if prompts and trainer.is_global_zero else []
    before = trainer.validate(module, datamodule=datamodule, verbose=False)[0]["val_perplexity"]
    _say(trainer, f"held-out perplexity before fine-tuning: {before:.3f}")
    trainer.fit(module, datamodule=datamodule)
    _release_training_state(trainer, module)
    after = trainer.validate(module, datamodule=datamodule, verbose=False,
                             ckpt_path="best" if checkpoint.best_model_path else None)[0]["val_perplexity"]
    export_dir = export_hf_model(module, "model", run_dir / cfg.export_dir, tokenizer=tokenizer)
    result = {"perplexity_before": before, "perplexity_after": after}
    if trainer.is_global_zero:
        answers_after = _generate(export_dir, prompts, int(g.max_new_tokens)) if prompts else []
        record = [{"prompt": p, "before": b, "after": a} for p, b, a in zip(prompts, answers_before, answers_after)]
        (run_dir / "generations.json").write_text(json.dumps({**result, "answers": record}, indent=1))
        for item in record:
            print(f"\n> {item['prompt']}\n  before: {item['before']}\n  after:  {item['after']}")
        print(f"\nHugging Face model exported to {export_dir}; best checkpoint {checkpoint.best_model_path or '-'}")
        print(f"held-out perplexity {before:.3f} -> {after:.3f}", flush=True)
    if dist.is_initialized():
        dist.barrier()
    if not (math.isfinite(before) and math.isfinite(after)):
        raise RuntimeError(f"held-out perplexity is not finite ({before} -> {after}).")
    return result

