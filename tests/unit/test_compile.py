"""compile=True: every block compiled (torch.compile, inductor), composed with tensor parallelism, FSDP2, pipelines
and activation checkpointing, gives the single-process eager losses and weights (3 SGD steps, fp32, rows padded to
each batch's own longest so the width changes between steps) while new widths compile nothing more; what cannot
work is refused before launch."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from helpers import tiny_hf
from helpers.launch import ROOT
from helpers.ops import MATMULS, backward_ops
from lightning_mp import ModelParallelStrategy
from lightning_mp.config import ParallelConfig
from lightning_mp.parallel.activation_checkpointing import apply_activation_checkpointing
from lightning_mp.parallel.compile import apply_compile, compile_counts
from lightning_mp.plans import find_plan
from lightning_mp.tasks.common import parallel_kwargs


def test_compile_needs_a_plan_with_blocks(no_child_processes):
    class NoPlan(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(4, 4)

    with pytest.raises(ValueError, match=r"compile=True compiles each block of the model .*, but no plan is known for"
                                         r" the models inside NoPlan"):
        L.Trainer(accelerator="cpu", devices=2, strategy=ModelParallelStrategy(compile=True), logger=False,
                  max_steps=1).fit(NoPlan())
    module = tiny_hf.TinyHFModule("llama", layers=2)
    with pytest.raises(ValueError, match="compile=True compiles each block of the model .*, but the plan for user plan"
                                         " names no blocks"):
        L.Trainer(accelerator="cpu", devices=2, logger=False, max_steps=1,
                  strategy=ModelParallelStrategy(compile=True, plan={"model.lm_head": "colwise"})).fit(module)


REFUSED_WITH_TENSOR_PARALLELISM = {
    "sequence_parallel": ({"sequence_parallel": True, "data_parallel_mode": "replicated"},
                          r"compile=True with tensor_parallel_size=2 and sequence_parallel=True is not supported yet:"
                          r" torch \S+ .*RecursionError.*https://github.com/pytorch/pytorch/issues/152954\)\. Use"
                          r" sequence_parallel=False"),
    "checkpointing": ({"activation_checkpointing": "full", "data_parallel_mode": "replicated"},
                      r"compile=True with tensor_parallel_size=2 and activation_checkpointing='full' is not supported"
                      r" yet: .*DeviceMesh.*Use activation_checkpointing=False"),
    "fsdp": ({}, r"compile=True with tensor_parallel_size=2 and parameters sharded over 2 data-parallel ranks \(FSDP\)"
                 r" is not supported yet: .*Use data_parallel_mode='replicated'"),
}


@pytest.mark.parametrize("name", list(REFUSED_WITH_TENSOR_PARALLELISM))
def test_what_compile_cannot_trace_with_tensor_parallelism_is_refused_before_launch(name, no_child_processes):
    switches, message = REFUSED_WITH_TENSOR_PARALLELISM[name]
    with pytest.raises(ValueError, match=message):
        L.Trainer(accelerator="cpu", devices=4, logger=False,
                  strategy=ModelParallelStrategy(tensor_parallel_size=2, compile=True, **switches))
    # The same layout without compile is accepted.
    L.Trainer(accelerator="cpu", devices=4, logger=False, strategy=ModelParallelStrategy(tensor_parallel_size=2,
                                                                                         **switches))


def test_compile_switch_names_a_backend_and_reaches_the_strategy_from_the_recipes():
    with pytest.raises(ValueError, match=r"compile must be True, False or the name of a torch.compile backend \(e.g."
                                         r" .*inductor.*\), got 'inductr'"):
        ParallelConfig(compile="inductr")
    assert ModelParallelStrategy(compile=True).parallel_config.compile_backend == "inductor"
    assert ModelParallelStrategy(compile="aot_eager").parallel_config.compile_backend == "aot_eager"
    assert ModelParallelStrategy().parallel_config.compile_backend is None
    # The first step compiles (minutes on a CPU): the progress watch waits half the process-group timeout.
    assert ModelParallelStrategy(compile=True)._failure_watch.progress_timeout == 900.0
    assert ModelParallelStrategy(compile=False)._failure_watch.progress_timeout == 300.0
    parallel = OmegaConf.load(ROOT / "conf" / "parallel" / "default.yaml")
    assert parallel_kwargs(OmegaConf.create({"parallel": parallel}))["compile"] is False
    parallel.compile = True
    assert parallel_kwargs(OmegaConf.create({"parallel": parallel}))["compile"] is True
    parallel.compile = "aot_eager"
    assert parallel_kwargs(OmegaConf.create({"parallel": parallel}))["compile"] == "aot_eager"


def test_checkpointing_inside_the_forward_recomputes_like_the_hooks_and_survives_a_deep_copy():
    """Under compile, activation checkpointing is a torch.utils.checkpoint call inside each block's forward (which
    the compiler traces into its graph). Run eagerly it must already behave as the composable hooks do: unchanged
    gradients, "full" recomputing the matmuls in backward, "selective" only element-wise ops; and a copied block
    must call its own forward, not the original's."""
    torch.manual_seed(0)
    reference = tiny_hf.tiny_model("llama", layers=2).train()
    batch = tiny_hf.collate([tiny_hf.PaddedTokens("causal", size=4)[i] for i in range(4)])
    plain_ops, plain_grads = backward_ops(copy.deepcopy(reference), batch)
    ops = {}
    for mode in ("full", "selective"):
        model = copy.deepcopy(reference)
        _, hf, plan = find_plan(model)
        apply_activation_checkpointing(list(hf.get_submodule(plan.blocks)), mode, hf.model, traced=True)
        copied = copy.deepcopy(model)
        assert copied.model.layers[0].forward.__self__ is copied.model.layers[0]
        for candidate in (model, copied):
            ops[mode], grads = backward_ops(candidate, batch)
            for name, grad in grads.items():
                torch.testing.assert_close(grad, plain_grads[name], rtol=0, atol=1e-6, msg=f"{mode}: {name}")
    assert ops["full"].total(MATMULS) > plain_ops.total(MATMULS)
    assert ops["selective"].total(MATMULS) == plain_ops.total(MATMULS)
    assert plain_ops.total() < ops["selective"].total() < ops["full"].total()


def graphs_for(layers: int, widths: list[int], checkpointing: str | None = None) -> list[int]:
    """Graphs dynamo captured after each training step of a tiny Llama whose blocks are compiled as the strategy
    compiles them (the "eager" backend: dynamo's capture and guards without inductor's code generation)."""
    torch.compiler.reset()
    torch.manual_seed(0)
    model = tiny_hf.tiny_model("llama", layers=layers).train()
    _, hf, plan = find_plan(model)
    blocks = list(hf.get_submodule(plan.blocks))
    if checkpointing:
        apply_activation_checkpointing(blocks, checkpointing, hf.model, traced=True)
    apply_compile(blocks, hf.model, backend="eager", checkpointed=checkpointing is not None)
    rows = tiny_hf.PaddedTokens("causal", size=64)
    start, graphs = compile_counts()["graphs"], []
    for width in widths:
        rows_of_width = [rows[i] for i in range(len(rows)) if int(rows.lengths[i]) == width][:2]
        batch = tiny_hf.collate(rows_of_width)
        assert batch["input_ids"].shape[1] == width
        model(**batch).loss.backward()
        graphs.append(compile_counts()["graphs"] - start)
    return graphs


def test_blocks_share_their_graphs_and_new_widths_compile_nothing():
    widths = [12, 9, 11, 7]
    one_block, three_blocks = graphs_for(1, widths), graphs_for(3, widths)
    print(f"graphs after each step: 1 block {one_block}, 3 blocks {three_blocks} (widths {widths})")
    assert one_block[0] > 0
    assert three_blocks == one_block  # the second and third block reuse the first one's graphs
    assert len(set(three_blocks)) == 1  # and so does every new width


def test_checkpointed_blocks_are_captured_whole():
    """The recompute is traced into the block's graph. transformers 5.25 wraps attention's forward (``kernels``)
    in a write to a module variable, a side effect dynamo refuses inside a checkpoint: without
    ``apply_compile(checkpointed=True)`` the block fell back to eager and nothing was compiled."""
    widths = [12, 9]
    graphs = graphs_for(2, widths, checkpointing="full")
    print(f"graphs after each step with full checkpointing: {graphs} (widths {widths})")
    assert graphs[0] > 0, "nothing was compiled"
    assert graphs == graphs_for(2, widths)  # as many graphs as without checkpointing
