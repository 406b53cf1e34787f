"""The benchmarks' shared workload: model presets, synthetic batches, the LightningModule, and model FLOPs.

One definition, imported by peers.py and fsdp_settings.py, so that their rows measure the same job. Presets:

- ``bert-small`` (the CPU default): BERT token classifier, hidden 256, 4 layers, 8 heads, vocabulary 8,000, 9 labels;
- ``bert-large``: BERT-large's shape (hidden 1024, 24 layers, 16 heads, vocabulary 30,522) as a token classifier;
- ``llama-small``: a Llama causal LM, hidden 256, 4 layers, 8 heads / 4 KV heads, vocabulary 8,000;
- ``llama-1b``: Llama 3.2 1B's shape (hidden 2048, 16 layers, 32 heads / 8 KV heads, SwiGLU 8192, vocabulary 128,256,
  tied embeddings: 1.24 B parameters), from its config with random weights (no hub here).

Batches are synthetic, every row ``seq`` tokens (the timing rows compare strategies on one shape; the tests are
where widths change). The causal LM's labels are its inputs: Hugging Face shifts them inside the model.
"""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    "bert-small": dict(family="bert", hidden=256, layers=4, heads=8, intermediate=1024, vocab=8000),
    "bert-large": dict(family="bert", hidden=1024, layers=24, heads=16, intermediate=4096, vocab=30522),
    "llama-small": dict(family="llama", hidden=256, layers=4, heads=8, kv_heads=4, intermediate=704, vocab=8000),
    "llama-1b": dict(family="llama", hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=128256),
}
NUM_LABELS = 9

# Dense bf16/fp16 tensor-core peaks by the vendors' datasheets (FLOP/s, without sparsity), for MFU.
PEAK_HALF_PRECISION_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def build_model(preset: str):
    """A freshly initialized Hugging Face model of the preset's shape (seeded: every runner starts equal)."""
    import torch
    from transformers import BertConfig, BertForTokenClassification, LlamaConfig, LlamaForCausalLM

    shape = PRESETS[preset]
    torch.manual_seed(0)
    if shape["family"] == "bert":
        config = BertConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
                            num_attention_heads=shape["heads"], intermediate_size=shape["intermediate"],
                            num_labels=NUM_LABELS)
        return BertForTokenClassification(config)
    config = LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
                         num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                         intermediate_size=shape["intermediate"], tie_word_embeddings=True, use_cache=False,
                         max_position_embeddings=8192)
    return LlamaForCausalLM(config)


def synthetic_rows(preset: str, rows: int, seq: int):
    """``rows`` training examples of ``seq`` tokens as a map-style dataset of dicts (model inputs and labels)."""
    import torch
    from torch.utils.data import Dataset

    shape = PRESETS[preset]
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randint(1, shape["vocab"], (rows, seq), generator=generator)
    labels = inputs if shape["family"] == "llama" else torch.randint(0, NUM_LABELS, (rows, seq), generator=generator)

    class Rows(Dataset):
        def __len__(self) -> int:
            return rows

        def __getitem__(self, index):
            return {"input_ids": inputs[index], "labels": labels[index]}

    return Rows()


def lightning_module(preset: str, lr: float = 1e-4):
    """The job every runner trains: the preset's model, its own loss, AdamW."""
    import lightning as L
    import torch

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = build_model(preset)

        def training_step(self, batch, batch_idx):
            return self.model(**batch).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=lr)

    return Module


def hand_written_plan(module) -> None:
    """What a user of Lightning's own ModelParallelStrategy writes in ``configure_model`` for these models:
    column/row-wise tensor parallelism per block, then FSDP2 per block and at the root."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    tp, dp = module.device_mesh["tensor_parallel"], module.device_mesh["data_parallel"]
    model = module.model
    if hasattr(model, "bert"):
        blocks = model.bert.encoder.layer
        plan = {"attention.self.query": ColwiseParallel(), "attention.self.key": ColwiseParallel(),
                "attention.self.value": ColwiseParallel(), "attention.output.dense": RowwiseParallel(),
                "intermediate.dense": ColwiseParallel(), "output.dense": RowwiseParallel()}
    else:
        blocks = model.model.layers
        plan = {"self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
                "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel(),
                "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(),
                "mlp.down_proj": RowwiseParallel()}
    for block in blocks:
        if tp.size() > 1:
            # Hugging Face's attention reshapes to (..., -1, head_dim): each rank runs its own heads unchanged.
            parallelize_module(block, tp, plan)
        if dp.size() > 1:
            fully_shard(block, mesh=dp)
    if dp.size() > 1:
        fully_shard(model, mesh=dp)


def model_flops_per_token(model, preset: str, seq: int) -> float:
    """Training FLOPs per token, the convention behind MFU (PaLM, appendix B): 6 per weight of every matrix
    multiplication (forward 2, backward 4), plus attention's two sequence-long products, 12 · layers · hidden · seq.
    Causal attention is counted in full, as that convention does. Activation recomputation is not counted."""
    from torch import nn

    weights = {id(m.weight): m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear)}
    shape = PRESETS[preset]
    return 6 * sum(weights.values()) + 12 * shape["layers"] * shape["hidden"] * seq


def peak_flops(device_name: str, precision: str) -> float | None:
    """The datasheet peak for ``precision`` on a known GPU, else None (no MFU on CPUs or unknown chips)."""
    if not (precision.startswith("bf16") or precision.startswith("16")):
        return None
    return next((flops for chip, flops in PEAK_HALF_PRECISION_FLOPS.items() if chip in device_name), None)


def gather_per_rank(trainer, mine: dict) -> list[dict]:
    """Every rank's ``mine`` (a JSON-able dict), in rank order, on every rank; a one-process job's list of one."""
    import torch

    if trainer.world_size == 1:
        return [mine]
    ranks: list = [None] * trainer.world_size
    torch.distributed.all_gather_object(ranks, mine)
    return ranks
