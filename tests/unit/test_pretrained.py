"""lightning_mp.from_pretrained: meta construction, each rank loading only its shards, new heads and
non-persistent buffers exactly as transformers computes them, and the sharded Hugging Face export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lightning_mp
from helpers.pretrained import HEAD_SEED, VOCAB, bert_checkpoints, model_inputs, plain
from lightning_mp.checkpoint.pretrained import is_meta, materialize


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    return bert_checkpoints(tmp_path_factory.mktemp("pretrained"))


# ---------------------------------------------------------------- one process
@pytest.mark.parametrize("name,kwargs", [("base_sharded", {"num_labels": 3}), ("token", {})])
def test_meta_model_equals_from_pretrained_in_one_process(checkpoints, name, kwargs):
    from transformers import AutoModelForTokenClassification

    reference = plain("AutoModelForTokenClassification", checkpoints[name], **kwargs)
    torch.manual_seed(HEAD_SEED)
    model = lightning_mp.from_pretrained(AutoModelForTokenClassification, checkpoints[name], **kwargs)
    assert is_meta(model) and not model.training and model.config.num_labels == reference.config.num_labels
    materialize(model)
    expected = reference.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in model.state_dict().items())
    buffers = dict(reference.named_buffers())
    assert buffers and all(torch.equal(value, buffers[key]) for key, value in model.named_buffers())
    inputs = model_inputs(VOCAB)
    assert torch.equal(model(**inputs).logits, reference(**inputs).logits)


def test_new_head_depends_on_the_seed_like_from_pretrained(checkpoints):
    """The head is drawn from the global RNG at construction: another seed, another head (so the equality
    above is not an accident of an all-zero or fixed init)."""
    from transformers import AutoModelForTokenClassification

    torch.manual_seed(HEAD_SEED + 1)
    model = materialize(lightning_mp.from_pretrained(AutoModelForTokenClassification, checkpoints["base_sharded"],
                                                     num_labels=3))
    reference = plain("AutoModelForTokenClassification", checkpoints["base_sharded"], num_labels=3)
    assert not torch.equal(model.classifier.weight, reference.classifier.weight)
    assert torch.equal(model.bert.encoder.layer[0].output.dense.weight,
                       reference.bert.encoder.layer[0].output.dense.weight)


def test_export_writes_each_chunk_into_its_bytes_of_the_file(tmp_path):
    """A rank's chunk from the middle of a tensor (what tensor x data parallelism leaves a rank) lands at
    the right bytes; the other ranks' chunks fill the rest; safetensors reads the whole tensor back."""
    from safetensors.torch import load_file

    from lightning_mp.checkpoint.export import _layout, _write_chunk

    full = torch.arange(4 * 6 * 2, dtype=torch.float32).reshape(4, 6, 2)
    layout = _layout({"w": ((4, 6, 2), torch.float32), "b": ((6,), torch.bfloat16)}, world=1)
    header, size = layout.files["model.safetensors"]
    with open(tmp_path / "model.safetensors", "wb") as handle:
        handle.write(header)
        handle.truncate(size)
    for rows, columns in [(slice(0, 2), slice(0, 3)), (slice(0, 2), slice(3, 6)), (slice(2, 4), slice(0, 6))]:
        part = full[rows, columns]
        _write_chunk(tmp_path, layout, "w", part, ((4, 6, 2), torch.float32, (rows.start, columns.start, 0)))
    bias = torch.linspace(-1, 1, 6).to(torch.bfloat16)
    _write_chunk(tmp_path, layout, "b", bias, ((6,), torch.bfloat16, (0,)))
    loaded = load_file(tmp_path / "model.safetensors")
    assert torch.equal(loaded["w"], full) and torch.equal(loaded["b"], bias)


def test_other_meta_modules_are_seen_so_lightning_materializes_them_before_loading(checkpoints):
    from transformers import AutoModelForTokenClassification

    from lightning_mp.checkpoint.pretrained import meta_outside, pending_sources

    holder = torch.nn.Module()
    holder.model = lightning_mp.from_pretrained(AutoModelForTokenClassification, checkpoints["token"])
    assert [path for path, _ in pending_sources(holder)] == ["model"]
    assert not meta_outside(holder, ["model"])
    with torch.device("meta"):
        holder.extra = torch.nn.Linear(2, 2)
    assert meta_outside(holder, ["model"])


# ---------------------------------------------------------------- wrong input, before any work
def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_a_path_that_is_not_a_model_directory_is_named(tmp_path, checkpoints):
    from transformers import AutoModel

    with pytest.raises(ValueError, match=r"'.*nowhere' is not a directory"):
        lightning_mp.from_pretrained(AutoModel, tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"has no config.json: not a model directory"):
        lightning_mp.from_pretrained(AutoModel, tmp_path)
    weights_only = _copy(checkpoints["token"], tmp_path / "no_weights")
    (weights_only / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"holds no model.safetensors or model.safetensors.index.json"):
        lightning_mp.from_pretrained(AutoModel, weights_only)


def test_a_truncated_or_missing_safetensors_file_is_named(tmp_path, checkpoints):
    from transformers import AutoModel

    truncated = _copy(checkpoints["token"], tmp_path / "truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match=rf"{weights} is truncated: its tensors need \d+ bytes, the file has \d+"):
        lightning_mp.from_pretrained(AutoModel, truncated)
    weights.write_bytes(b"\x00" * 4)
    with pytest.raises(ValueError, match=r"is not a safetensors file"):
        lightning_mp.from_pretrained(AutoModel, truncated)
    sharded = _copy(checkpoints["base_sharded"], tmp_path / "sharded")
    gone = sorted(sharded.glob("model-*.safetensors"))[1]
    gone.unlink()
    with pytest.raises(FileNotFoundError, match=rf"safetensors file {gone} does not exist"):
        lightning_mp.from_pretrained(AutoModel, sharded)


def test_shapes_that_do_not_match_the_config_are_named(tmp_path, checkpoints):
    from transformers import AutoModel

    wrong = _copy(checkpoints["token"], tmp_path / "wrong")
    config = json.loads((wrong / "config.json").read_text())
    config["intermediate_size"] = 48
    (wrong / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"does not match the model its config describes: .*intermediate.dense.weight"
                                         r" \(checkpoint \[64, 32\], model \[48, 32\]\)"):
        lightning_mp.from_pretrained(AutoModel, wrong)
