"""``fsdp_settings`` (lightning_mp.config.FSDPSettings): checked before any process exists, applied to every
FSDP unit as configured (one rank, in process), and a 2-rank job with every non-default setting matching the
single-process run. What each setting costs or saves is measured by benchmarks/fsdp_settings.py."""

from __future__ import annotations

import torch

from helpers.compare import max_weight_difference
from helpers.launch import run_worker


def test_every_setting_changed_matches_single_process(tmp_path, reference_runs):
    settings = {"reshard_after_forward": "none", "forward_prefetch": 2, "backward_prefetch": 1,
                "reduce_dtype": "float32"}
    result = run_worker(tmp_path, devices=2, layout={"data_parallel_size": 2, "fsdp_settings": settings},
                        extra=("--layers", "3", "--probe-fsdp", "--variable-width"))
    reference = reference_runs("--layers", "3", "--variable-width")
    torch.testing.assert_close(result["losses"], reference["losses"], rtol=1e-5, atol=1e-6)
    assert max_weight_difference(result["state_dict"], reference["state_dict"]) < 1e-5
    # The settings reached the real job: every block's parameters were still gathered when backward started,
    # and each block prefetched as configured.
    blocks = [f"model.bert.encoder.layer.{i}" for i in range(3)]
    assert all(f"{block}.attention.self.query.weight" in step for block in blocks
               for step in result["gathered_at_backward"])
    units = result["fsdp_units"]
    assert [units[b]["forward_prefetch"] for b in blocks] == [blocks[1:3], blocks[2:], []]
    assert [units[b]["backward_prefetch"] for b in blocks] == [[], blocks[:1], blocks[1:2]]
    assert {unit["reduce_dtype"] for unit in units.values()} == {"torch.float32"}
