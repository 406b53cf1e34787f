"""Comparisons of a parallel run with the single-process run."""

from __future__ import annotations


def max_weight_difference(a: dict, b: dict) -> float:
    assert set(a) == set(b), f"state dict keys differ: {sorted(set(a) ^ set(b))}"
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)
