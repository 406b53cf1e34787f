"""What the last pipeline stage sends its peers each step (pipeline/relay.py), on two gloo processes:
loss and logged values arrive as numbers every step, names only when they change."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_mp.pipeline.relay import StepRelay

STEPS = [
    {"train_loss": (1.5, {"prog_bar": True}), "lr": (0.1, {})},
    {"train_loss": (1.25, {"prog_bar": True}), "lr": (0.1, {})},  # same names: no object sent
    {"train_loss": (1.0, {"prog_bar": True}), "acc": (0.5, {"sync_dist": True})},  # new names: sent
]


def _relay_worker(rank: int, store_path: str, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    sent_objects = []
    original = dist.broadcast_object_list

    def counting(objects, *args, **kwargs):
        sent_objects.append(1)
        return original(objects, *args, **kwargs)

    dist.broadcast_object_list = counting
    try:
        group = dist.group.WORLD
        relay = StepRelay(group, group, source=1, is_source=rank == 1, device=torch.device("cpu"))
        seen = []
        for step, logs in enumerate(STEPS):
            if rank == 1:
                loss = torch.tensor(10.0 + step)
                logs = {name: (torch.tensor(value), options) for name, (value, options) in logs.items()}
            else:
                loss, logs = None, None
            loss, received = relay.step_results(loss, logs)
            seen.append((float(loss), {name: (float(value), options) for name, (value, options) in received.items()}))
        output = relay.tree((torch.arange(6.0).view(2, 3), None, 3) if rank == 1 else None)
        results[rank] = (seen, len(sent_objects), output)
    finally:
        dist.broadcast_object_list = original
        dist.destroy_process_group()


def test_relay_sends_values_every_step_and_names_only_when_they_change(tmp_path):
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_relay_worker, args=(str(tmp_path / "store"), results), nprocs=2, join=True)
    for rank in (0, 1):
        seen, objects, output = results[rank]
        assert [loss for loss, _ in seen] == [10.0, 11.0, 12.0]
        for (_, logs), expected in zip(seen, STEPS):
            assert logs.keys() == expected.keys()
            for name, (value, options) in expected.items():
                assert logs[name][0] == pytest.approx(value) and logs[name][1] == options
        # Names at steps 0 and 2, and the output tree's structure: three pickled messages, not one per step and value.
        assert objects == 3
        assert torch.equal(output[0], torch.arange(6.0).view(2, 3)) and output[1:] == (None, 3)
