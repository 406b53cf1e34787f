"""A user's own model (a GPT in plain PyTorch, ``helpers/plain_gpt.py``) with the tensor-parallel plan passed to
``ModelParallelStrategy(plan=...)``: split as planned and equal to one process (losses and weights after 3 SGD
steps within 1e-5), on causal-LM batches padded to their own longest row. Once, the plan reached no module and
every rank trained a full replica, which matched one process too: hence the bytes each rank holds are checked.
The placements per rank: ``tests/unit/test_fake_world.py``."""

from __future__ import annotations

import pytest

from helpers.compare import max_weight_difference

GPT = ("--module", "gpt", "--steps", "3")
# One 4-rank launch for all three: the plan as a dict (tp4; a dict cannot say that the loss shifts its labels,
# which data-parallel ranks need to weight their tokens) and as a ModelPlan under FSDP and replicated data
# parallelism.
LAYOUTS = {
    "tp4-dict": (4, {"tensor_parallel_size": 4, "gpt_plan": "dict"}),
    "dp2xtp2-ModelPlan": (4, {"tensor_parallel_size": 2, "data_parallel_size": 2, "gpt_plan": "ModelPlan"}),
    "dp2xtp2-replicated-ModelPlan": (4, {"tensor_parallel_size": 2, "data_parallel_size": 2,
                                         "data_parallel_mode": "replicated", "gpt_plan": "ModelPlan"}),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_the_users_plan_splits_the_model_and_matches_one_process(name, reference_runs, shared_launches):
    result, reference = shared_launches(LAYOUTS, name, *GPT), reference_runs(*GPT)
    losses = max(abs(a - b) for a, b in zip(result["losses"], reference["losses"]))
    weights = max_weight_difference(result["state_dict"], reference["state_dict"])
    print(f"{name}: losses {losses:.1e}, weights {weights:.1e}, bytes per rank {result['bytes_per_rank']}")
    assert result["losses"] == pytest.approx(reference["losses"], abs=1e-5)
    assert weights < 1e-5
    full = sum(t.numel() * t.element_size() for t in reference["state_dict"].values())
    split = sum(t.numel() * t.element_size() for key, t in reference["state_dict"].items()
                if key.endswith(tuple(f".{linear}.weight" for linear in ("q", "k", "v", "proj", "up", "down"))))
    held = [rank["parameters"] for rank in result["bytes_per_rank"]]
    # Each rank holds at most half of every planned weight (a full replica would hold all of it).
    assert max(held) <= full - split / 2, (held, full, split)
