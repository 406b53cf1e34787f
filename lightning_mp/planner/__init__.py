"""Choose parallel degrees for a model on a cluster: fit memory first, then minimise the estimated step
time. Shapes: a BERT token classifier (``inputs.ModelShape``) and the Llama lineage of decoders
(``shapes.DecoderShape``: Llama, Mistral, Qwen2, Qwen3), both read from a transformers config by
``shape_from_config``. ``memory`` documents the memory model (exact state bytes, activations after
Korthikanti et al. 2022 adjusted per family), ``time`` the step-time estimate, ``search`` the choice."""

from lightning_mp.planner.inputs import BYTES, PARAM_BYTES, Cluster, Layout, ModelShape, device_memory_gb
from lightning_mp.planner.memory import (
    Memory,
    activation_bytes,
    activation_bytes_per_rank,
    chunk_size,
    fullest_state_bytes,
    in_flight,
    memory,
    stage_parts,
    state_bytes,
    switch_problems,
)
from lightning_mp.planner.search import AutoLayout, Candidate, candidates, choose, format_table
from lightning_mp.planner.shapes import DecoderShape, LayerActivations, shape_from_config
from lightning_mp.planner.time import StepTime, bubble_fraction, step_time

__all__ = ["AutoLayout", "BYTES", "Candidate", "Cluster", "DecoderShape", "LayerActivations", "Layout", "Memory",
           "ModelShape", "PARAM_BYTES", "StepTime", "activation_bytes", "activation_bytes_per_rank", "bubble_fraction",
           "candidates", "choose", "chunk_size", "device_memory_gb", "format_table", "fullest_state_bytes", "in_flight",
           "memory", "shape_from_config", "stage_parts", "state_bytes", "step_time", "switch_problems"]
