"""lightning_mp.from_pretrained under sharded layouts (4 ranks): each rank loads only its shards, logits and
exports equal the class's own from_pretrained; Llama's rotary buffers recomputed as transformers does.
The one-process checks: ``tests/unit/test_pretrained.py``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers.pretrained import (
    VOCAB,
    bert_checkpoints,
    logits_by_row,
    model_inputs,
    plain,
    run_pretrained_worker,
)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    return bert_checkpoints(tmp_path_factory.mktemp("pretrained"))


# ---------------------------------------------------------------- sharded layouts, 4 ranks
LAYOUTS = {
    "dp2xtp2": {"data_parallel_size": 2, "tensor_parallel_size": 2},
    "pp2xdp2": {"data_parallel_size": 2, "pipeline_parallel_size": 2},
}


CASES = {"dp2xtp2": ("base_sharded", {"num_labels": 3}), "pp2xdp2": ("token", {})}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sharded_loading_and_export_equal_from_pretrained(tmp_path, checkpoints, layout):
    from transformers import AutoModelForTokenClassification

    name, kwargs = CASES[layout]
    reference = plain("AutoModelForTokenClassification", checkpoints[name], **kwargs)
    export = tmp_path / "exported"
    # One launch: lightning_mp.from_pretrained, then the class's own from_pretrained under the same layout.
    meta, same_layout = run_pretrained_worker(tmp_path, checkpoints[name], LAYOUTS[layout], kwargs,
                                              "--export", str(export), "--plain-too")
    # Loading: every weight, gathered from the shards, is the from_pretrained one bit for bit.
    expected = {f"{key}": value for key, value in reference.state_dict().items()}
    loaded = meta[0]["state_dict"]
    assert set(loaded) == set(expected)
    assert [key for key in expected if not torch.equal(loaded[key], expected[key])] == []
    # Non-persistent buffers on every rank (pipeline ranks hold their stage's).
    buffers = dict(reference.named_buffers())
    for result in meta:
        assert all(torch.equal(v, buffers[k]) for k, v in result["buffers"].items())
    assert set().union(*(result["buffers"] for result in meta)) == set(buffers)
    # Logits: bit for bit against from_pretrained sharded by the same layout (same arithmetic), and within
    # fp32 rounding of one process (tensor parallelism sums partial products in another order).
    assert torch.equal(logits_by_row(meta), logits_by_row(same_layout))
    inputs = model_inputs(VOCAB)
    with torch.no_grad():
        single = reference(**inputs).logits
    assert torch.allclose(logits_by_row(meta), single, atol=1e-5, rtol=0)
    # Export: written by every rank in pieces, merged per file, loadable by transformers, same model.
    files = sorted(p.name for p in export.iterdir())
    assert "config.json" in files and "model.safetensors.index.json" in files
    assert not (tmp_path / ".exported.partial").exists()
    assert len([f for f in files if f.endswith(".safetensors")]) == 4
    reloaded = AutoModelForTokenClassification.from_pretrained(str(export)).eval()
    assert all(torch.equal(value, expected[key]) for key, value in reloaded.state_dict().items())
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, single)


@pytest.mark.parametrize("layout,devices", [({"data_parallel_size": 2}, 2),
                                            ({"data_parallel_size": 2, "tensor_parallel_size": 2}, 4),
                                            ({"data_parallel_size": 2, "pipeline_parallel_size": 2}, 4)],
                         ids=["dp2", "dp2xtp2", "pp2xdp2"])
def test_llama_rotary_buffers_and_weights(tmp_path, layout, devices):
    """A decoder with rotary embeddings (non-persistent ``inv_freq`` recomputed after ``to_empty``), fully
    sharded (and tensor parallel with the decoder plan), exported and reloaded."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    reference = plain("AutoModelForCausalLM", tmp_path / "llama")
    export = tmp_path / "exported"
    results = run_pretrained_worker(tmp_path, tmp_path / "llama", layout, {},
                                    "--cls", "AutoModelForCausalLM", "--export", str(export), devices=devices)
    expected = reference.state_dict()
    assert [key for key, value in results[0]["state_dict"].items() if not torch.equal(value, expected[key])] == []
    buffers = dict(reference.named_buffers())
    assert {"model.rotary_emb.inv_freq"} <= set(buffers)
    for result in results:
        assert set(result["buffers"]) == set(buffers)
        assert all(torch.equal(value, buffers[key]) for key, value in result["buffers"].items())
    inputs = model_inputs(VOCAB)
    with torch.no_grad():
        single = reference(**inputs).logits
    assert torch.allclose(logits_by_row(results), single, atol=1e-5, rtol=0)
    reloaded = AutoModelForCausalLM.from_pretrained(str(export)).eval()
    assert all(torch.equal(value, expected[key]) for key, value in reloaded.state_dict().items())
