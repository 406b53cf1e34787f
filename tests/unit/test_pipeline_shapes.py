"""Stage metadata derived for a new input shape (``pipeline.shapes``): what torch would infer for a
per-token model, without running the stage; anything that does not lead with the input shape is refused."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lightning_mp._compat import stage_metadata_types
from lightning_mp.pipeline.shapes import NotDerivable, derived_metadata, follow_input_shape

_StageMeta, _TensorMeta = stage_metadata_types()


def meta(*shape: int, dtype=torch.float32, requires_grad=False) -> _TensorMeta:
    return _TensorMeta.from_tensor(torch.empty(shape, dtype=dtype, requires_grad=requires_grad))


def stage(index: int, num: int, inputs, outputs, input_grads=None, output_grads=None) -> SimpleNamespace:
    return SimpleNamespace(stage_index=index, is_last=index == num - 1, _user_meta=_StageMeta(),
                           _stage_meta=_StageMeta(inputs, outputs, input_grads, output_grads))


def test_middle_stage_follows_the_input_shape_and_keeps_dtype_and_grad():
    middle = stage(1, 3, (meta(2, 12, 32, dtype=torch.bfloat16, requires_grad=True),),
                   (meta(2, 12, 32, dtype=torch.bfloat16, requires_grad=True),),
                   (meta(2, 12, 32, dtype=torch.bfloat16),), (meta(2, 12, 32, dtype=torch.bfloat16),))
    derived = derived_metadata(middle, (2, 12), (1, 7))
    assert derived.inputs == (meta(1, 7, 32, dtype=torch.bfloat16, requires_grad=True),)
    assert derived.outputs == (meta(1, 7, 32, dtype=torch.bfloat16, requires_grad=True),)
    assert derived.input_grads == derived.output_grads == (meta(1, 7, 32, dtype=torch.bfloat16),)


def test_first_stage_input_ids_and_last_stage_extra_outputs():
    first = stage(0, 2, (meta(2, 12, dtype=torch.long),), (meta(2, 12, 32, requires_grad=True),))
    assert derived_metadata(first, (2, 12), (2, 5)).inputs == (meta(2, 5, dtype=torch.long),)
    # A pooled output [rows, hidden] on the last stage goes to the loss only: kept as it was.
    last = stage(1, 2, (meta(2, 12, 32, requires_grad=True),), (meta(2, 12, 32), meta(2, 32)))
    assert derived_metadata(last, (2, 12), (2, 5)).outputs == (meta(2, 5, 32), meta(2, 32))


def test_activation_not_led_by_the_input_shape_is_refused_and_nothing_changes():
    good = stage(0, 3, (meta(2, 12, dtype=torch.long),), (meta(2, 12, 32),))
    bad = stage(1, 3, (meta(2, 12, 32),), (meta(2, 32),))  # a middle stage sending [rows, hidden]
    with pytest.raises(NotDerivable, match=r"stage 1 output\[0\] has shape \(2, 32\).*input shape \(2, 12\)"):
        follow_input_shape([good, bad], (2, 12), (2, 5))
    assert good._user_meta == _StageMeta()  # all stages or none
    transposed = stage(1, 3, (_TensorMeta(torch.Size((2, 12, 32)), (32, 64, 1), torch.float32, False),),
                       (meta(2, 12, 32),))
    with pytest.raises(NotDerivable, match="not contiguous"):
        derived_metadata(transposed, (2, 12), (2, 5))


def test_sequence_shards_sent_between_stages_follow_the_local_width():
    """Under sequence parallelism a stage sends its tensor rank's shard of the sequence, ``[rows, width / t,
    hidden]``: the first stage still receives the whole input ids, everything sent follows the local width."""
    from lightning_mp.pipeline.sequence_shards import SequenceShardedStages

    def shards(rank: int, degree: int) -> SequenceShardedStages:
        return SequenceShardedStages(SimpleNamespace(size=lambda: degree, get_local_rank=lambda: rank))

    # torch.chunk's split, as DTensor's Shard(1) cuts a sequence: the last ranks get less (or nothing).
    assert [shards(r, 2).local_width(11) for r in range(2)] == [6, 5]
    assert [shards(r, 4).local_width(3) for r in range(4)] == [1, 1, 1, 0]
    last_rank = shards(1, 2)
    sent = (last_rank.sent_lead((2, 12)), last_rank.sent_lead((2, 7)))
    assert sent == ((2, 6), (2, 3))
    first = stage(0, 3, (meta(2, 12, dtype=torch.long),), (meta(2, 6, 32, requires_grad=True),),
                  None, (meta(2, 6, 32),))
    derived = derived_metadata(first, (2, 12), (2, 7), sent)
    assert derived.inputs == (meta(2, 7, dtype=torch.long),)
    assert derived.outputs == (meta(2, 3, 32, requires_grad=True),) and derived.output_grads == (meta(2, 3, 32),)
    middle = stage(1, 3, (meta(2, 6, 32, requires_grad=True),), (meta(2, 6, 32, requires_grad=True),),
                   (meta(2, 6, 32),), (meta(2, 6, 32),))
    derived = derived_metadata(middle, (2, 12), (2, 7), sent)
    assert derived.inputs == derived.outputs == (meta(2, 3, 32, requires_grad=True),)
    assert derived.input_grads == derived.output_grads == (meta(2, 3, 32),)
    # Without the sent shape the shard would be read as a whole sequence that does not match the input's.
    with pytest.raises(NotDerivable, match=r"stage 1 output\[0\] has shape \(2, 6, 32\)"):
        derived_metadata(middle, (2, 12), (2, 7))


def test_last_stage_logits_gradient_is_kept_under_sequence_shards():
    """torch derives the last stage's output-gradient metadata from its outputs (the logits, ``[rows, width,
    vocabulary]``, never sent): it does not lead with the sent shard's width, and must not stop the derivation
    on the last stage's ranks while the first stage's derive (the stages would vote for different modes)."""
    last = stage(1, 2, (meta(2, 6, 32, requires_grad=True),), (meta(2, 11, 5, requires_grad=True),),
                 (meta(2, 6, 32),), (meta(2, 11, 5),))
    derived = derived_metadata(last, (2, 11), (2, 12), ((2, 6), (2, 6)))
    assert derived.inputs == (meta(2, 6, 32, requires_grad=True),) and derived.output_grads == (meta(2, 11, 5),)
