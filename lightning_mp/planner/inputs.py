"""What the planner plans for: the model's shape, the cluster, and a candidate layout."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Union

from lightning_mp.config import PRECISIONS, checkpoint_mode
from lightning_mp.planner.shapes import LayerActivations

# Bytes per element of activations / gathered parameters, and of stored parameters, per Lightning precision.
BYTES = {name: p.compute_bytes for name, p in PRECISIONS.items()}
PARAM_BYTES = {name: p.parameter_bytes for name, p in PRECISIONS.items()}


@dataclass(frozen=True)
class ModelShape:
    """A BERT token classifier's shape (``BertForTokenClassification``: no pooler)."""

    layers: int
    hidden: int
    heads: int
    intermediate: int
    vocab: int = 30522
    positions: int = 512
    token_types: int = 2
    labels: int = 9
    dropout: bool = True

    @classmethod
    def from_config(cls, config: Any, labels: Optional[int] = None) -> "ModelShape":
        """From a transformers ``BertConfig``."""
        return cls(layers=config.num_hidden_layers, hidden=config.hidden_size, heads=config.num_attention_heads,
                   intermediate=config.intermediate_size, vocab=config.vocab_size,
                   positions=config.max_position_embeddings, token_types=config.type_vocab_size,
                   labels=labels if labels is not None else config.num_labels,
                   dropout=config.hidden_dropout_prob > 0)

    def layer_tensors(self) -> list[tuple[tuple[int, ...], str]]:
        """(shape, how tensor parallelism cuts it) for every parameter of one encoder layer."""
        h, i = self.hidden, self.intermediate
        col, row, rep = "colwise", "rowwise", "replicated"
        return [((h, h), col), ((h,), col)] * 3 + [
            ((h, h), row), ((h,), rep), ((h,), rep), ((h,), rep),  # attention out dense, its LayerNorm
            ((i, h), col), ((i,), col),  # FFN in
            ((h, i), row), ((h,), rep), ((h,), rep), ((h,), rep),  # FFN out, LayerNorm
        ]

    def embedding_tensors(self) -> list[tuple[tuple[int, ...], str]]:
        h = self.hidden
        return [((self.vocab, h), "replicated"), ((self.positions, h), "replicated"),
                ((self.token_types, h), "replicated"), ((h,), "replicated"), ((h,), "replicated")]

    def head_tensors(self, pipelined: bool = True) -> list[tuple[tuple[int, ...], str]]:
        return [((self.labels, self.hidden), "replicated"), ((self.labels,), "replicated")]

    def parameters(self) -> int:
        count = lambda tensors: sum(math.prod(shape) for shape, _ in tensors)  # noqa: E731
        return count(self.embedding_tensors()) + self.layers * count(self.layer_tensors()) + count(self.head_tensors())

    tied = False  # the classifier head has its own weights
    vocabulary_sharded_head = False  # the classifier is replicated over tensor ranks

    @property
    def attention_width(self) -> int:
        return self.hidden

    def tensor_parallel_problem(self, tp: int) -> Optional[str]:
        if self.heads % tp or self.intermediate % tp:
            return f"tp={tp} does not divide {self.heads} heads / FFN width {self.intermediate}"
        return None

    # Activations per microbatch of b sequences × s tokens (planner/memory.py documents the BERT count):
    # replicated over tensor ranks the layer input, two LayerNorm inputs, the FFN input, fp32 LayerNorm
    # statistics and dropout masks; split the q, k, v, attention output, FFN activation in/out, log-sum-exp.
    def layer_activations(self, b: float, s: int, t: int, element: int,
                          sequence_parallel: bool = False) -> LayerActivations:  # not modelled: switch_problem
        h, i, a = self.hidden, self.intermediate, self.heads
        replicated = 4 * s * b * h * element + 4 * s * b * 4 + (2 * s * b * h if self.dropout else 0)
        return LayerActivations(replicated, (4 * s * b * h + 2 * s * b * i + s * b * a) * element / t)

    def checkpointed_layer_bytes(self, b: float, s: int, t: int, element: int,
                                 sequence_parallel: bool = False) -> float:
        return s * b * self.hidden * element

    def switch_problem(self, switch: str, tp: int, pp: int) -> Optional[str]:
        """Sequence parallelism and selective checkpointing exist for BERT in the strategy but are not
        modelled here; loss parallelism needs a vocabulary-sharded head, which a token classifier lacks."""
        if switch == "loss_parallel":
            return "loss_parallel needs a vocabulary-sharded head; BERT's token classifier is replicated"
        return f"{switch} is not modelled by the planner for BERT"

    def head_activation_bytes(self, b: float, s: int, t: int, element: int, **_: Any) -> float:
        """The classifier's input, fp32 log-probabilities, labels (and its dropout mask)."""
        return (s * b * self.hidden * element + s * b * self.labels * 4 + s * b * 8
                + (s * b * self.hidden if self.dropout else 0))

    def stage_activation_bytes(self, b: float, s: int, t: int, element: int, first: bool, last: bool,
                               **_: Any) -> float:
        """Embeddings: the LayerNorm input and two index tensors (and a dropout mask); the head's
        ``head_activation_bytes``."""
        total = (s * b * self.hidden * element + 2 * s * b * 8 + (s * b * self.hidden if self.dropout else 0)
                 if first else 0)
        return total + (self.head_activation_bytes(b, s, t, element) if last else 0)


@dataclass(frozen=True)
class Cluster:
    """Devices and links. Defaults: an H100 node (989 TFLOP/s bf16 dense at 40% MFU, NVLink ~450 GB/s per
    GPU) and 400 Gb/s (~50 GB/s) per GPU between nodes."""

    devices_per_node: int
    num_nodes: int = 1
    device_memory_gb: float = 80.0
    flops: float = 989e12
    mfu: float = 0.4
    intra_node_gbps: float = 450.0
    inter_node_gbps: float = 50.0
    usable_fraction: float = 0.9  # headroom for the framework, allocator fragmentation and buffers

    @property
    def world_size(self) -> int:
        return self.devices_per_node * self.num_nodes


@dataclass(frozen=True)
class Layout:
    data: int
    tensor: int
    pipeline: int
    mode: str = "fully_sharded"  # fully_sharded | hybrid | replicated
    replicate: int = 1  # hybrid: replicas of the sharded group
    microbatches: int = 1
    schedule: str = "1f1b"
    activation_checkpointing: Union[bool, str] = False  # False | True (= "full") | "full" | "selective"
    sequence_parallel: bool = False  # norms and residual stream on sequence shards (tensor > 1, no pipeline)
    loss_parallel: bool = False  # cross-entropy on vocabulary-sharded logits (tensor > 1, untied head, no pipeline)

    @property
    def shard(self) -> int:
        return {"fully_sharded": self.data, "replicated": 1}.get(self.mode, self.data // self.replicate)

    @property
    def checkpointing(self) -> Optional[str]:
        """None, "full" or "selective"."""
        return checkpoint_mode(self.activation_checkpointing)

    def strategy_kwargs(self) -> dict[str, Any]:
        """The ModelParallelStrategy arguments of this layout."""
        kwargs: dict[str, Any] = dict(data_parallel_size=self.data, tensor_parallel_size=self.tensor,
                                      pipeline_parallel_size=self.pipeline, data_parallel_mode=self.mode,
                                      activation_checkpointing=self.checkpointing or False,
                                      sequence_parallel=self.sequence_parallel, loss_parallel=self.loss_parallel)
        if self.mode == "hybrid":
            kwargs["data_parallel_replicate_size"] = self.replicate
        if self.pipeline > 1:
            kwargs.update(pipeline_schedule=self.schedule, microbatches=self.microbatches)
        return kwargs

    def describe(self) -> str:
        text = f"dp={self.data} tp={self.tensor} pp={self.pipeline} {self.mode}"
        if self.mode == "hybrid":
            text += f"({self.replicate}x{self.shard})"
        if self.pipeline > 1:
            text += f" {self.schedule} m={self.microbatches}"
        text += " +SP" if self.sequence_parallel else ""
        text += " +LP" if self.loss_parallel else ""
        return text + {None: "", "full": " +AC", "selective": " +SAC"}[self.checkpointing]


def device_memory_gb(accelerator: str = "auto") -> float:
    """Memory of this machine's accelerator (GiB); 16 on CPU, where processes share the host memory."""
    import torch

    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / 2**30
    return 16.0
