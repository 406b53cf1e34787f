"""Parallel degrees and their validation.

Everything here is pure Python: it runs in the Trainer's constructor, before any process is launched
or any process group exists, so a bad combination fails at once with the numbers in the message.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Literal, Union

DATA_PARALLEL_MODES = ("fully_sharded", "hybrid", "replicated")
PIPELINE_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "interleaved_zero_bubble", "zbv_zero_bubble")
# Schedules that hold more than one stage per rank ("virtual" stages).
MULTI_STAGE_SCHEDULES = ("interleaved_1f1b", "interleaved_zero_bubble", "zbv_zero_bubble")

Size = Union[int, Literal["auto"]]


@dataclass(frozen=True)
class MeshShape:
    """The resolved size of every mesh dimension; their product is the world size."""

    pipeline: int
    data_replicate: int
    data_shard: int
    tensor: int

    @property
    def data(self) -> int:
        return self.data_replicate * self.data_shard

    @property
    def world_size(self) -> int:
        return self.pipeline * self.data * self.tensor


@dataclass
class ParallelConfig:
    """What the user asked for. ``resolve`` turns it into a :class:`MeshShape` for a world size."""

    data_parallel_size: Size = "auto"
    tensor_parallel_size: Size = 1
    pipeline_parallel_size: int = 1
    data_parallel_mode: str = "fully_sharded"
    data_parallel_replicate_size: int | None = None
    activation_checkpointing: bool = False
    pipeline_schedule: str = "1f1b"
    microbatches: int | None = None

    def __post_init__(self) -> None:
        self._check_static()

    def _check_static(self) -> None:
        """Checks that need no world size."""
        for name in ("data_parallel_size", "tensor_parallel_size"):
            value = getattr(self, name)
            if value != "auto" and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive int or 'auto', got {value!r}.")
        for name in ("pipeline_parallel_size", "data_parallel_replicate_size", "microbatches"):
            value = getattr(self, name)
            if value is None and name != "pipeline_parallel_size":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}.")
        if self.data_parallel_mode not in DATA_PARALLEL_MODES:
            raise ValueError(
                f"data_parallel_mode={self.data_parallel_mode!r} is not one of {', '.join(DATA_PARALLEL_MODES)}."
            )
        if self.data_parallel_replicate_size is not None and self.data_parallel_mode != "hybrid":
            raise ValueError(
                f"data_parallel_replicate_size={self.data_parallel_replicate_size} only applies to"
                f" data_parallel_mode='hybrid', but the mode is {self.data_parallel_mode!r}."
            )
        if self.pipeline_schedule not in PIPELINE_SCHEDULES:
            raise ValueError(
                f"pipeline_schedule={self.pipeline_schedule!r} is unknown; valid schedules: {', '.join(PIPELINE_SCHEDULES)}."
            )

    def resolve(self, world_size: int, devices_per_node: int | None = None) -> MeshShape:
        """Fill in "auto" sizes and check that the degrees multiply to ``world_size``."""
        devices_per_node = devices_per_node or world_size
        tp = devices_per_node if self.tensor_parallel_size == "auto" else self.tensor_parallel_size
        pp = self.pipeline_parallel_size
        if self.data_parallel_size == "auto":
            if world_size % (tp * pp):
                raise ValueError(
                    f"tensor_parallel_size ({tp}) × pipeline_parallel_size ({pp}) = {tp * pp} does not divide the"
                    f" world size {world_size}, so data_parallel_size='auto' has no valid value."
                    f" {_suggest(world_size)}"
                )
            dp = world_size // (tp * pp)
        else:
            dp = self.data_parallel_size
        if dp * tp * pp != world_size:
            raise ValueError(
                f"data_parallel_size ({dp}) × tensor_parallel_size ({tp}) × pipeline_parallel_size ({pp})"
                f" = {dp * tp * pp}, but the world size is {world_size} (num_nodes × devices)."
                f" {_suggest(world_size)}"
            )
        replicate, shard = self._split_data_parallel(dp)
        return MeshShape(pipeline=pp, data_replicate=replicate, data_shard=shard, tensor=tp)

    def _split_data_parallel(self, dp: int) -> tuple[int, int]:
        if self.data_parallel_mode == "fully_sharded":
            return 1, dp
        if self.data_parallel_mode == "replicated":
            return dp, 1
        replicate = self.data_parallel_replicate_size
        if replicate is None:
            raise ValueError(
                "data_parallel_mode='hybrid' needs data_parallel_replicate_size (how many replicas of the"
                f" sharded group); with data_parallel_size={dp} valid values are {_divisors(dp)}."
            )
        if dp % replicate:
            raise ValueError(
                f"data_parallel_replicate_size={replicate} does not divide data_parallel_size={dp};"
                f" valid values: {_divisors(dp)}."
            )
        return replicate, dp // replicate


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _suggest(world_size: int, limit: int = 8) -> str:
    combos = [
        (dp, tp, pp)
        for dp, tp, pp in itertools.product(_divisors(world_size), repeat=3)
        if dp * tp * pp == world_size
    ]
    shown = ", ".join(f"(data={dp}, tensor={tp}, pipeline={pp})" for dp, tp, pp in combos[:limit])
    more = f" and {len(combos) - limit} more" if len(combos) > limit else ""
    return f"Valid layouts for {world_size} ranks: {shown}{more}."


def check_divisible(tensor_parallel_size: int, sizes: dict[str, int], model_name: str) -> None:
    """Tensor parallelism splits heads and FFN columns evenly; say which size does not split."""
    bad = {name: size for name, size in sizes.items() if size % tensor_parallel_size}
    if not bad:
        return
    common = [d for d in _divisors(min(sizes.values())) if all(size % d == 0 for size in sizes.values())]
    described = ", ".join(f"{name}={size}" for name, size in bad.items())
    raise ValueError(
        f"tensor_parallel_size={tensor_parallel_size} does not divide {described} of {model_name};"
        f" valid tensor_parallel_size values for this model: {', '.join(map(str, common))}."
    )


def check_pipeline(config: ParallelConfig, num_blocks: int, global_batch_size: int | None = None) -> None:
    """Pipeline checks that need the model (number of blocks) and, when known, the batch size."""
    pp = config.pipeline_parallel_size
    if pp == 1:
        return
    stages_per_rank = 2 if config.pipeline_schedule in MULTI_STAGE_SCHEDULES else 1
    stages = pp * stages_per_rank
    if stages > num_blocks:
        raise ValueError(
            f"pipeline_parallel_size={pp} with schedule {config.pipeline_schedule!r} needs {stages} stages, but the"
            f" model has only {num_blocks} blocks; use at most {num_blocks // stages_per_rank} pipeline ranks."
        )
    microbatches = config.microbatches or pp
    if config.pipeline_schedule != "gpipe" and microbatches < pp:
        raise ValueError(
            f"microbatches={microbatches} is fewer than pipeline_parallel_size={pp}; schedule"
            f" {config.pipeline_schedule!r} needs at least {pp} microbatches."
        )
    if global_batch_size is not None and global_batch_size % microbatches:
        raise ValueError(
            f"the batch size {global_batch_size} is not divisible by microbatches={microbatches}."
        )
