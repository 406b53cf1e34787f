"""lightning_mp.from_pretrained for models with tied weights (tied word embeddings, BERT's MLM decoder):
tied on meta as transformers ties after loading, tied again after ``to_empty``, the tied tensor read once
from the one name a tied checkpoint holds; under a pipeline both stage copies filled from that entry."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import lightning_mp
from helpers.pretrained import HEAD_SEED, VOCAB, model_inputs, plain, tied_llama_checkpoint
from lightning_mp.checkpoint.pretrained import materialize

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory):
    return tied_llama_checkpoint(tmp_path_factory.mktemp("tied") / "llama")


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
