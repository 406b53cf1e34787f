"""Plans derived from transformers' own tp/pp plans (plans/hf.py), checked in one process: the stage
pieces reproduce the unsplit forward exactly, and what cannot work is refused before any child
process or process group exists, with the numbers or the style named."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from helpers import tiny_hf
from lightning_mp import ModelParallelStrategy
from lightning_mp.parallel.styles import HeadShardedNorm
from lightning_mp.parallel.token_weighting import labelled_tokens
from lightning_mp.pipeline.split import build_rank_modules
from lightning_mp.plans import find_plan


def fit(devices: int, module: L.LightningModule, **strategy_kwargs) -> None:
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=ModelParallelStrategy(**strategy_kwargs),
                        logger=False, enable_checkpointing=False, max_steps=1)
    trainer.fit(module, tiny_hf.loader("llama", 4))


def test_labelled_tokens_shift_for_causal_lms():
    labels = torch.tensor([[5, 6, 7, -100], [5, -100, -100, -100]])
    assert labelled_tokens(labels, -100) == 4
    assert labelled_tokens(labels, -100, shifted=True) == 2
    assert labelled_tokens(torch.tensor([1, 0, -100]), -100, shifted=True) == 2  # one label per row never shifts


@pytest.mark.parametrize("family", list(tiny_hf.FAMILIES))
def test_stages_reproduce_the_unsplit_forward(family):
    model = tiny_hf.tiny_model(family, layers=4).eval()
    task = tiny_hf.FAMILIES[family][1]
    dataset = tiny_hf.PaddedTokens(task)
    batch = tiny_hf.collate([dataset[i] for i in range(4)])
    reference = model(**batch)
    _, _, plan = find_plan(model)
    assert plan.shifted_labels == (task == "causal")
    first, last = (build_rank_modules(model, plan, {i: blocks}, 2)[1][0]
                   for i, blocks in enumerate([range(2), range(2, 4)]))
    assert {n for n, _ in first.named_parameters()} | {n for n, _ in last.named_parameters()} == \
        {n for n, _ in model.named_parameters()}
    inputs = {"attention_mask": batch["attention_mask"]}
    logits = last(first(batch["input_ids"], **inputs), **inputs)
    output = plan.pipeline.model_output(last, logits, {"labels": batch["labels"]})
    assert torch.equal(logits, reference.logits)
    assert torch.equal(output.loss, reference.loss)


def test_hf_styles_map_to_torch_styles():
    _, _, plan = find_plan(tiny_hf.tiny_model("qwen3"))
    styles = plan.tensor_parallel
    assert isinstance(styles["model.layers.*.self_attn.k_proj"], ColwiseParallel)
    assert isinstance(styles["model.layers.*.mlp.down_proj"], RowwiseParallel)
    assert isinstance(styles["model.layers.*.self_attn.q_norm"], HeadShardedNorm)
    assert isinstance(styles["model.embed_tokens"], RowwiseParallel)  # vocabulary-parallel embedding
    assert plan.divisible_sizes == {"num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64,
                                    "vocab_size": tiny_hf.VOCAB}


def test_tied_embeddings_stay_replicated_over_tensor_ranks():
    _, _, plan = find_plan(tiny_hf.tiny_model("llama", tie_word_embeddings=True))
    assert "lm_head" not in plan.tensor_parallel and "model.embed_tokens" not in plan.tensor_parallel
    assert "vocab_size" not in plan.divisible_sizes


def test_key_value_heads_must_divide_before_launch(no_child_processes):
    module = tiny_hf.TinyHFModule("llama", layers=2)  # 4 heads, 2 key/value heads
    with pytest.raises(ValueError) as error:
        fit(4, module, tensor_parallel_size=4)
    assert "tensor_parallel_size=4 does not divide num_key_value_heads=2 of LlamaForCausalLM" in str(error.value)
    assert "valid tensor_parallel_size values for this model: 1, 2" in str(error.value)


def test_mixture_of_experts_is_refused_under_tensor_parallelism(no_child_processes):
    module = tiny_hf.TinyHFModule("llama", layers=2)
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("mixtral", vocab_size=96, hidden_size=32, num_attention_heads=4,
                                  num_key_value_heads=2,
                                  intermediate_size=64, num_hidden_layers=2, num_local_experts=4)
    module.model = AutoModelForCausalLM.from_config(config)
    # Refused before launch, naming the model and its experts (transformers' style names vary by release).
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2, but MixtralForCausalLM is a mixture-of-experts"
                                         r" model \(4 experts[;)]"):
        fit(2, module, tensor_parallel_size=2)


def test_unknown_style_is_refused_before_launch(no_child_processes, monkeypatch):
    module = tiny_hf.TinyHFModule("llama", layers=2)
    plan = dict(module.model.tp_plan, **{"model.layers.*.mlp.gate_proj": "local_colwise"})
    monkeypatch.setattr(type(module.model), "tp_plan", property(lambda self: plan))
    with pytest.raises(ValueError) as error:
        fit(2, module, tensor_parallel_size=2)
    message = str(error.value)
    assert "uses style(s) local_colwise, which lightning_mp does not support" in message
    assert "supported styles: colwise, colwise_rep, colwise_gather_output, rowwise" in message


def test_causal_lm_without_a_plan_is_refused_under_tensor_parallelism(no_child_processes):
    module = tiny_hf.TinyHFModule("llama", layers=2)
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("bloom", vocab_size=96, hidden_size=32, n_head=4, n_layer=2)
    module.model = AutoModelForCausalLM.from_config(config)
    _, _, plan = find_plan(module)
    assert plan.shifted_labels  # data parallelism still counts its labels shifted
    with pytest.raises(ValueError, match="transformers declares no tensor/pipeline plan for BloomForCausalLM"):
        fit(2, module, tensor_parallel_size=2)


def test_tie_across_stages_on_one_rank_is_refused_before_launch(no_child_processes):
    module = tiny_hf.TinyHFModule("llama", layers=4, tie_word_embeddings=True)
    with pytest.raises(ValueError, match=r"LlamaForCausalLM ties model.embed_tokens.weight to lm_head.weight, and"
                                         r" schedule 'zbv_zero_bubble' puts the first and the last stage"
                                         r" on the same rank"):
        fit(2, module, pipeline_parallel_size=2, pipeline_schedule="zbv_zero_bubble", microbatches=4)


def test_gpt2_conv1d_layers_shard_transposed():
    from lightning_mp.parallel.styles import TransposedColwise, TransposedRowwise

    _, _, plan = find_plan(tiny_hf.tiny_model("gpt2"))
    styles = plan.tensor_parallel
    assert isinstance(styles["transformer.h.*.mlp.c_fc"], TransposedColwise)
    assert isinstance(styles["transformer.h.*.mlp.c_proj"], TransposedRowwise)
    assert styles["transformer.h.*.attn.c_attn"].gather_output  # fused q/k/v: not whole heads per rank
    assert plan.shifted_labels and plan.pipeline.first == ("transformer.wte", "transformer.wpe", "transformer.drop")


@pytest.mark.parametrize("family,prefix", [("roberta", "roberta"), ("xlm-roberta", "roberta"), ("electra", "electra"),
                                           ("distilbert", "distilbert")])
def test_encoder_families_get_shipped_plans(family, prefix):
    _, _, plan = find_plan(tiny_hf.tiny_model(family))
    assert plan.blocks.startswith(prefix) and plan.tensor_parallel and plan.pipeline is not None
    assert not plan.shifted_labels


@pytest.mark.parametrize("family,kept", [("llama", "model.model.embed_tokens.weight"),
                                         ("gpt2", "model.transformer.wte.weight")])
def test_checkpoints_keep_the_tied_name_save_pretrained_keeps(family, kept):
    from lightning_mp.checkpoint.tied import stored_key, tied_names

    module = tiny_hf.TinyHFModule(family, tie_word_embeddings=True)
    assert tied_names(module) == {"model.lm_head.weight": kept}
    assert stored_key("state.model.lm_head.weight.exp_avg", tied_names(module), optimizer=True) == \
        f"state.{kept}.exp_avg"
    assert tied_names(tiny_hf.TinyHFModule(family)) == {}


@pytest.mark.parametrize(("family", "overrides", "enters", "leaves"), [
    ("gpt2", {}, "transformer.drop", "lm_head"),
    ("distilbert", {}, "distilbert.embeddings", "classifier"),
    ("electra", {}, "electra.embeddings_project", "classifier"),  # narrower embeddings: the projection shards
    ("llama", {"tie_word_embeddings": True}, "model.embed_tokens", "lm_head"),
], ids=["gpt2", "distilbert", "electra", "llama-tied"])
def test_sequence_parallel_plans_enter_and_leave_the_sequence_shards(family, overrides, enters, leaves):
    """Where each family's residual stream becomes sequence shards, and where the head gathers them; every
    entry matches a module of the model (the plan is applied with the same globs)."""
    from torch.distributed.tensor.parallel import PrepareModuleOutput

    from lightning_mp.parallel.styles import GatherSequence
    from lightning_mp.parallel.tensor import expand_globs

    model = tiny_hf.tiny_model(family, layers=2, **overrides)
    _, _, plan = find_plan(model)
    sequence_parallel = plan.sequence_parallel
    assert sequence_parallel is not None
    expand_globs(model, sequence_parallel)
    entry, head = sequence_parallel[enters], sequence_parallel[leaves]
    if family == "gpt2":  # untied: the head stays column-wise, its input the final norm's shards
        assert isinstance(entry, PrepareModuleOutput) and isinstance(head, ColwiseParallel)
    else:
        assert isinstance(entry, PrepareModuleOutput) and isinstance(head, GatherSequence)
