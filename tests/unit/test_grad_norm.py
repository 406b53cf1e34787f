"""A rank holding no gradient (a frozen pipeline stage) still joins the norm's collective, with a zero on
its own device: NCCL rejects CPU tensors. "meta" stands in for a GPU here: it is not the default device."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_mp.parallel.grad_norm import clip_grad_norm_, total_grad_norm


def test_the_zero_norm_of_a_rank_without_gradients_is_on_the_rank_device():
    frozen = [nn.Parameter(torch.empty(3, device="meta"))]
    assert total_grad_norm(frozen).device.type == "meta"
    assert total_grad_norm([], device=torch.device("meta")).device.type == "meta"
    # clip_grad_norm_ used to drop gradient-less parameters first, and so lost their device.
    assert clip_grad_norm_(frozen, 1.0).device.type == "meta"
    assert clip_grad_norm_([], 1.0, device=torch.device("meta")).device.type == "meta"
    with pytest.raises(ValueError, match="no parameters and no device"):
        total_grad_norm([])


def test_clipping_scales_only_parameters_with_gradients():
    with_grad, without = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    with_grad.grad = torch.tensor([3.0, 4.0])
    norm = clip_grad_norm_([without, with_grad], max_norm=1.0)
    assert norm.item() == pytest.approx(5.0)
    assert with_grad.grad.tolist() == pytest.approx([0.6, 0.8], abs=1e-6)
    assert without.grad is None
