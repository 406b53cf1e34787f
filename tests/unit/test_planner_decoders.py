"""The planner for decoder families (Llama, Mistral, Qwen2, Qwen3): shapes read from configs, exact state,
activations against autograd, divisibility reasons, the published shapes planned quickly, parallel=auto
in the LLM recipe, and the memory model against real jobs of a tiny Llama (benchmarks/planner_memory.py)."""

from __future__ import annotations

import time

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from helpers.launch import ROOT
from lightning_mp.pipeline.split import plan_split
from lightning_mp.planner import (
    Cluster,
    DecoderShape,
    Layout,
    activation_bytes,
    choose,
    shape_from_config,
    stage_parts,
    state_bytes,
)
from lightning_mp.plans import find_plan

TINY = dict(vocab_size=500, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)


FAMILIES = [("llama", {}), ("llama", {"tie_word_embeddings": True}),
            ("llama", {"attention_bias": True, "mlp_bias": True}), ("mistral", {}), ("qwen2", {}),
            ("qwen3", {"head_dim": 24})]


def tiny(family: str, **extra):
    return AutoConfig.for_model(family, **{**TINY, **extra})


@pytest.mark.parametrize("family,extra", FAMILIES)
def test_parameter_count_is_the_hf_models(family, extra):
    config = tiny(family, **extra)
    model = AutoModelForCausalLM.from_config(config)
    shape = shape_from_config(config)
    assert shape.parameters() == sum(p.numel() for p in model.parameters())
    (single,) = state_bytes(shape, Layout(1, 1, 1))
    assert single["parameters"] == 4 * shape.parameters() and single["optimizer"] == 8 * shape.parameters()


def test_sharding_loses_and_duplicates_nothing_and_the_tied_head_is_copied_when_pipelined():
    shape = shape_from_config(tiny("llama"))
    # dp=3 × tp=2: a tensor tensor parallelism replicates is held twice (once per tensor rank), others once.
    tensors = shape.embedding_tensors() + shape.head_tensors() + shape.layer_tensors() * shape.layers
    expected = sum(torch.Size(s).numel() * (2 if style == "replicated" else 1) for s, style in tensors)
    assert sum(r["parameters"] for r in state_bytes(shape, Layout(3, 2, 1))) == 4 * expected
    tied = shape_from_config(tiny("llama", tie_word_embeddings=True))
    unpipelined = sum(r["parameters"] for r in state_bytes(tied, Layout(1, 1, 1)))
    pipelined = sum(r["parameters"] for r in state_bytes(tied, Layout(1, 1, 2)))
    assert pipelined - unpipelined == 4 * tied.vocab * tied.hidden  # the last stage's copy of the embedding


@pytest.mark.parametrize("tied", [False, True])
def test_pipeline_split_is_the_strategys(tied):
    config = LlamaConfig(**{**TINY, "num_hidden_layers": 8, "vocab_size": 3000}, tie_word_embeddings=tied)
    _, model, plan = find_plan(LlamaForCausalLM(config))
    shape = shape_from_config(config)
    for stages in (2, 4):
        bounds = [*plan_split(model, plan, stages), 8]
        expected = [bounds[i + 1] - bounds[i] for i in range(stages)]
        assert [p["layers"] for p in stage_parts(shape, Layout(1, 1, stages))] == expected


@pytest.mark.parametrize("family,extra", [("llama", {}), ("qwen2", {}), ("qwen3", {"head_dim": 24})])
@pytest.mark.parametrize("dtype,precision", [(torch.float32, "32-true"), (torch.bfloat16, "bf16-true")])
def test_activation_count_is_what_autograd_keeps(family, extra, dtype, precision):
    """One process, one forward: every storage autograd saves (parameters excluded), counted once, equals the
    planner's count — in fp32 and with bf16 weights (what FSDP gathers under bf16-mixed)."""
    config = tiny(family, **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved.setdefault(storage.data_ptr(), storage.nbytes())
        return tensor

    ids = torch.randint(1, config.vocab_size, (4, 24))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)  # no attention mask: SDPA with is_causal and enable_gqa, as on GPUs
    assert sum(saved.values()) == activation_bytes(shape_from_config(config), Layout(1, 1, 1), 4, 24, precision)


def test_divisibility_names_the_sizes_and_the_valid_degrees():
    qwen = DecoderShape("qwen2", layers=28, hidden=3584, heads=28, kv_heads=4, intermediate=18944, vocab=152064)
    assert qwen.tensor_parallel_problem(4) is None
    assert qwen.tensor_parallel_problem(8) == "tp=8 does not divide the 28 attention heads, 4 KV heads (valid: 1, 2, 4)"
    gqa = DecoderShape("llama", layers=4, hidden=96, heads=12, kv_heads=4, intermediate=96, vocab=1000)
    assert gqa.tensor_parallel_problem(6) == \
        "tp=6 does not divide the 4 KV heads, 1000 vocabulary (sharded lm_head) (valid: 1, 2, 4)"
    odd_vocab = DecoderShape("llama", layers=4, hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=1001)
    assert "1001 vocabulary (sharded lm_head)" in odd_vocab.tensor_parallel_problem(2)
    assert DecoderShape("llama", 4, 64, 4, 2, 128, 1001, tied=True).tensor_parallel_problem(2) is None  # replicated
    _, ranked = choose(qwen, Cluster(devices_per_node=8, num_nodes=2), global_batch=64, seq=4096)
    reasons = {c.layout.tensor: c.rejected for c in ranked if c.layout.tensor == 8}
    assert reasons[8] == qwen.tensor_parallel_problem(8)
    with pytest.raises(ValueError, match=r"model_type='gpt2'.*plans bert, llama, mistral, qwen2, qwen3"):
        DecoderShape.from_config(AutoConfig.for_model("gpt2"))


PUBLISHED = {  # conf/model/*.yaml: layers, hidden, heads, KV heads, FFN, vocabulary -> parameters (published)
    "llama3-8b": (LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                              num_attention_heads=32, num_key_value_heads=8), 8.03e9),
    "llama3-70b": (LlamaConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                               num_attention_heads=64, num_key_value_heads=8), 70.55e9),
    "llama3-405b": (LlamaConfig(vocab_size=128256, hidden_size=16384, intermediate_size=53248, num_hidden_layers=126,
                                num_attention_heads=128, num_key_value_heads=8), 405.85e9),
    "qwen2.5-7b": (AutoConfig.for_model("qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                                        num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4), 7.62e9),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_shapes_are_planned_in_seconds(name):
    config, parameters = PUBLISHED[name]
    shape = shape_from_config(config)
    assert shape.parameters() == pytest.approx(parameters, rel=2e-3)
    start = time.perf_counter()
    best, ranked = choose(shape, Cluster(devices_per_node=8, num_nodes=32), global_batch=256, seq=8192)
    # A guard against a combinatorial blow-up of the search (minutes), not a speed goal: about 4 s alone here,
    # and the suite shares 2 cores with multi-process tests.
    assert time.perf_counter() - start < 40
    assert best.rejected is None and best.memory.total < 80 * 2**30 * 0.9
    assert all(c.rejected for c in ranked if c.layout.tensor > 8)
    assert any("GiB per device" in (c.rejected or "") for c in ranked)  # some layouts do not fit


def test_strategy_auto_layout_plans_a_decoder_before_launch():
    import lightning as L

    from lightning_mp import ModelParallelStrategy

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = LlamaForCausalLM(tiny("llama", num_hidden_layers=4))

    strategy = ModelParallelStrategy(layout="auto", global_batch_size=8, sequence_length=64, device_memory_gb=16)
    L.Trainer(accelerator="cpu", devices=4, strategy=strategy, logger=False)
    strategy.check_model(Module())
    assert strategy.mesh_shape.world_size == 4


def test_llm_recipe_parallel_auto_gives_a_valid_layout(tmp_path, capsys):
    from hydra import compose, initialize_config_dir

    from helpers.llm_tiny import tiny_llama_dir
    from lightning_mp.tasks.llm.recipe import check_config, parallel_kwargs

    model = tiny_llama_dir(tmp_path / "tiny", heads=6, kv_heads=3)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("sft_llm", overrides=["parallel=auto", "trainer.devices=3", "trainer.batch_size=15",
                                            f"model.name_or_path={model}"])
    check_config(cfg, ROOT)  # the strategy's own checks accept the planner's choice
    assert "parallel=auto: dp=" in capsys.readouterr().out
    kwargs = parallel_kwargs(cfg, ROOT)
    assert kwargs["data_parallel_size"] * kwargs["tensor_parallel_size"] * kwargs["pipeline_parallel_size"] == 3
    assert kwargs["tensor_parallel_size"] in (1, 3)  # 6 heads / 3 KV heads
