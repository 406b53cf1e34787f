"""A weight tied between input and output embeddings is stored once, under the name ``save_pretrained``
keeps (``model.embed_tokens.weight`` for Llama), in the distributed checkpoint, the full checkpoint and the
Hugging Face export, whichever layout wrote them: under a pipeline the first stage's embedding and the last
stage's ``lm_head`` copy are one entry. Loading restores both copies from it, identical, in another layout
(pp2 -> 1 device, 1 device -> pp2), and the resumed run continues the uninterrupted one.

Three launches (``workers/tied_checkpoint.py``: several Trainers in one job, SGD with momentum so that the
optimizer state of every copy must be restored too): one device trains 3 steps and saves (and runs the
uninterrupted 5 steps); pp2 trains 3 steps and saves, then resumes from the one-device checkpoints; one
device resumes from the pp2 checkpoints.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open

from helpers.compare import max_weight_difference
from helpers.launch import run_worker_script
from lightning_mp.checkpoint.convert import sharded_to_full

EMBEDDING, HEAD = "model.model.embed_tokens.weight", "model.lm_head.weight"  # in the LightningModule


PIPELINE = {"pipeline_parallel_size": 2, "microbatches": 4}


TOLERANCE = 1e-5


def exported(directory) -> dict[str, torch.Tensor]:
    """Every tensor of an HF directory (one file, or one per rank with an index)."""
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            tensors.update((key, handle.get_tensor(key)) for key in handle.keys())
    return tensors


def launch(directory, devices: int, layout: dict, runs: list[dict]) -> list[dict]:
    return run_worker_script("tied_checkpoint.py", "--devices", str(devices), "--layout", json.dumps(layout),
                             "--runs", json.dumps(runs), cwd=directory, timeout=900)


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    d = tmp_path_factory.mktemp("tied")
    saves = lambda tag: {"steps": 3, "save": str(d / f"{tag}.ck"), "save_full": str(d / f"{tag}.ckpt"),  # noqa: E731
                         "export": str(d / f"{tag}.hf")}
    one = launch(d, 1, {}, [saves("one"), {"steps": 5}])
    pp = launch(d, 2, PIPELINE, [saves("pp"), {"steps": 5, "resume": str(d / "one.ck")},
                                       {"steps": 5, "resume": str(d / "one.ckpt")}])
    back = launch(d, 1, {}, [{"steps": 5, "resume": str(d / "pp.ck")}, {"steps": 5, "resume": str(d / "pp.ckpt")}])
    return {"dir": d, "one": one[0], "uninterrupted": one[1], "pp": pp[0],
            "resumed": {"one.ck -> pp2": (one[0], pp[1]), "one.ckpt -> pp2": (one[0], pp[2]),
                        "pp.ck -> 1 device": (pp[0], back[0]), "pp.ckpt -> 1 device": (pp[0], back[1])}}


@pytest.mark.parametrize("tag", ["one", "pp"])
def test_checkpoints_and_export_hold_the_tied_weight_once(jobs, tag):
    d, trained = jobs["dir"], jobs[tag]["state_dict"]
    assert trained[HEAD].equal(trained[EMBEDDING])  # both copies of the run that saved
    sharded = dcp.FileSystemReader(str(d / f"{tag}.ck")).read_metadata().state_dict_metadata
    model_keys = {k.removeprefix("state_dict.") for k in sharded if k.startswith("state_dict.")}
    assert model_keys == set(trained) - {HEAD}
    assert not [k for k in sharded if "lm_head" in k]  # neither weight nor optimizer state of the copy
    assert f"optimizer_0.state.{EMBEDDING}.momentum_buffer" in sharded
    full = torch.load(d / f"{tag}.ckpt", weights_only=False)
    assert set(full["state_dict"]) == model_keys
    assert not [k for k in full["optimizer_states"][0] if "lm_head" in k]
    assert max_weight_difference(full["state_dict"], {k: v for k, v in trained.items() if k != HEAD}) == 0
    read_back = torch.load(sharded_to_full(d / f"{tag}.ck", d / f"{tag}.converted.ckpt"), weights_only=False)
    assert read_back["state_dict"][EMBEDDING].equal(trained[EMBEDDING])
    export = exported(d / f"{tag}.hf")
    assert export["model.embed_tokens.weight"].equal(trained[EMBEDDING])
    assert set(export) == {k.removeprefix("model.") for k in trained} - {"lm_head.weight"}


def test_export_matches_save_pretrained_and_reloads_tied(jobs, tmp_path):
    from transformers import AutoModelForCausalLM

    from helpers import tiny_hf

    reference = tiny_hf.tiny_model("llama", layers=4, tie_word_embeddings=True)
    reference.save_pretrained(tmp_path / "reference")
    kept_by_transformers = set(exported(tmp_path / "reference"))
    assert "model.embed_tokens.weight" in kept_by_transformers and "lm_head.weight" not in kept_by_transformers
    trained = jobs["pp"]["state_dict"]
    for tag in ("one", "pp"):
        assert set(exported(jobs["dir"] / f"{tag}.hf")) == kept_by_transformers
    reloaded = AutoModelForCausalLM.from_pretrained(jobs["dir"] / "pp.hf")
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert reloaded.lm_head.weight.equal(trained[HEAD])


@pytest.mark.parametrize("case", ["one.ck -> pp2", "one.ckpt -> pp2", "pp.ck -> 1 device", "pp.ckpt -> 1 device"])
def test_resume_in_another_layout_restores_both_copies(jobs, case):
    saved, resumed = jobs["resumed"][case]
    uninterrupted = jobs["uninterrupted"]
    loaded = resumed["loaded"]
    assert loaded[HEAD].equal(loaded[EMBEDDING])
    assert max_weight_difference(loaded, saved["state_dict"]) == 0
    steps = sorted(resumed["losses"])
    assert steps == [4, 5]
    differences = [abs(resumed["losses"][s] - uninterrupted["losses"][s]) for s in steps]
    weights = max_weight_difference(resumed["state_dict"], uninterrupted["state_dict"])
    print(f"{case}: losses {max(differences):.1e}, weights {weights:.1e}")
    assert max(differences) < TOLERANCE and weights < TOLERANCE
    assert resumed["state_dict"][HEAD].equal(resumed["state_dict"][EMBEDDING])


def test_full_checkpoint_loads_into_a_plain_module_without_the_copy(jobs):
    """No strategy: the tied copy is not in the file; the tie fills it (strict=False), or add_tied_copies adds
    its entry for a strict load."""
    from workers.tied_checkpoint import TiedLlama

    module = TiedLlama()
    missing, unexpected = module.load_state_dict(torch.load(jobs["dir"] / "pp.ckpt", weights_only=False)["state_dict"],
                                                 strict=False)
    assert (missing, unexpected) == ([HEAD], [])
    assert module.model.lm_head.weight.equal(jobs["pp"]["state_dict"][EMBEDDING])
    from lightning_mp.checkpoint.tied import add_tied_copies

    state = torch.load(jobs["dir"] / "pp.ckpt", weights_only=False)["state_dict"]
    add_tied_copies(module, state)  # what a module's on_load_checkpoint does for a strict load
    module.load_state_dict(state)
