"""What ``compile=True`` cannot do yet: one rule, read by the strategy (an error) and the planner (a rejection).

Pure Python like config.py: it runs before any process is launched. Each refusal was measured with torch 2.13
(CPU, gloo; README "Compiling blocks") and names the torch failure, so that a newer torch that fixes it can be
tried by deleting one branch here.
"""

from __future__ import annotations

from typing import Optional


def compile_problem(compile: bool | str, tensor: int, shard: int, sequence_parallel: bool,
                    activation_checkpointing: bool | str) -> Optional[str]:
    """Why compiling blocks fails for this layout, as the message the strategy raises; None if it works.

    ``shard``: data-parallel ranks FSDP shards the parameters over (1 for replicated data parallelism).
    """
    if not compile or tensor == 1:
        return None
    # Tracing the backward of a view of a DTensor with symbolic sizes never ends (pytorch#152954); without sequence
    # parallelism the tensor-parallel linears get 2-D inputs instead (parallel/tensor.py, prepare_for_compile), with
    # it their inputs are sharded on the sequence dimension, which flattening would merge.
    if sequence_parallel:
        return (
            f"compile=True with tensor_parallel_size={tensor} and sequence_parallel=True is not supported yet: torch"
            f" {_torch_version()} fails to compile blocks whose inputs are sequence-sharded DTensors with dynamic"
            " shapes (RecursionError while tracing the backward of a view of a DTensor; upstream"
            " https://github.com/pytorch/pytorch/issues/152954). Use sequence_parallel=False (compile works with"
            " tensor parallelism without it), or compile=False."
        )
    # Traced activation checkpointing saves the tensor-parallel DeviceMesh for its recompute, and torch's
    # partitioner then files the mesh among the saved tensors (an AssertionError in the first compiled forward).
    if activation_checkpointing not in (False, None):
        return (
            f"compile=True with tensor_parallel_size={tensor} and activation_checkpointing="
            f"{activation_checkpointing!r} is not supported yet: torch {_torch_version()} saves the tensor-parallel"
            " DeviceMesh among the activations of the traced recompute and fails in the first compiled forward"
            " (AssertionError: expected all tensors_saved_with_vc_check to be Tensors). Use"
            " activation_checkpointing=False, or compile=False, or tensor_parallel_size=1 (compile works with"
            " activation checkpointing there)."
        )
    # With FSDP sharding the tensor-parallel parameters, tracing a backward view fails on a size that is neither the
    # batch nor the sequence (2*(16//s)*(16//(16//s)) on a tiny Llama whose tensor-parallel width is 16; most likely
    # from the all-gathered parameters): torch's proxy for the three-factor product calls a two-argument mul.
    if shard > 1:
        return (
            f"compile=True with tensor_parallel_size={tensor} and parameters sharded over {shard} data-parallel ranks"
            f" (FSDP) is not supported yet: torch {_torch_version()} fails to compile blocks whose tensor-parallel"
            " parameters FSDP all-gathers with dynamic shapes (TypeError: mul expected 2 arguments, got 3, while"
            " tracing the backward of a view). Use data_parallel_mode='replicated' (gradients all-reduced, no"
            " FSDP), or compile=False, or tensor_parallel_size=1."
        )
    return None


def _torch_version() -> str:
    import torch  # here, not at import: the config modules stay importable without torch's start-up cost

    return torch.__version__
