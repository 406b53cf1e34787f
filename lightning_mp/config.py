"""Parallel degrees and their validation.

Everything here is pure Python: it runs in the Trainer's constructor, before any process is launched
or any process group exists, so a bad combination fails at once with the numbers in the message.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field, fields
from datetime import timedelta
from typing import Any, Literal, Optional, Union

from lightning_mp.compile_limits import compile_problem

DATA_PARALLEL_MODES = ("fully_sharded", "hybrid", "replicated")
PIPELINE_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "interleaved_zero_bubble", "zbv_zero_bubble")
# Schedules that hold more than one stage per rank ("virtual" stages).
MULTI_STAGE_SCHEDULES = ("interleaved_1f1b", "interleaved_zero_bubble", "zbv_zero_bubble")
CHECKPOINT_MODES = ("full", "selective")  # activation checkpointing, see parallel/activation_checkpointing.py
RESHARD_AFTER_FORWARD = ("except_last", "all", "none")  # FSDPSettings.reshard_after_forward
REDUCE_DTYPES = ("float32", "bfloat16", "float16")  # FSDPSettings.reduce_dtype

Size = Union[int, Literal["auto"]]


def checkpoint_mode(setting: bool | str) -> str | None:
    """``ModelParallelStrategy(activation_checkpointing=...)`` as a mode: None, "full" or "selective"."""
    if setting is False or setting is None:
        return None
    if setting is True:
        return "full"
    if setting in CHECKPOINT_MODES:
        return setting
    raise ValueError(
        f"activation_checkpointing={setting!r} is not one of False, True (= 'full'), 'full', 'selective'."
    )


@dataclass(frozen=True)
class Precision:
    """What a Lightning precision means for sharding and for the planner's byte counts."""

    compute_bytes: int  # activations and gathered parameters
    parameter_bytes: int  # stored parameters, gradients (and each optimizer tensor)
    mixed_dtype: str | None = None  # "-mixed": FSDP gathers parameters in this dtype, reduces gradients in fp32


PRECISIONS = {
    "32-true": Precision(4, 4),
    "bf16-mixed": Precision(2, 4, "bfloat16"),
    "bf16-true": Precision(2, 2),
    "16-mixed": Precision(2, 4, "float16"),
    "16-true": Precision(2, 2),
}


def check_precision(precision: str, pipeline_parallel_size: int = 1) -> None:
    if precision not in PRECISIONS:
        raise ValueError(
            f"precision={precision!r} is not supported by lightning_mp; choose one of {', '.join(PRECISIONS)}."
        )
    if precision == "16-mixed" and pipeline_parallel_size > 1:
        raise ValueError(
            "precision='16-mixed' scales the loss with a GradScaler around Lightning's backward, which the"
            " pipeline schedule replaces; with pipeline_parallel_size > 1 use 'bf16-mixed', 'bf16-true' or '32-true'."
        )


def stages_per_rank(schedule: str) -> int:
    """Stages one pipeline rank holds: two for the interleaved and zero-bubble schedules, else one."""
    if schedule not in PIPELINE_SCHEDULES:
        raise ValueError(
            f"pipeline_schedule={schedule!r} is unknown; valid schedules: {', '.join(PIPELINE_SCHEDULES)}."
        )
    return 2 if schedule in MULTI_STAGE_SCHEDULES else 1


def too_few_blocks(num_stages: int, num_blocks: int, per_rank: int = 1) -> str | None:
    """Why ``num_stages`` pipeline stages cannot split ``num_blocks`` blocks (every stage needs one), or None."""
    if num_stages <= num_blocks:
        return None
    per_rank_note = f" ({per_rank} stages per rank)" if per_rank > 1 else ""
    return (f"{num_stages} pipeline stages need at least {num_stages} blocks (one each), but the model has"
            f" {num_blocks}; use at most {num_blocks // per_rank} pipeline ranks{per_rank_note}")


@dataclass(frozen=True)
class FSDPSettings:
    """How the sharded data-parallel modes (fully_sharded, hybrid) run FSDP2 (``parallel/fsdp.py``). The
    defaults are the measured choice (``benchmarks/fsdp_settings.py``, README "FSDP2 settings"); the others
    exist to measure them and for hardware where they may pay.

    reshard_after_forward: which blocks free their gathered parameters after forward. "except_last" (default):
        the last block's are the first that backward needs, so keeping them saves one all-gather per step for
        one block's memory; "all"; "none": no all-gather in backward at all, every block's parameters held
        from forward to backward (ZeRO-2-like: only gradients and optimizer state stay sharded).
    forward_prefetch / backward_prefetch: how many blocks ahead each block issues all-gathers for, explicitly
        (``set_modules_to_forward_prefetch`` / ``set_modules_to_backward_prefetch``). 0 (default) leaves
        FSDP2's implicit order: no forward prefetch (on GPUs the CPU running ahead overlaps the next
        all-gather anyway), and in backward the next block in reverse forward order.
    reduce_dtype: the dtype gradients are reduced in; None (default): float32 under "-mixed" precisions (a sum
        over many ranks keeps its precision), the parameter dtype under "-true" ones.
    """

    reshard_after_forward: str = "except_last"
    forward_prefetch: int = 0
    backward_prefetch: int = 0
    reduce_dtype: Optional[str] = None

    def __post_init__(self) -> None:
        if self.reshard_after_forward not in RESHARD_AFTER_FORWARD:
            raise ValueError(f"fsdp_settings: reshard_after_forward={self.reshard_after_forward!r} is not one of"
                             f" {', '.join(map(repr, RESHARD_AFTER_FORWARD))}.")
        for name in ("forward_prefetch", "backward_prefetch"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"fsdp_settings: {name} must be an int >= 0 (blocks to prefetch; 0: FSDP2's"
                                 f" implicit order), got {value!r}.")
        if self.reduce_dtype is not None and self.reduce_dtype not in REDUCE_DTYPES:
            raise ValueError(f"fsdp_settings: reduce_dtype={self.reduce_dtype!r} is not one of None (follow the"
                             f" precision), {', '.join(map(repr, REDUCE_DTYPES))}.")

    @classmethod
    def of(cls, value: "FSDPSettings | dict | None") -> "FSDPSettings":
        """An FSDPSettings from itself, a dict of its fields (recipes, JSON) or None (the defaults)."""
        if value is None or isinstance(value, FSDPSettings):
            return value or cls()
        if not isinstance(value, dict):
            raise TypeError(f"fsdp_settings must be an FSDPSettings, a dict or None, got {type(value).__name__}.")
        unknown = sorted(set(value) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"fsdp_settings: unknown setting(s) {', '.join(unknown)}; valid:"
                             f" {', '.join(f.name for f in fields(cls))}.")
        return cls(**value)

    def changed(self) -> dict:
        """The settings that differ from the defaults."""
        return {k: v for k, v in asdict(self).items() if v != getattr(FSDPSettings(), k)}


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
    data_parallel_replicate_size: Size | None = None  # hybrid; "auto": one replica per node
    activation_checkpointing: bool | str = False  # True = "full"; or "selective"
    pipeline_schedule: str = "1f1b"
    microbatches: int | None = None
    loss_parallel: bool = False  # cross-entropy on vocabulary-sharded logits (parallel/loss_parallel.py)
    sequence_parallel: bool = False  # norms and residual stream on sequence shards between tensor-parallel regions
    compile: bool | str = False  # torch.compile each block (parallel/compile.py); a str names the backend
    fsdp_settings: FSDPSettings = field(default_factory=FSDPSettings)  # a dict is accepted too

    def __post_init__(self) -> None:
        self.fsdp_settings = FSDPSettings.of(self.fsdp_settings)
        self._check_static()

    def _check_static(self) -> None:
        """Checks that need no world size."""
        for name in ("data_parallel_size", "tensor_parallel_size"):
            value = getattr(self, name)
            if value != "auto" and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive int or 'auto', got {value!r}.")
        for name in ("pipeline_parallel_size", "data_parallel_replicate_size", "microbatches"):
            value = getattr(self, name)
            if (value is None and name != "pipeline_parallel_size") or (
                    value == "auto" and name == "data_parallel_replicate_size"):
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
        if self.data_parallel_mode == "replicated" and self.fsdp_settings.changed():
            raise ValueError(
                f"fsdp_settings {self.fsdp_settings.changed()} apply to FSDP2, which data_parallel_mode='replicated'"
                " does not use (it all-reduces gradients in their own dtype); use 'fully_sharded' or 'hybrid', or"
                " drop them."
            )
        stages_per_rank(self.pipeline_schedule)
        checkpoint_mode(self.activation_checkpointing)
        for name in ("loss_parallel", "sequence_parallel"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        if not isinstance(self.compile, bool):
            import torch

            if self.compile not in torch.compiler.list_backends(exclude_tags=()):  # debug backends included
                raise ValueError(f"compile must be True, False or the name of a torch.compile backend (e.g."
                                 f" {', '.join(torch.compiler.list_backends())}, aot_eager), got {self.compile!r}.")

    @property
    def compile_backend(self) -> str | None:
        """The torch.compile backend blocks compile with: None (not compiled), "inductor" for ``compile=True``."""
        if self.compile is False:
            return None
        return "inductor" if self.compile is True else self.compile

    @property
    def checkpoint_mode(self) -> str | None:
        """None, "full" or "selective"."""
        return checkpoint_mode(self.activation_checkpointing)

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
        replicate, shard = self._split_data_parallel(dp, world_size // devices_per_node)
        problem = compile_problem(self.compile, tp, shard, self.sequence_parallel, self.activation_checkpointing)
        if problem:
            raise ValueError(problem)
        return MeshShape(pipeline=pp, data_replicate=replicate, data_shard=shard, tensor=tp)

    def _split_data_parallel(self, dp: int, num_nodes: int) -> tuple[int, int]:
        if self.data_parallel_mode == "fully_sharded":
            return 1, dp
        if self.data_parallel_mode == "replicated":
            return dp, 1
        replicate = self.data_parallel_replicate_size
        if replicate == "auto":
            # One replica per node: each sharded group stays inside a node (all-gathers on the fast links),
            # only gradient all-reduces cross nodes. The ranks of a node are consecutive in the mesh.
            if dp % num_nodes:
                raise ValueError(
                    f"data_parallel_replicate_size='auto' places one replica on each of the {num_nodes} nodes, which"
                    f" needs data_parallel_size={dp} to be a multiple of {num_nodes}; valid sizes: {divisors(dp)}."
                )
            replicate = num_nodes
        if replicate is None:
            raise ValueError(
                "data_parallel_mode='hybrid' needs data_parallel_replicate_size (how many replicas of the"
                f" sharded group); with data_parallel_size={dp} valid values are {divisors(dp)}."
            )
        if dp % replicate:
            raise ValueError(
                f"data_parallel_replicate_size={replicate} does not divide data_parallel_size={dp};"
                f" valid values: {divisors(dp)}."
            )
        return replicate, dp // replicate


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _suggest(world_size: int, limit: int = 8) -> str:
    combos = [
        (dp, tp, pp)
        for dp, tp, pp in itertools.product(divisors(world_size), repeat=3)
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
    common = [d for d in divisors(min(sizes.values())) if all(size % d == 0 for size in sizes.values())]
    described = ", ".join(f"{name}={size}" for name, size in bad.items())
    raise ValueError(
        f"tensor_parallel_size={tensor_parallel_size} does not divide {described} of {model_name};"
        f" valid tensor_parallel_size values for this model: {', '.join(map(str, common))}."
    )


def check_pipeline(config: ParallelConfig, num_blocks: int, local_batch_size: int | None = None) -> None:
    """Pipeline checks that need the model (number of blocks) and, when known, the per-rank batch size."""
    pp = config.pipeline_parallel_size
    if pp == 1:
        return
    per_rank = stages_per_rank(config.pipeline_schedule)
    problem = too_few_blocks(pp * per_rank, num_blocks, per_rank)
    if problem:
        raise ValueError(f"pipeline_parallel_size={pp} with schedule {config.pipeline_schedule!r}: {problem}.")
    microbatches = config.microbatches or pp
    if config.pipeline_schedule != "gpipe" and microbatches < pp:
        raise ValueError(
            f"microbatches={microbatches} is fewer than pipeline_parallel_size={pp}; schedule"
            f" {config.pipeline_schedule!r} needs at least {pp} microbatches."
        )
    if local_batch_size is not None and local_batch_size % microbatches:
        raise ValueError(
            f"the batch size per data-parallel rank, {local_batch_size}, is not divisible by"
            f" microbatches={microbatches};"
            f" use a multiple of {microbatches}."
        )


# A stuck job ends itself after this long without a step (see processes/watch.py), unless the process group's timeout
# is shorter: then half of that, so that the watch, not a collective's timeout, reports where every rank is.
DEFAULT_PROGRESS_TIMEOUT_S = 300.0
COMPILING_PROGRESS_TIMEOUT_S = 900.0


def progress_timeout_seconds(progress_timeout: Union[float, timedelta, None, Literal["auto"]],
                             timeout: Optional[timedelta], compiling: bool = False) -> Optional[float]:
    """``progress_timeout`` in seconds (None: no progress watch); ``timeout`` is the process group's.
    ``compiling``: blocks are compiled in the first step, which can take minutes (measured: 5-6 min for a tiny
    model on 2 loaded CPU cores), so "auto" allows half the process-group timeout (15 min by default)."""
    group_s = timeout.total_seconds() if timeout is not None else None
    if progress_timeout == "auto":
        if compiling:
            return COMPILING_PROGRESS_TIMEOUT_S if group_s is None else group_s / 2
        return DEFAULT_PROGRESS_TIMEOUT_S if group_s is None else min(DEFAULT_PROGRESS_TIMEOUT_S, group_s / 2)
    if progress_timeout is None:
        return None
    seconds = progress_timeout.total_seconds() if isinstance(progress_timeout, timedelta) else progress_timeout
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
        raise ValueError(
            f"progress_timeout={progress_timeout!r}: give seconds (a positive number) or a timedelta, 'auto'"
            f" ({DEFAULT_PROGRESS_TIMEOUT_S:g} s or half the process-group timeout) or None (no progress watch)."
        )
    if group_s is not None and seconds >= group_s:
        raise ValueError(
            f"progress_timeout={seconds:g} s is not shorter than the process-group timeout={group_s:g} s: a stuck"
            f" collective would time out first, without saying where each rank is; use less than {group_s:g} s."
        )
    return float(seconds)


# Names for Trainer(strategy=...) and LightningCLI (``trainer.strategy: lightning_mp``): only layouts that
# need no numbers, since a name cannot carry them (pass init_args or an instance for anything else).
STRATEGY_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "lightning_mp": ("FSDP2 over all ranks (fully sharded), no tensor or pipeline parallelism", {}),
    "lightning_mp_hybrid": ("FSDP2 within each node, replicated across nodes (HSDP)",
                            {"data_parallel_mode": "hybrid", "data_parallel_replicate_size": "auto"}),
    "lightning_mp_tensor_parallel": ("tensor parallel over the devices of a node, FSDP2 across nodes"
                                     " (Lightning's ModelParallelStrategy default)", {"tensor_parallel_size": "auto"}),
}
