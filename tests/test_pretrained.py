"""lightning_mp.from_pretrained: meta construction, each rank loading only its shards, new heads and
non-persistent buffers exactly as transformers computes them, and the sharded Hugging Face export."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import WORKERS, clean_env

import lightning_mp
from lightning_mp.checkpoint.pretrained import is_meta, materialize

sys.path.insert(0, str(WORKERS))
from pretrained import HEAD_SEED, model_inputs  # noqa: E402

VOCAB = 96


def bert_config(**overrides):
    from transformers import BertConfig

    return BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=32, **overrides)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A BertModel (no token-classification head: it is new) in an index of several files, and a full
    BertForTokenClassification in one model.safetensors."""
    from transformers import BertForTokenClassification, BertModel

    root = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(0)
    BertModel(bert_config()).save_pretrained(root / "base_sharded", max_shard_size="20KB")
    BertForTokenClassification(bert_config(num_labels=5)).save_pretrained(root / "token")
    assert (root / "base_sharded" / "model.safetensors.index.json").exists()
    assert len(list((root / "base_sharded").glob("*.safetensors"))) > 2
    return {"base_sharded": root / "base_sharded", "token": root / "token"}


def plain(cls_name: str, path: Path, **kwargs):
    import transformers

    torch.manual_seed(HEAD_SEED)
    return getattr(transformers, cls_name).from_pretrained(str(path), **kwargs).eval()


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


# ---------------------------------------------------------------- sharded layouts, 4 ranks
LAYOUTS = {
    "dp2xtp2": {"data_parallel_size": 2, "tensor_parallel_size": 2},
    "pp2xdp2": {"data_parallel_size": 2, "pipeline_parallel_size": 2},
}
CASES = {"dp2xtp2": ("base_sharded", {"num_labels": 3}), "pp2xdp2": ("token", {})}


def run_pretrained_worker(tmp_path: Path, model_dir: Path, layout: dict, kwargs: dict, *extra: str,
                          devices: int = 4) -> list[dict] | tuple[list[dict], list[dict]]:
    """Every rank's results; with ``--plain-too`` among ``extra``, (those, the same layout's plain run's)."""
    out = tmp_path / f"result-{len(list(tmp_path.iterdir()))}"
    cmd = [sys.executable, str(WORKERS / "pretrained.py"), "--out", str(out), "--model-dir", str(model_dir),
           "--devices", str(devices), "--layout", json.dumps(layout), "--kwargs", json.dumps(kwargs), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=clean_env(), cwd=tmp_path)
    if proc.returncode != 0:
        raise AssertionError(f"worker failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-6000:]}")
    results = [torch.load(f"{out}.rank{rank}.pt", weights_only=False) for rank in range(devices)]
    if "--plain-too" not in extra:
        return results
    return results, [torch.load(f"{out}.plain.rank{rank}.pt", weights_only=False) for rank in range(devices)]


def logits_by_row(results: list[dict]) -> torch.Tensor:
    rows = {index: row for result in results for index, row in result["logits"].items()}
    return torch.stack([rows[i] for i in sorted(rows)])


@pytest.mark.slow
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


@pytest.mark.slow
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
