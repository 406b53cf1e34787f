"""Choose parallel degrees for a BERT-shaped model on a cluster: fit memory first, then minimise the
estimated step time. ``memory`` documents the memory model (exact state bytes, activations after
Korthikanti et al. 2022 adjusted for BERT), ``time`` the step-time estimate, ``search`` the choice."""

from lightning_mp.planner.inputs import BYTES, PARAM_BYTES, Cluster, Layout, ModelShape, device_memory_gb
from lightning_mp.planner.memory import Memory, chunk_size, activation_bytes, in_flight, memory, stage_parts, state_bytes
from lightning_mp.planner.search import AutoLayout, Candidate, candidates, choose, format_table
from lightning_mp.planner.time import StepTime, bubble_fraction, step_time

__all__ = ["AutoLayout", "BYTES", "Candidate", "Cluster", "Layout", "Memory", "ModelShape", "PARAM_BYTES", "StepTime",
           "chunk_size", "activation_bytes", "bubble_fraction", "candidates", "choose", "device_memory_gb", "format_table",
           "in_flight", "memory", "stage_parts", "state_bytes", "step_time"]
