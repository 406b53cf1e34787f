"""Decoder shapes (Llama, Mistral, Qwen2, Qwen3) read from a transformers config, and the one entry point
that reads any supported config (``shape_from_config``).

Parameters are listed tensor by tensor as the strategy cuts them (``plans/hf.py`` maps transformers'
own tp plans: q/k/v and gate/up column-wise, o/down row-wise, the untied ``lm_head`` column-wise and
the untied embedding row-wise, both over the vocabulary; norms and tied embeddings/head replicated).

Activations: what autograd keeps for backward, counted tensor by tensor for transformers' decoder layer
(``LlamaDecoderLayer`` and its copies) with PyTorch's fused attention, checked against saved-tensor
hooks on real jobs (``benchmarks/planner_memory.py``). Per layer and microbatch of ``n = b·s`` tokens,
hidden h, a heads and k KV heads of width d, FFN width i, tensor-parallel size t, compute element size
e bytes:

- each RMSNorm (two per layer): its input upcast to fp32 (the input itself in fp32), the normalised
  value and the weighted output in the compute dtype, one fp32 ``rsqrt`` per token:
  ``n·h·(4 + 2e) + 4n`` — replicated over tensor ranks (what sequence parallelism splits, below);
- attention: rotated q (``n·a·d``) and k (``n·k·d``), v (``n·k·d``) and the output (``n·a·d``, whose
  head-merged view is o_proj's input) in the compute dtype, and the fp32 log-sum-exp (``n·a``), all split
  over tensor ranks. Grouped-query attention keeps k and v at the KV width: without an attention mask,
  transformers passes ``enable_gqa`` to SDPA instead of repeating them (with a padding mask they are
  repeated to all heads: not modelled). No s × s scores (fused attention), no biases' or dropout's
  tensors (these families train without dropout; a bias adds nothing autograd keeps);
- gated FFN: gate output (kept by the activation), its activation, up output and their product (down's
  input): ``4·n·i`` elements split over tensor ranks (2 for an ungated FFN);
- Qwen3's q/k norms over the head width: fp32 input and normalised value, ``n·(a + k)·d·(4 + e)`` + rsqrt.

This is Korthikanti et al. 2022's per-layer count (eq. 2) redone for pre-norm RMSNorm, a gated FFN,
grouped-query attention, no biases/dropout and fused attention. On every stage the rotary cos/sin
(``2·s·d·e``, broadcast over the batch) are kept once per microbatch; the first stage keeps the token
ids (int64), the last the final norm, the fp32 log-probabilities of the full vocabulary
(``n·V·4``, on every tensor rank: the head's output is gathered) and the shifted labels.

The three switches (checked against real jobs in ``benchmarks/planner_memory.py``):

- sequence parallelism: each norm keeps its fp32 input, normalised value and rsqrt for its n/t tokens;
  the weighted output is all-gathered for q/k/v (and gate/up), and the matmuls keep the gathered
  ``n·h·e`` whole — PyTorch saves a column-wise matmul's gathered input, where Megatron keeps the shard
  and gathers again in backward (Korthikanti's ``34/t`` assumes that). Per layer
  ``2·n·h·e + [2·(n·h·(4 + e) + 4n) + split]/t``; the final norm likewise, its gathered output kept by
  the head;
- loss parallelism: the head's output stays sharded over the vocabulary, the log-probabilities are
  ``n·V·4/t``;
- selective checkpointing (``parallel/activation_checkpointing.py``): a layer keeps its input and the
  outputs of its matmuls, attention kernel and tensor-parallel collectives (``selective_layer_bytes``);
  its element-wise tensors exist again only while backward recomputes it, one layer at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

Tensors = list[tuple[tuple[int, ...], str]]

# model_type -> what its layer has beyond Llama's: biases on q/k/v, on o_proj, in the FFN; q/k norms.
# ``None``: read the config's ``attention_bias`` / ``mlp_bias``.
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": dict(qkv_bias=None, out_bias=None, mlp_bias=None, qk_norm=False),
    "mistral": dict(qkv_bias=False, out_bias=False, mlp_bias=False, qk_norm=False),
    "qwen2": dict(qkv_bias=True, out_bias=False, mlp_bias=False, qk_norm=False),
    "qwen3": dict(qkv_bias=None, out_bias=None, mlp_bias=False, qk_norm=True),
}
GATED_ACTIVATIONS = ("silu", "swish", "gelu_pytorch_tanh", "gelu")


@dataclass(frozen=True)
class LayerActivations:
    """Bytes one layer keeps for one microbatch: ``replicated`` on every tensor rank (sequence parallelism
    would divide these by t), ``split`` already divided over tensor ranks."""

    replicated: float
    split: float

    @property
    def total(self) -> float:
        return self.replicated + self.split


@dataclass(frozen=True)
class DecoderShape:
    """A decoder-only causal LM of the Llama lineage: pre-norm RMSNorm, rotary positions, grouped-query
    attention, gated FFN, optional biases and q/k norms, tied or untied head."""

    family: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    head_dim: int = 0  # 0: hidden // heads
    gated: bool = True
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    tied: bool = False
    norm: str = "rms"  # what the activation count assumes; the families read here all use RMSNorm
    positions: str = "rotary"  # no position parameters; cos/sin recomputed per forward
    dropout: bool = False

    def __post_init__(self) -> None:
        if self.heads % self.kv_heads:
            raise ValueError(f"{self.family}: {self.heads} attention heads are not a multiple of"
                             f" {self.kv_heads} KV heads.")
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.hidden // self.heads)

    @classmethod
    def from_config(cls, config: Any) -> "DecoderShape":
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        family = getattr(config, "model_type", "?")
        if family not in FAMILIES:
            raise ValueError(f"the planner does not know the layer of model_type={family!r}; it plans"
                             f" {', '.join(['bert', *FAMILIES])}.")
        knobs = dict(FAMILIES[family])
        attention_bias, mlp_bias = (bool(getattr(config, "attention_bias", False)),
                                    bool(getattr(config, "mlp_bias", False)))
        for key, default in (("qkv_bias", attention_bias), ("out_bias", attention_bias), ("mlp_bias", mlp_bias)):
            knobs[key] = default if knobs[key] is None else knobs[key]
        activation = getattr(config, "hidden_act", "silu")
        if activation not in GATED_ACTIVATIONS:
            raise ValueError(f"{family}: hidden_act={activation!r} is not a gated FFN activation the planner counts"
                             f" ({', '.join(GATED_ACTIVATIONS)}).")
        return cls(family=family, layers=config.num_hidden_layers, hidden=config.hidden_size,
                   heads=config.num_attention_heads,
                   kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
                   intermediate=config.intermediate_size, vocab=config.vocab_size,
                   head_dim=getattr(config, "head_dim", None) or 0,
                   tied=bool(getattr(config, "tie_word_embeddings", False)),
                   dropout=float(getattr(config, "attention_dropout", 0.0) or 0.0) > 0, **knobs)

    # ---------------------------------------------------------------- parameters
    def layer_tensors(self) -> Tensors:
        """(shape, how tensor parallelism cuts it) for every parameter of one decoder layer."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        col, row, rep = "colwise", "rowwise", "replicated"
        tensors: Tensors = [((h,), rep), ((q, h), col), ((kv, h), col), ((kv, h), col), ((h, q), row), ((h,), rep)]
        tensors += [((q,), col), ((kv,), col), ((kv,), col)] if self.qkv_bias else []
        tensors += [((h,), rep)] if self.out_bias else []
        tensors += [((self.head_dim,), rep)] * 2 if self.qk_norm else []  # head-sharded norms keep full weights
        tensors += [((i, h), col), ((i, h), col), ((h, i), row)] if self.gated else [((i, h), col), ((h, i), row)]
        tensors += ([((i,), col)] * (2 if self.gated else 1) + [((h,), rep)]) if self.mlp_bias else []
        return tensors

    def embedding_tensors(self) -> Tensors:
        # transformers' plans split an untied embedding over the vocabulary (``embedding_rowwise``); a tied
        # one stays whole, like its head.
        return [((self.vocab, self.hidden), "replicated" if self.tied else "vocab")]

    def head_tensors(self, pipelined: bool = True) -> Tensors:
        """Final norm and ``lm_head``. A tied head is the embedding's own tensor in one model (not counted
        again unless ``pipelined``: then the last stage holds a copy); it stays replicated over tensor ranks."""
        norm: Tensors = [((self.hidden,), "replicated")]
        if self.tied and not pipelined:
            return norm
        return norm + [((self.vocab, self.hidden), "replicated" if self.tied else "colwise")]

    def parameters(self) -> int:
        count = lambda tensors: sum(math.prod(shape) for shape, _ in tensors)  # noqa: E731
        return (count(self.embedding_tensors()) + self.layers * count(self.layer_tensors())
                + count(self.head_tensors(pipelined=False)))

    @property
    def attention_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def vocabulary_sharded_head(self) -> bool:
        """An untied ``lm_head`` is split over the vocabulary by tensor parallelism (a tied one is replicated)."""
        return not self.tied

    def tensor_parallel_problem(self, tp: int) -> Optional[str]:
        """Why ``tp`` tensor ranks cannot split this model (every sharded size must divide), or None."""
        sizes = {"attention heads": self.heads, "KV heads": self.kv_heads, "FFN width": self.intermediate}
        if not self.tied:  # the untied head is split over the vocabulary
            sizes["vocabulary (sharded lm_head)"] = self.vocab
        bad = [f"{value} {name}" for name, value in sizes.items() if value % tp]
        if not bad:
            return None
        valid = [d for d in range(1, self.kv_heads + 1) if all(v % d == 0 for v in sizes.values())]
        return f"tp={tp} does not divide the {', '.join(bad)} (valid: {', '.join(map(str, valid))})"

    # ---------------------------------------------------------------- activations (module docstring)
    def switch_problem(self, switch: str, tp: int, pp: int) -> Optional[str]:
        """Why ``sequence_parallel`` / ``loss_parallel`` cannot be on for this model and degrees (the
        strategy's own refusals), or None; "selective" checkpointing applies to every decoder."""
        if switch == "selective":
            return None
        if tp == 1:
            return f"{switch} needs tensor parallelism (tp=1)"
        if pp > 1:
            return f"{switch} is not supported with a pipeline (pp={pp})"
        if self.tied:
            return f"{switch} needs an untied lm_head (a tied head stays replicated over tensor ranks)"
        return None

    def layer_activations(self, b: float, s: int, t: int, element: int,
                          sequence_parallel: bool = False) -> LayerActivations:
        n, h, d, e = b * s, self.hidden, self.head_dim, element
        a, k = self.heads, self.kv_heads
        split = n * e * (2 * a * d + 2 * k * d + (4 if self.gated else 2) * self.intermediate) + 4 * n * a
        if self.qk_norm:
            split += n * (a + k) * d * (4 + e) + 4 * n * (a + k)
        if not sequence_parallel:
            return LayerActivations(2 * (n * h * (4 + 2 * e) + 4 * n), split / t)
        # Each norm works on n/t tokens (fp32 input, normalised value, rsqrt); its weighted output is
        # all-gathered for the column-wise projections, and autograd keeps the gathered n·h (one storage
        # shared by q/k/v, one by gate/up): torch's SP keeps it whole, Megatron re-gathers it in backward.
        return LayerActivations(2 * n * h * e, (split + 2 * (n * h * (4 + e) + 4 * n)) / t)

    def checkpointed_layer_bytes(self, b: float, s: int, t: int, element: int,
                                 sequence_parallel: bool = False) -> float:
        """A checkpointed layer keeps its input (rotary cos/sin are counted once per stage); under sequence
        parallelism the input is this rank's sequence shard."""
        return b * s * self.hidden * element / (t if sequence_parallel else 1)

    def selective_layer_bytes(self, b: float, s: int, t: int, element: int,
                              sequence_parallel: bool = False) -> float:
        """What selective checkpointing keeps per layer (``parallel/activation_checkpointing.py``): the input,
        and the outputs of the matmuls, of the attention kernel and of the tensor-parallel collectives.
        Column-wise outputs (q, k, v, gate, up) and attention's output and fp32 log-sum-exp are split over
        tensor ranks; the row-wise outputs (o, down) are partial sums of full size on every rank; their
        all-reduce outputs are full too, under sequence parallelism their reduce-scatter outputs are a
        1/t shard and the all-gathers of the two norm outputs are kept whole."""
        n, h, d, e = b * s, self.hidden, self.head_dim, element
        a, k = self.heads, self.kv_heads
        column = n * e * (a * d + 2 * k * d + (2 if self.gated else 1) * self.intermediate)
        attention = n * e * a * d + 4 * n * a
        row = 2 * n * h * e
        collectives = 0.0
        if t > 1:
            collectives = 2 * n * h * e * (1 / t + 1) if sequence_parallel else 2 * n * h * e
        kept_input = self.checkpointed_layer_bytes(b, s, t, element, sequence_parallel)
        return kept_input + (column + attention) / t + row + collectives

    def head_activation_bytes(self, b: float, s: int, t: int, element: int, sequence_parallel: bool = False,
                              loss_parallel: bool = False) -> float:
        """The last stage's, per microbatch: the final norm (under sequence parallelism on n/t tokens, its
        output gathered for the head), the fp32 log-probabilities (``n·V·4``; split over tensor ranks with
        loss parallelism), the shifted labels and the loss's fp32 total weight. Freed by the first steps
        of backward, before any checkpointed layer is recomputed."""
        n, h, e = b * s, self.hidden, element
        norm = n * h * (4 + 2 * e) + 4 * n
        if sequence_parallel:
            norm = (n * h * (4 + e) + 4 * n) / t + n * h * e
        return norm + n * self.vocab * 4 / (t if loss_parallel else 1) + n * 8 + 4

    def stage_activation_bytes(self, b: float, s: int, t: int, element: int, first: bool, last: bool,
                               sequence_parallel: bool = False, loss_parallel: bool = False) -> float:
        """Per microbatch, beyond the layers: rotary cos/sin, token ids (first), ``head_activation_bytes``
        (last)."""
        n = b * s
        total = 2 * s * self.head_dim * element
        total += n * 8 if first else 0
        total += self.head_activation_bytes(b, s, t, element, sequence_parallel, loss_parallel) if last else 0
        return total


def shape_from_config(config: Any, labels: Optional[int] = None) -> Any:
    """The planner's shape of a transformers config: BERT (token classifier) or a decoder family."""
    from lightning_mp.planner.inputs import ModelShape

    model_type = getattr(config, "model_type", None)
    if model_type == "bert":
        return ModelShape.from_config(config, labels=labels)
    if model_type in FAMILIES or hasattr(config, "get_text_config"):
        return DecoderShape.from_config(config)
    raise ValueError(f"the planner reads transformers configs; got {type(config).__name__}.")
