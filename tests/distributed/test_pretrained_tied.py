"""lightning_mp.from_pretrained of a Llama with tied word embeddings under sharded layouts (1 device, dp2×tp2,
pp2×dp2): weights, logits and two training steps equal from_pretrained's; under a pipeline both stage copies
are filled from the one checkpoint entry. The one-process checks: ``tests/unit/test_pretrained_tied.py``."""

from __future__ import annotations

import pytest
import torch

from helpers.pretrained import VOCAB, logits_by_row, model_inputs, plain, run_pretrained_worker, tied_llama_checkpoint

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory):
    return tied_llama_checkpoint(tmp_path_factory.mktemp("tied") / "llama")


# ---------------------------------------------------------------- sharded layouts
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
