"""The planner models sequence parallelism, loss parallelism and selective activation checkpointing: what
selective checkpointing keeps is what the count says, the search turns the switches on only where the
strategy accepts them, and layout="auto" hands its choice to the strategy. Real jobs with the switches on
are in tests/distributed/test_planner_decoders.py::test_memory_model_matches_real_llama_jobs."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from lightning_mp import ModelParallelStrategy
from lightning_mp.config import ParallelConfig
from lightning_mp.parallel.activation_checkpointing import apply_activation_checkpointing
from lightning_mp.planner import Cluster, Layout, ModelShape, activation_bytes, choose, memory, shape_from_config
from lightning_mp.planner.measure import SavedActivationBytes
from lightning_mp.plans import find_plan

TINY = dict(vocab_size=500, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)
LLAMA3_70B = LlamaConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                         num_attention_heads=64, num_key_value_heads=8)


@pytest.mark.parametrize("family,extra", [("llama", {}), ("qwen3", {"head_dim": 24})])
@pytest.mark.parametrize("dtype,precision", [(torch.float32, "32-true"), (torch.bfloat16, "bf16-true")])
def test_selective_checkpointing_keeps_what_the_count_says(family, extra, dtype, precision):
    """One process, one forward with the strategy's selective checkpointing on every block: the storages
    kept at the end of the forward (autograd's saved tensors outside the blocks, each block's input, the
    outputs the policy keeps) are the planner's count, byte for byte."""
    config = AutoConfig.for_model(family, **{**TINY, **extra})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(dtype).train()
    _, hf, plan = find_plan(model)
    apply_activation_checkpointing(list(hf.get_submodule(plan.blocks)), "selective",
                                   hf.get_submodule(plan.blocks.rpartition(".")[0]))
    saved = SavedActivationBytes()
    saved.on_train_batch_start(None, model)
    b, s = 4, 24
    ids = torch.randint(1, config.vocab_size, (b, s))
    loss = model(input_ids=ids, labels=ids).loss
    kept = saved.live
    loss.backward()
    saved.on_train_batch_end()
    shape, e = shape_from_config(config), torch.finfo(dtype).bits // 8
    rotary = 2 * s * shape.head_dim * e  # held by the checkpoints' keyword arguments, not by saved tensors
    expected = (shape.layers * shape.selective_layer_bytes(b, s, 1, e)
                + shape.stage_activation_bytes(b, s, 1, e, first=True, last=True) - rotary)
    assert kept == expected
    assert saved.live == 0  # everything kept was released by backward
    # The planner's peak: the forward's end here (the log-probabilities outweigh one layer's recomputation).
    assert activation_bytes(shape, Layout(1, 1, 1, activation_checkpointing="selective"), b, s, precision) == \
        expected + rotary


def test_the_switches_divide_what_they_should():
    shape, n = shape_from_config(LLAMA3_70B), 8192
    t, e = 8, 2
    plain, sp = shape.layer_activations(1, n, t, e), shape.layer_activations(1, n, t, e, sequence_parallel=True)
    assert plain.replicated == 2 * (n * shape.hidden * (4 + 2 * e) + 4 * n)
    # The norms go to 1/t; the gathered inputs of q/k/v and gate/up stay whole (PyTorch keeps them).
    assert sp.replicated == 2 * n * shape.hidden * e and sp.total < plain.total / 2
    lp = shape.head_activation_bytes(1, n, t, e, loss_parallel=True)
    assert shape.head_activation_bytes(1, n, t, e) - lp == pytest.approx(n * shape.vocab * 4 * (1 - 1 / t))
    # torchtitan's Llama 3.1 70B layout (FSDP 32 × TP 8, full checkpointing) fits 80 GB only with SP and LP.
    layout = Layout(32, 8, 1, activation_checkpointing=True)
    on = Layout(32, 8, 1, activation_checkpointing=True, sequence_parallel=True, loss_parallel=True)
    assert memory(shape, layout, 512, 8192, "bf16-mixed").total > 80 * 2**30
    assert memory(shape, on, 512, 8192, "bf16-mixed").total < 0.9 * 80 * 2**30


def test_the_search_uses_the_switches_only_where_the_strategy_accepts_them():
    shape = shape_from_config(LLAMA3_70B)
    _, ranked = choose(shape, Cluster(devices_per_node=8, num_nodes=32), global_batch=512, seq=8192)
    layouts = [c.layout for c in ranked]
    for layout in layouts:
        applies = layout.tensor > 1 and layout.pipeline == 1
        assert layout.loss_parallel == applies  # never worse in the model: on wherever it applies
        assert applies or not layout.sequence_parallel
    assert {layout.sequence_parallel for layout in layouts
            if layout.tensor > 1 and layout.pipeline == 1} == {False, True}
    assert {layout.checkpointing for layout in layouts} == {None, "full", "selective"}
    assert any(c.layout.sequence_parallel and c.rejected is None for c in ranked)
    _, unasked = choose(shape, Cluster(devices_per_node=8, num_nodes=4), global_batch=64, seq=8192, loss_parallel=False)
    assert not any(c.layout.loss_parallel for c in unasked)
    tied = shape_from_config(LlamaConfig(**TINY, tie_word_embeddings=True))
    _, ranked = choose(tied, Cluster(devices_per_node=4), global_batch=8, seq=64)
    assert not any(c.layout.loss_parallel or c.layout.sequence_parallel for c in ranked)
    _, bert = choose(ModelShape(layers=4, hidden=64, heads=4, intermediate=128), Cluster(devices_per_node=4), 8, 64)
    assert not any(c.layout.loss_parallel or c.layout.sequence_parallel or c.layout.checkpointing == "selective"
                   for c in bert)
    with pytest.raises(ValueError, match=r"loss_parallel needs an untied lm_head"):
        activation_bytes(tied, Layout(1, 2, 1, loss_parallel=True), 8, 64)
    with pytest.raises(ValueError, match=r"sequence_parallel is not supported with a pipeline \(pp=2\)"):
        activation_bytes(shape, Layout(1, 2, 2, sequence_parallel=True), 8, 64)


@pytest.mark.parametrize("allowed", [True, False])
def test_auto_layout_hands_the_chosen_switches_to_the_strategy(allowed):
    strategy = ModelParallelStrategy(layout="auto", global_batch_size=AUTO_BATCH, sequence_length=AUTO_SEQ,
                                     device_memory_gb=AUTO_MEMORY_GB, loss_parallel=allowed)
    L.Trainer(accelerator="cpu", devices=4, strategy=strategy, logger=False)
    strategy.check_model(AutoModule())  # chooses, then resolves the plan with the chosen switches
    chosen = strategy.parallel_config
    assert strategy.mesh_shape.tensor == 4
    assert chosen.loss_parallel is allowed
    assert chosen.sequence_parallel is AUTO_EXPECTED[allowed][0]
    assert chosen.activation_checkpointing == AUTO_EXPECTED[allowed][1]


# One block and one sequence per step on 4 devices: tensor parallelism over all 4 is the only layout. With
# 150 MB per device it fits with loss parallelism alone, or, without it, with sequence parallelism and full
# checkpointing (numbers from the planner's own count; the test checks they reach the strategy).
AUTO_MODEL = dict(vocab_size=2000, num_hidden_layers=1, num_key_value_heads=4)
AUTO_BATCH, AUTO_SEQ, AUTO_MEMORY_GB = 1, 16384, 0.15
AUTO_EXPECTED = {True: (False, False), False: (True, "full")}


REASONS = (lambda layout: layout.sequence_parallel, lambda layout: layout.activation_checkpointing,
           lambda layout: layout.shard > 1 and not (layout.sequence_parallel or layout.activation_checkpointing))


def test_the_search_keeps_compiled_blocks_off_tensor_parallelism_with_what_torch_cannot_trace():
    """compile=True with tensor parallelism is refused by the strategy together with sequence parallelism,
    activation checkpointing or FSDP, so the planner never picks such a layout (tensor-parallel layouts with
    replicated data parallelism stay open); where only those fit, layout='auto' says so before any process starts."""
    shape = shape_from_config(LLAMA3_70B)
    cluster = Cluster(devices_per_node=8, num_nodes=32)
    eager, _ = choose(shape, cluster, global_batch=512, seq=8192)
    compiled, ranked = choose(shape, cluster, global_batch=512, seq=8192, compile=True)
    assert eager.layout.tensor > 1 and compiled.layout.tensor == 1
    refused = [c for c in ranked if 1 < c.layout.tensor <= 8  # wider ones would cross nodes, said first
               and (c.layout.sequence_parallel or c.layout.activation_checkpointing or c.layout.shard > 1)]
    assert refused and all(c.rejected for c in refused)  # for compile, or for a reason checked before it
    assert any("compile=True with tensor_parallel_size=" in c.rejected for c in refused)
    open_ones = [c for c in ranked if 1 < c.layout.tensor <= 8 and c not in refused]
    assert open_ones and not any("compile=True" in (c.rejected or "") for c in open_ones)
    # The strategy refuses what the planner rejects, with the planner's words: one layout for each reason.
    for candidate in [next(c for c in refused if why(c.layout) and "compile=True" in c.rejected) for why in REASONS]:
        layout = candidate.layout
        config = ParallelConfig(data_parallel_size=layout.data, tensor_parallel_size=layout.tensor,
                                pipeline_parallel_size=layout.pipeline, data_parallel_mode=layout.mode,
                                data_parallel_replicate_size=layout.replicate if layout.mode == "hybrid" else None,
                                activation_checkpointing=layout.activation_checkpointing,
                                sequence_parallel=layout.sequence_parallel, compile=True)
        with pytest.raises(ValueError) as refusal:
            config.resolve(layout.data * layout.tensor * layout.pipeline, 8)
        assert str(refusal.value) == candidate.rejected

    strategy = ModelParallelStrategy(layout="auto", global_batch_size=AUTO_BATCH, sequence_length=AUTO_SEQ,
                                     device_memory_gb=AUTO_MEMORY_GB, compile=True)
    L.Trainer(accelerator="cpu", devices=4, strategy=strategy, logger=False)
    # Without loss parallelism only tp=4 with sequence parallelism and full checkpointing fits (test above).
    with pytest.raises(ValueError, match=r"no layout of 4 devices fits this model"):
        strategy.check_model(AutoModule())


class AutoModule(L.LightningModule):
    """The model of the layout="auto" tests, built in __init__ (the planner reads its shape before launch)."""

    def __init__(self) -> None:
        super().__init__()
        self.model = LlamaForCausalLM(LlamaConfig(**{**TINY, **AUTO_MODEL}))
