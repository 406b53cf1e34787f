"""The pipeline axis at the torch level (no Trainer): splitting, balancing, and parity of every schedule
with a single process on the same batches (losses, gradient norms, weights after 3 AdamW steps).

Multi-process tests run ``tests/workers/pipeline_axis.py`` under torch.distributed.run, CPU ranks over
gloo; each launch runs several schedules one after another to keep process start-ups few.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    BertForMaskedLM,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
)

from helpers.tiny_bert import VOCAB, tiny_config
from lightning_mp.pipeline.runtime import build_pipeline, last_stage_rank, stage_indices
from lightning_mp.pipeline.split import (
    balance_split,
    block_ranges,
    build_rank_modules,
    check_split_points,
    estimate_costs,
    plan_split,
    stage_blocks,
)
from lightning_mp.plans import find_plan


# ---------------------------------------------------------------- balancing and validation (no processes)
def test_balance_equal_blocks():
    assert balance_split([1.0] * 4, 2) == [0, 2]
    assert balance_split([1.0] * 4, 4) == [0, 1, 2, 3]
    assert balance_split([1.0] * 12, 3) == [0, 4, 8]
    assert balance_split([5.0], 1) == [0]


def test_balance_counts_first_and_last_extra():
    # Embeddings worth 3 blocks on stage 0: stage costs 3+1, 4, 4 is the only split with max 4.
    assert balance_split([1.0] * 9, 3, first=3.0) == [0, 1, 5]
    # A head worth 4 blocks moves blocks off the last stage: 5 | 1+4.
    assert balance_split([1.0] * 6, 2, last=4.0) == [0, 5]
    # Uneven blocks: the one expensive block gets a stage of its own.
    assert balance_split([1.0, 1.0, 10.0, 1.0, 1.0], 3) == [0, 2, 3]


def test_balance_is_optimal_by_brute_force():
    import itertools

    costs = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0]
    for stages in (2, 3, 4):
        points = balance_split(costs, stages, first=2.0, last=1.0)

        def worst(ps):
            ranges = block_ranges(list(ps), len(costs))
            return max(sum(costs[i] for i in r) + (2.0 if s == 0 else 0.0) + (1.0 if s == stages - 1 else 0.0)
                       for s, r in enumerate(ranges))

        best = min(worst((0, *c)) for c in itertools.combinations(range(1, len(costs)), stages - 1))
        assert worst(points) == best


def _scalar_balance(costs, stages, first, last):
    """The split's definition as a plain scan (the array version must choose the same split, ties included):
    for every stage and end, the first start (in increasing order) with the smallest (max, sum of squares)."""
    n, prefix = len(costs), [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    best = [[(float("inf"), float("inf"), [])] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = (0.0, 0.0, [])
    for s in range(1, stages + 1):
        for end in range(s, n - (stages - s) + 1):
            for start in range(s - 1, end):
                prev = best[s - 1][start]
                if prev[0] == float("inf"):
                    continue
                c = prefix[end] - prefix[start] + (first if s == 1 else 0.0) + (last if s == stages else 0.0)
                if (max(prev[0], c), prev[1] + c * c) < best[s][end][:2]:
                    best[s][end] = (max(prev[0], c), prev[1] + c * c, [*prev[2], start])
    return best[stages][n][2]


def test_balance_matches_the_scalar_definition_including_ties():
    import random

    rng = random.Random(0)
    for trial in range(300):
        n = rng.randint(1, 24)
        stages = rng.randint(1, n)
        # Half the cases from a few values, so that many splits tie on the maximum (and on squares).
        costs = [rng.choice([1.0, 1.0, 2.0, 0.5, 7.25]) if trial % 2 else rng.random() for _ in range(n)]
        first, last = rng.choice([0.0, 1.0, 3.0, 2.5]), rng.choice([0.0, 1.0, 2.0, 4.5])
        assert balance_split(costs, stages, first, last) == _scalar_balance(costs, stages, first, last), (
            costs, stages, first, last)


def test_more_stages_than_blocks_is_an_error_with_numbers():
    with pytest.raises(ValueError, match=r"5 pipeline stages need at least 5 blocks \(one each\), but the model has 4"):
        balance_split([1.0] * 4, 5)
    model = BertForTokenClassification(tiny_config(layers=4))
    _, hf, plan = find_plan(model)
    with pytest.raises(ValueError, match="6 pipeline stages need at least 6 blocks"):
        plan_split(hf, plan, 6)
    with pytest.raises(ValueError, match="5 pipeline stages need at least 5 blocks"):
        plan_split(hf, plan, 5, split_points=[0, 1, 2, 3, 4])


class _StubMesh:
    """Enough of a 1-D DeviceMesh for build_pipeline to reach its checks (which come before any
    process group is used)."""

    def __init__(self, size: int) -> None:
        self._size = size

    def size(self) -> int:
        return self._size

    def get_local_rank(self) -> int:
        return 0


def test_build_pipeline_rejects_more_stages_than_blocks():
    model = BertForTokenClassification(tiny_config(layers=4))
    _, hf, plan = find_plan(model)
    with pytest.raises(ValueError, match=r"'interleaved_1f1b' over 4 ranks: 8 pipeline stages need at least 8"
                                         r" blocks .* the model has 4; use at most 2 pipeline ranks"
                                         r" \(2 stages per rank\)"):
        build_pipeline(hf, plan, _StubMesh(4), "interleaved_1f1b", 8, "cpu")
    with pytest.raises(ValueError, match="5 pipeline stages need at least 5 blocks .* the model has 4"):
        build_pipeline(hf, plan, _StubMesh(5), "1f1b", 8, "cpu")
    with pytest.raises(ValueError, match="pipeline_schedule='bogus' is unknown"):
        build_pipeline(hf, plan, _StubMesh(2), "bogus", 8, "cpu")


def test_pinned_split_validation():
    assert check_split_points([0, 3], 2, 4) == [0, 3]
    with pytest.raises(ValueError, match=r"has 3 entries, but the pipeline has 2 stages"):
        check_split_points([0, 1, 2], 2, 4)
    with pytest.raises(ValueError, match="must start at 0"):
        check_split_points([1, 3], 2, 4)
    with pytest.raises(ValueError, match="strictly increasing"):
        check_split_points([0, 2, 2], 3, 4)
    with pytest.raises(ValueError, match=r"below the number of blocks \(4\)"):
        check_split_points([0, 4], 2, 4)


def test_costs_count_parameters_with_embeddings_first_and_head_last():
    model = BertForTokenClassification(tiny_config(layers=4))
    _, hf, plan = find_plan(model)
    costs = estimate_costs(hf, plan)
    layer = hf.bert.encoder.layer[0]
    assert costs.blocks == [float(sum(p.numel() for p in layer.parameters()))] * 4
    assert costs.first == sum(p.numel() for p in hf.bert.embeddings.parameters())
    assert costs.last == sum(p.numel() for p in hf.classifier.parameters())


def test_stage_indices_and_last_rank():
    assert [stage_indices(r, 4, "1f1b") for r in range(4)] == [[0], [1], [2], [3]]
    assert [stage_indices(r, 2, "interleaved_1f1b") for r in range(2)] == [[0, 2], [1, 3]]
    assert [stage_indices(r, 4, "zbv_zero_bubble") for r in range(4)] == [[0, 7], [1, 6], [2, 5], [3, 4]]
    assert last_stage_rank(4, "gpipe") == 3
    assert last_stage_rank(4, "interleaved_zero_bubble") == 3
    assert last_stage_rank(4, "zbv_zero_bubble") == 0


# ---------------------------------------------------------------- splitting (no processes)
@pytest.mark.parametrize("cls", [BertForTokenClassification, BertForSequenceClassification, BertModel])
def test_chained_stages_equal_the_hf_forward(cls):
    """Stage modules run one after another (what the schedules do, minus communication) give the
    model's own output, with padding in the attention mask."""
    torch.manual_seed(0)
    model = cls(tiny_config(layers=4)).eval()
    _, hf, plan = find_plan(model)
    ids = torch.randint(1, VOCAB, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 6:] = 0
    ranges = block_ranges([0, 1, 3], 4)
    stages = [build_rank_modules(hf, plan, {i: ranges[i]}, 3)[1][0] for i in range(3)]
    with torch.no_grad():
        x = ids
        for stage in stages:
            x = stage(x, attention_mask=mask)
        expected = model(input_ids=ids, attention_mask=mask)
    if cls is BertModel:
        torch.testing.assert_close(x[0], expected.last_hidden_state, rtol=0, atol=1e-6)
        torch.testing.assert_close(x[1], expected.pooler_output, rtol=0, atol=1e-6)
    else:
        torch.testing.assert_close(x, expected.logits, rtol=0, atol=1e-6)

    names = {n for n, _ in model.named_parameters()}
    stage_names = [{n for n, _ in s.named_parameters()} for s in stages]
    assert all(s <= names for s in stage_names)
    assert set().union(*stage_names) == names
    assert sum(map(len, stage_names)) == len(names)  # disjoint
    assert all(type(s) is cls for s in stages)  # the class (and isinstance checks) stay
    assert [len(stage_blocks(s, plan)) for s in stages] == [1, 2, 1]
    prefix = "bert." if cls is not BertModel else ""
    assert f"{prefix}encoder.layer.2.output.dense.weight" in stage_names[1]
    assert not any(n.startswith(f"{prefix}embeddings.") for n in stage_names[1] | stage_names[2])
    # The original model is intact.
    assert len(hf.get_submodule(plan.blocks)) == 4 and isinstance(hf.get_submodule(plan.blocks), torch.nn.ModuleList)


def test_models_without_a_pipeline_plan_are_rejected():
    model = BertForMaskedLM(tiny_config(layers=4))  # decoder tied to the word embedding
    _, hf, plan = find_plan(model)
    assert plan.pipeline is None
    with pytest.raises(ValueError, match="describes no pipeline split"):
        build_pipeline(hf, plan, _StubMesh(2), "1f1b", 4, "cpu")
