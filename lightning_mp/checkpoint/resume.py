"""A training DataLoader that resumes mid-epoch where the checkpoint left it.

Lightning restores a mid-epoch checkpoint's step counters and schedules, but a plain DataLoader starts
its epoch again from the first batch, so a resumed run trains on batches it has already seen and its
losses part from the uninterrupted run. This wrapper skips, at the start of an epoch's iteration, the
batches Lightning's restored progress counts as done in that epoch (zero unless resuming mid-epoch),
so the resumed run sees exactly the batches the uninterrupted one would. The sampler (and its
``set_epoch``, which Lightning calls on ``loader.sampler``) is the wrapped loader's, so the order of the
resumed epoch is the one the interrupted run saw.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator


class ResumableLoader:
    """Wraps a sized iterable (a DataLoader); ``batches_done()`` is how many batches of the current epoch
    Lightning counts as done when the epoch's first batch is requested."""

    def __init__(self, loader: Any, batches_done: Callable[[], int]) -> None:
        self.loader = loader
        self._batches_done = batches_done

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        # A generator: its body (reading the progress, drawing from the sampler) runs at the first next(),
        # after Lightning has reset its epoch progress and set the sampler's epoch.
        iterator = iter(self.loader)
        for _ in range(min(int(self._batches_done()), len(self.loader))):
            next(iterator)
        yield from iterator

    # Lightning warns that a loader without these cannot resume mid-epoch; this one can, from Lightning's own
    # restored progress, so it has no state of its own to save.
    def state_dict(self) -> dict[str, int]:
        return {}

    def load_state_dict(self, state: dict[str, int]) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        # sampler, batch_sampler, dataset, batch_size, ...: Lightning and users read them off the loader.
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)
