"""Hugging Face GPT-2: GPT2Model and GPT2LMHeadModel (transformers ships no tp/pp plan for it).

GPT-2's linear layers are ``Conv1D``: the weight is stored transposed, ``(in, out)``, so column-wise
means sharding weight dim 1 and row-wise weight dim 0 — the opposite of ``nn.Linear``
(``parallel/styles.py``: TransposedColwise / TransposedRowwise). The MLP is split Megatron-style
(``c_fc`` column-wise, ``mlp.c_proj`` row-wise). Attention's ``c_attn`` packs q, k and v side by side in
one output, so a contiguous column shard is not whole heads: its output is gathered and every tensor
rank runs all heads, then ``attn.c_proj`` splits its replicated input (what transformers' own plans do
for fused q/k/v, e.g. Phi-3's ``colwise_gather_output`` / ``rowwise_split_input``). The weights of both
are still sharded. Embeddings stay replicated; an untied ``lm_head`` is column-wise with its output
gathered.

Sequence parallelism (GPT2LMHeadModel): ``ln_1``/``ln_2``/``ln_f`` and the residual stream on sequence
shards, ``attn`` and ``mlp`` gathering their input, both ``c_proj`` reduce-scattering their output.

Pipeline stages use the same own-code pieces as the families transformers plans (``plans/hf.py``):
``wte``/``wpe``/``drop`` on the first stage, blocks, ``ln_f`` and ``lm_head`` on the last.
"""

from __future__ import annotations

import sys

from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleOutput, SequenceParallel

from lightning_mp.parallel.styles import GatherSequence, TransposedColwise, TransposedRowwise
from lightning_mp.plans import ModelPlan
from lightning_mp.plans.hf import is_tied, own_code_pipeline


def is_gpt2(module: nn.Module) -> bool:
    if sys.modules.get("transformers") is None:  # not imported means it cannot be a HF model
        return False
    from transformers import GPT2LMHeadModel, GPT2Model

    return isinstance(module, (GPT2Model, GPT2LMHeadModel))


def gpt2_plan(model: nn.Module) -> ModelPlan:
    from transformers import GPT2LMHeadModel

    causal = isinstance(model, GPT2LMHeadModel)
    prefix = "transformer." if causal else ""
    blocks = f"{prefix}h"
    config = model.config
    styles = {
        f"{blocks}.*.attn.c_attn": TransposedColwise(gather_output=True),
        f"{blocks}.*.attn.c_proj": TransposedRowwise(split_input=True),
        f"{blocks}.*.mlp.c_fc": TransposedColwise(),
        f"{blocks}.*.mlp.c_proj": TransposedRowwise(),
    }
    divisible = {"n_embd": config.n_embd, "n_inner": config.n_inner or 4 * config.n_embd}
    if causal and not is_tied(model):
        styles["lm_head"] = ColwiseParallel(output_layouts=Replicate())
        divisible["vocab_size"] = config.vocab_size
    first = tuple(f"{prefix}{name}" for name in ("wte", "wpe", "drop"))
    return ModelPlan(
        tensor_parallel=styles, blocks=blocks, divisible_sizes=divisible, name=type(model).__name__,
        pipeline=own_code_pipeline(model, blocks, first, (f"{prefix}ln_f",), ("lm_head",) if causal else ()),
        shifted_labels=causal, head="lm_head" if "lm_head" in styles else None,
        sequence_parallel=_sequence_parallel(model, blocks) if causal and not config.add_cross_attention else None,
    )


def _sequence_parallel(model: nn.Module, blocks: str) -> dict:
    """GPT-2's block with sequence parallelism: ``ln_1``, ``ln_2``, ``ln_f`` and the residual stream on the
    sequence shards; ``attn`` and ``mlp`` gather their input, their row-wise ``c_proj`` reduce-scatters back
    into shards. The embeddings' sum runs whole (``wte`` is replicated) and ``drop`` hands over this rank's
    shard; the head gathers (column-wise when untied, replicated when tied to ``wte``)."""
    sequence = Shard(1)
    head = GatherSequence() if is_tied(model) else ColwiseParallel(input_layouts=sequence, output_layouts=Replicate())
    return {
        "transformer.drop": PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=sequence,
                                                use_local_output=False),
        f"{blocks}.*.ln_1": SequenceParallel(),
        f"{blocks}.*.attn": GatherSequence(),
        f"{blocks}.*.attn.c_attn": TransposedColwise(gather_output=True),
        f"{blocks}.*.attn.c_proj": TransposedRowwise(split_input=True, output_layout=sequence),
        f"{blocks}.*.ln_2": SequenceParallel(),
        f"{blocks}.*.mlp": GatherSequence(),
        f"{blocks}.*.mlp.c_fc": TransposedColwise(),
        f"{blocks}.*.mlp.c_proj": TransposedRowwise(output_layout=sequence),
        "transformer.ln_f": SequenceParallel(),
        "lm_head": head,
    }
