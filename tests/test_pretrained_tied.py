"""lightning_mp.from_pretrained for models with tied weights (tied word embeddings, BERT's MLM decoder):
tied on meta as transformers ties after loading, tied again after ``to_empty``, the tied tensor read once
from the one name a tied checkpoint holds; under a pipeline both stage copies filled from that entry."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import WORKERS
from safetensors.torch import load_file, save_file
from test_pretrained import VOCAB, logits_by_row, plain, run_pretrained_worker

import lightning_mp
from lightning_mp.checkpoint.pretrained import materialize

sys.path.insert(0, str(WORKERS))
from pretrained import HEAD_SEED, model_inputs  # noqa: E402

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def llama_config(**overrides):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=True, **overrides)


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory):
    from transformers import LlamaForCausalLM

    path = tmp_path_factory.mktemp("tied") / "llama"
    torch.manual_seed(0)
    LlamaForCausalLM(llama_config()).save_pretrained(path)
    assert HEAD not in load_file(path / "model.safetensors")  # a tied checkpoint stores the source only
    return path


def load_both(cls_name: str, path, **kwargs):
    """(the class's own from_pretrained, lightning_mp.from_pretrained materialized), same seed before each."""
    import transformers

    reference = plain(cls_name, path, **kwargs)
    torch.manual_seed(HEAD_SEED)
    model = materialize(lightning_mp.from_pretrained(getattr(transformers, cls_name), path, **kwargs))
    return reference, model


def assert_same(model, reference) -> None:
    expected = reference.state_dict()
    assert set(model.state_dict()) == set(expected)
    assert [k for k, v in model.state_dict().items() if not torch.equal(v, expected[k])] == []
    inputs = model_inputs(VOCAB)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reference(**inputs).logits)


def ties_of(model) -> list[list[str]]:
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return sorted(names for names in groups.values() if len(names) > 1)


# ---------------------------------------------------------------- one process
def test_tied_llama_is_one_parameter_read_once(tied_llama):
    from transformers import AutoModelForCausalLM

    reference, model = load_both("AutoModelForCausalLM", tied_llama)
    assert_same(model, reference)
    assert ties_of(model) == ties_of(reference) == [[EMBED, HEAD]]
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    names = lightning_mp.from_pretrained(AutoModelForCausalLM, tied_llama)._lightning_mp_pretrained.checkpoint_name
    assert names[HEAD] == names[EMBED] == EMBED  # one checkpoint entry for both names


def test_bert_masked_lm_ties_from_a_base_checkpoint(tmp_path):
    """BertForMaskedLM from a BertModel checkpoint: the decoder weight is tied to the stored word embedding;
    the decoder bias and ``cls.predictions.bias`` (tied, neither stored) are one new parameter."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=32)).save_pretrained(tmp_path / "bert")
    reference, model = load_both("BertForMaskedLM", tmp_path / "bert")
    assert_same(model, reference)
    assert ties_of(model) == ties_of(reference) == [
        ["bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight"],
        ["cls.predictions.bias", "cls.predictions.decoder.bias"]]


def _rewrite(src, dst, change) -> None:
    import shutil

    shutil.copytree(src, dst)
    tensors = load_file(src / "model.safetensors")
    change(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})


def test_checkpoint_holding_both_names(tmp_path, tied_llama):
    """Both names stored: tied when the bytes are equal; kept apart, with transformers' warning, when not."""
    _rewrite(tied_llama, tmp_path / "equal", lambda t: t.update({HEAD: t[EMBED].clone()}))
    reference, model = load_both("AutoModelForCausalLM", tmp_path / "equal")
    assert_same(model, reference)
    assert ties_of(model) == [[EMBED, HEAD]]
    _rewrite(tied_llama, tmp_path / "differ", lambda t: t.update({HEAD: t[EMBED] * 2}))
    with pytest.warns(UserWarning, match=r"holds 'model.embed_tokens.weight' and 'lm_head.weight' with different"):
        reference, model = load_both("AutoModelForCausalLM", tmp_path / "differ")
    assert_same(model, reference)
    assert ties_of(model) == ties_of(reference) == []
    assert torch.equal(model.lm_head.weight, 2 * model.model.embed_tokens.weight)


def test_checkpoint_holding_only_the_target(tmp_path, tied_llama):
    """Only lm_head stored: transformers ties the other way round (the embedding takes the head's tensor)."""
    _rewrite(tied_llama, tmp_path / "head_only", lambda t: t.update({HEAD: t.pop(EMBED)}))
    reference, model = load_both("AutoModelForCausalLM", tmp_path / "head_only")
    assert_same(model, reference)
    assert ties_of(model) == [[EMBED, HEAD]]


def test_a_stray_safetensors_file_is_not_read(tmp_path, tied_llama):
    """torch's HF reader reads every *.safetensors in the directory (the last one listed wins a name); only
    the index's files, or model.safetensors, are the checkpoint."""
    _rewrite(tied_llama, tmp_path / "stray", lambda t: None)
    stray = {key: value + 1 for key, value in load_file(tied_llama / "model.safetensors").items()}
    save_file(stray, tmp_path / "stray" / "zz-old-copy.safetensors", metadata={"format": "pt"})
    reference, model = load_both("AutoModelForCausalLM", tmp_path / "stray")
    assert_same(model, reference)


# ---------------------------------------------------------------- sharded layouts
@pytest.mark.slow
@pytest.mark.parametrize("layout,devices", [({}, 1), ({"data_parallel_size": 2, "tensor_parallel_size": 2}, 4),
                                            ({"data_parallel_size": 2, "pipeline_parallel_size": 2}, 4)],
                         ids=["1device", "dp2xtp2", "pp2xdp2"])
def test_tied_llama_under_layouts(tmp_path, tied_llama, layout, devices):
    """Weights gathered from the shards and logits equal from_pretrained's bit for bit (logits against
    from_pretrained under the same layout); one tensor wherever one rank holds both names; after two
    training steps the meta-loaded model equals the from_pretrained one trained the same way, and the two
    names (one parameter, or the two stage copies under a pipeline) are still equal."""
    reference = plain("AutoModelForCausalLM", tied_llama)
    steps = ("--fit-steps", "2")
    # Under a layout, one launch: lightning_mp.from_pretrained, then the class's own under the same layout.
    plain_too = ("--plain-too",) if devices > 1 else ()
    results = run_pretrained_worker(tmp_path, tied_llama, layout, {}, "--cls", "AutoModelForCausalLM", *steps,
                                    *plain_too, devices=devices)
    meta, same_layout = results if plain_too else (results, None)
    expected = reference.state_dict()
    loaded = meta[0]["state_dict"]
    assert set(loaded) == set(expected)
    assert [key for key in expected if not torch.equal(loaded[key], expected[key])] == []
    pipeline = layout.get("pipeline_parallel_size", 1) > 1
    for result in meta:  # the tie as the strategy left it after loading, before any forward
        shared = result["shared_after_loading"]
        if pipeline:
            assert shared == {}  # each stage's rank holds one copy
        else:
            assert [names for names, _ in shared.values()] == [[EMBED, HEAD]]
            assert all(len(storages) == 1 for _, storages in shared.values())
    if devices == 1:
        inputs = model_inputs(VOCAB)
        with torch.no_grad():
            assert torch.equal(logits_by_row(meta), reference(**inputs).logits)
    else:
        assert torch.equal(logits_by_row(meta), logits_by_row(same_layout))
        trained, plain_trained = meta[0]["trained_state_dict"], same_layout[0]["trained_state_dict"]
        assert [key for key in trained if not torch.equal(trained[key], plain_trained[key])] == []
    trained = meta[0]["trained_state_dict"]
    assert not torch.equal(trained[EMBED], expected[EMBED])  # it did train
    assert torch.equal(trained[HEAD], trained[EMBED])
