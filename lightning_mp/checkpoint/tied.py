"""Tied parameters are stored once in a checkpoint, under the name ``save_pretrained`` keeps.

One tensor used under several names (input and output embeddings with ``tie_word_embeddings=True``) is
one parameter in the unsplit model, but two under a pipeline: the first stage holds it under the
embedding's name and the last stage a copy under the head's name (``pipeline/tied.py`` keeps them
equal). A checkpoint keyed by whatever each rank holds would therefore depend on the layout: the
pipeline's copy would add ``lm_head.weight`` (and its optimizer state) that one process does not have.
So checkpoints keep one entry per tied tensor, under the name Hugging Face keeps (the source of
``all_tied_weights_keys``: ``model.embed_tokens.weight`` for Llama, ``transformer.wte.weight`` for
GPT-2; for other models the first name ``named_parameters`` gives), and loading reads every copy a rank
holds from that entry. The same key set then comes out of every layout, and any layout resumes from it.

The names are found once, on the unsplit model (before a pipeline split turns the tie into copies).
A full checkpoint then lacks the copies' names, which a plain module's strict ``load_state_dict`` wants:
:func:`add_tied_copies` in the module's ``on_load_checkpoint`` puts them back (the LLM recipe does).
"""

from __future__ import annotations

from typing import Any, Mapping

from torch import nn

# duplicate FQN -> the FQN stored in checkpoints, both relative to the LightningModule
TiedNames = Mapping[str, str]


def tied_names(module: nn.Module) -> dict[str, str]:
    """Every name of a tied parameter that checkpoints leave out, mapped to the one they keep."""
    names_of: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    kept_by_hf = _hf_sources(module)
    copies: dict[str, str] = {}
    for names in names_of.values():
        if len(names) > 1:
            kept = next((name for name in names if name in kept_by_hf), names[0])
            copies.update((name, kept) for name in names if name != kept)
    return copies


def _hf_sources(module: nn.Module) -> set[str]:
    """The names ``save_pretrained`` writes for tied weights (transformers' ``{target: source}`` mapping)."""
    sources = set()
    for path, submodule in module.named_modules():
        mapping = getattr(submodule, "all_tied_weights_keys", None)
        if isinstance(mapping, Mapping):
            sources.update(f"{path}.{source}" if path else source for source in mapping.values())
    return sources


def stored_key(key: str, tied: TiedNames, optimizer: bool = False) -> str:
    """The checkpoint key for a model key (an FQN) or a flattened optimizer key (``state.<fqn>.<name>``,
    ``param_groups.<fqn>.<name>``: the last component is never part of the FQN)."""
    if not tied:
        return key
    if not optimizer:
        return tied.get(key, key)
    kind, _, rest = key.partition(".")
    fqn, _, attribute = rest.rpartition(".")
    return f"{kind}.{tied[fqn]}.{attribute}" if fqn in tied else key


def without_copies(state: dict[str, Any], tied: TiedNames, optimizer: bool = False) -> dict[str, Any]:
    """``state`` without the entries of tied copies (what a checkpoint stores)."""
    return {key: value for key, value in state.items() if stored_key(key, tied, optimizer) == key}


def as_stored(state: dict[str, Any], tied: TiedNames, optimizer: bool = False) -> dict[str, Any]:
    """This rank's entries keyed by checkpoint names, for reading: a copy is read from the kept entry. When a
    rank holds both names of one parameter (no pipeline), the kept name is read once."""
    stored: dict[str, Any] = {}
    for key, value in state.items():
        stored.setdefault(stored_key(key, tied, optimizer), value)
    return stored


def add_tied_copies(module: nn.Module, state_dict: dict[str, Any]) -> None:
    """Add the entry of every tied copy of ``module`` to a full state dict, from the kept entry (in place), so
    that a plain module loads a checkpoint strictly. Call it from ``LightningModule.on_load_checkpoint``
    (``add_tied_copies(self, checkpoint["state_dict"])``; under lightning_mp's strategy the checkpoint reaching
    that hook has no ``state_dict``, and nothing is added)."""
    for copy, kept in tied_names(module).items():
        if kept in state_dict:
            state_dict.setdefault(copy, state_dict[kept])
