"""Choosing the tracked layers of a model by name patterns and module types.

**The default selection** (``patterns=None``) is every supported layer except

* the *embedding and unembedding* layers: a layer with a factor side of the vocabulary's size
  (its input or output width equals ``num_embeddings`` of the model's vocabulary embedding), a
  layer whose weight shares storage with an ``nn.Embedding``'s weight (tied embeddings, as in
  GPT-2 and Gemma), and a transformers model's output embeddings (``get_output_embeddings()``).
  Their output-gradient factor is vocabulary² (50257² float32 is 10 GB for GPT-2), and the
  EK-FAC influence papers track the MLP and attention layers only;
* when the model is *partly frozen* (some parameters have ``requires_grad=False``, others not,
  as with LoRA adapters on a frozen base): the layers none of whose parameters are trainable.

What was left out is reported in one ``logging`` line (logger ``lightning_influence.layers.selection``,
level WARNING, rank zero only) that names the layers and how to include them: name them in
``layers=`` (explicit patterns select what they match, vocabulary-sized and frozen layers included;
``layers="*"`` selects every supported layer).

The vocabulary embedding is the one transformers returns from ``get_input_embeddings()`` (any
submodule that has the method); in a model without it, the ``nn.Embedding`` with the most rows
(a vocabulary is normally the largest table). In a model whose hidden width equals its vocabulary
size the rule also leaves out layers of that width: the notice names them; name them in
``layers=`` to track them.
"""

from __future__ import annotations

import logging
from typing import Iterable, Optional

import torch
from torch import nn

from ..patterns import PatternError, matches, preview, select_names
from .base import LayerSelectionError, TrackedLayer, layer_class_for, named_modules, supported_layer_types, supported_type_names

__all__ = ["select_layers", "default_exclusions"]

logger = logging.getLogger(__name__)


def select_layers(
    model: nn.Module,
    patterns: Optional[str | Iterable[str]] = None,
    types: Optional[Iterable[type]] = None,
    exclude: Optional[str | Iterable[str]] = None,
    owner: str = "select_layers",
) -> list[TrackedLayer]:
    """Select layers by glob ``patterns`` over qualified module names and by ``types``.

    Patterns follow the library's one rule (:func:`lightning_influence.patterns.matches`):
    ``"mlp.*"`` and ``"*.dense_h_to_4h"`` match at any depth. Supported module types are those
    registered in :mod:`lightning_influence.layers` (:func:`supported_layer_types`).

    Args:
        model: the model (a LightningModule works; names include its attribute prefix).
        patterns: glob(s); ``None`` selects every supported layer except the vocabulary-sized
            (embedding/unembedding) layers and, in a partly frozen model, the frozen ones (see the
            module docstring; one log line names what was left out). Explicit patterns select
            what they match, those layers included (``"*"``: every supported layer). Each pattern
            must match at least one supported layer.
        types: restrict to these module types (subclasses of :func:`supported_layer_types`).
        exclude: glob(s) of names to leave out (e.g. ``"*lm_head"``); each must match a
            supported layer, so a renamed module never silently stays in.
        owner: who asks, for error messages.

    Returns:
        Tracked layers in module registration order, named as in the unwrapped model (FSDP1's
        and activation checkpointing's wrapper segments removed; see
        :func:`~lightning_influence.layers.unwrapped_name`).

    Raises:
        LayerSelectionError: a pattern matches no supported layer (the message says which
            unsupported modules it does match), nothing is selected, or a selected module of a
            supported type has a configuration that cannot be tracked (e.g. a convolution with
            ``groups > 1``: the message names each such layer and why; leave them out with
            ``exclude``). Messages list the available layer names and the supported types.
    """
    type_names = ", ".join(supported_type_names())
    if types is not None:
        supported = supported_layer_types()  # imports optional packages (transformers) only here
        types = tuple(types)
        bad = [t for t in types if not (isinstance(t, type) and issubclass(t, supported))]
        if bad:
            raise LayerSelectionError(
                f"{owner}: types={[getattr(t, '__name__', t) for t in bad]} are not supported; supported types: {type_names}"
            )
    wanted = tuple(types) if types else None
    pats = [patterns] if isinstance(patterns, str) else (None if patterns is None else list(patterns))
    excl = [exclude] if isinstance(exclude, str) else list(exclude or [])
    # the root itself counts when the model *is* a supported layer (name "")
    # names of the unwrapped model (FSDP1 / activation-checkpointing wrappers removed)
    modules = {n: m for n, m in named_modules(model).items() if n or layer_class_for(m) is not None}
    candidates = {
        n: cls for n, m in modules.items()
        if (cls := layer_class_for(m)) is not None and (wanted is None or isinstance(m, wanted))
    }
    # a wrapper layer stands for the module it wraps (peft LoRA's base_layer): never both
    represented = {id(sub) for n, cls in candidates.items() for sub in cls.represented(modules[n])}
    candidates = {n: cls for n, cls in candidates.items() if id(modules[n]) not in represented}
    refused = {n: reason for n, cls in candidates.items() if (reason := cls.unsupported(modules[n])) is not None}
    available = [n for n in candidates if n not in refused]
    for pat in pats or []:
        if not any(matches(n, pat) for n in available):
            hit_refused = [f"{n} ({refused[n]})" for n in refused if matches(n, pat)]
            unsupported = [f"{n} ({type(m).__name__})" for n, m in modules.items()
                           if matches(n, pat) and n not in candidates and not list(m.children())]
            detail = ""
            if hit_refused:
                detail = f"; it matches layers that cannot be tracked: {hit_refused[:10]}"
            elif unsupported:
                detail = f"; it matches unsupported modules {unsupported[:10]}"
            raise LayerSelectionError(
                f"{owner}(layers=...): pattern {pat!r} matches no supported layer{detail}. "
                f"Supported layers in this model: {_preview(available)} (supported types: {type_names})"
            )
    try:
        names = select_names(list(candidates), pats, excl, what="supported layer", owner=owner)
    except PatternError as e:
        raise LayerSelectionError(f"{e} (supported types: {type_names})") from None
    blocked = [f"{n}: {refused[n]}" for n in names if n in refused]
    if blocked:
        raise LayerSelectionError(
            f"{owner}: the selection includes layers that cannot be tracked:\n  " + "\n  ".join(blocked)
            + f"\nLeave them out with exclude={[n for n in names if n in refused][:10]} (or narrower layers=...)."
        )
    layers = [candidates[n](n, modules[n]) for n in names]
    if pats is None:
        layers = _apply_default(model, modules, layers, owner)
    return layers


def default_exclusions(model: nn.Module, layers: Iterable[TrackedLayer]) -> dict[str, str]:
    """Which of ``layers`` the default selection leaves out, and why.

    Args:
        model: the model the layers belong to.
        layers: candidate tracked layers of ``model``.

    Returns:
        Layer name → reason (``"output width 50257 = vocabulary size"``,
        ``"weight tied to embedding 'transformer.wte'"``, ``"frozen"``, ...), in the layers' order;
        empty when nothing is left out.
    """
    layers = list(layers)
    modules = named_modules(model)
    reasons = _vocabulary_reasons(modules, layers)
    for layer, why in _frozen_reasons(model, layers).items():
        reasons.setdefault(layer, why)
    return {l.name: reasons[l.name] for l in layers if l.name in reasons}


def _apply_default(model: nn.Module, modules: dict[str, nn.Module], layers: list[TrackedLayer], owner: str) -> list[TrackedLayer]:
    vocab = _vocabulary_reasons(modules, layers)
    frozen = {n: r for n, r in _frozen_reasons(model, layers).items() if n not in vocab}
    if not vocab and not frozen:
        return layers
    kept = [l for l in layers if l.name not in vocab and l.name not in frozen]
    parts = []
    if vocab:
        parts.append(f"{len(vocab)} embedding/unembedding layer(s) with a vocabulary-sized factor side "
                     f"[{_reasons(vocab)}]")
    if frozen:
        parts.append(f"{len(frozen)} frozen layer(s) (no trainable parameter; the model is partly frozen) "
                     f"[{preview(list(frozen), 10)}]")
    left_out = list(vocab) + list(frozen)
    how = (f"to track them, name them in layers= (explicit patterns include them: your patterns plus "
           f"{left_out[0]!r}, or layers='*' for every supported layer)")
    if not kept:
        raise LayerSelectionError(
            f"{owner}: by default every supported layer is left out: " + "; ".join(parts) + f"; {how}"
        )
    if _rank_zero():
        logger.warning("%s: left out by default %s; %s", owner, "; and ".join(parts), how)
    return kept


def _reasons(reasons: dict[str, str], limit: int = 10) -> str:
    items = [f"{n}: {r}" for n, r in list(reasons.items())[:limit]]
    more = f", ... (+{len(reasons) - limit} more)" if len(reasons) > limit else ""
    return ", ".join(items) + more


def _rank_zero() -> bool:
    try:
        return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or torch.distributed.get_rank() == 0
    except Exception:  # pragma: no cover - a half-initialised process group
        return True


def _storage(t: Optional[torch.Tensor]) -> Optional[int]:
    """An id of the storage behind ``t`` (``None`` for empty, meta or absent tensors)."""
    if t is None or t.numel() == 0 or t.device.type == "meta":
        return None
    try:
        return t.untyped_storage().data_ptr() or None
    except Exception:  # sharded / wrapped tensors without a plain storage: no tie detected
        return None


def _vocabulary_reasons(modules: dict[str, nn.Module], layers: list[TrackedLayer]) -> dict[str, str]:
    """Layer name → why it counts as an embedding/unembedding layer (see the module docstring)."""
    embeddings = {n: m for n, m in modules.items() if isinstance(m, nn.Embedding)}
    output_embeddings: set[int] = set()
    vocab: dict[int, nn.Embedding] = {}
    for m in modules.values():
        for attr, sink in (("get_input_embeddings", "in"), ("get_output_embeddings", "out")):
            get = getattr(type(m), attr, None)
            if not callable(get):
                continue
            try:
                e = getattr(m, attr)()
            except Exception:  # not implemented by this model class
                continue
            if sink == "in" and isinstance(e, nn.Embedding):
                vocab[id(e)] = e
            elif sink == "out" and isinstance(e, nn.Module):
                output_embeddings.add(id(e))
    if not vocab and embeddings:
        rows = max(e.num_embeddings for e in embeddings.values())
        vocab = {id(e): e for e in embeddings.values() if e.num_embeddings == rows}
    sizes = {int(e.num_embeddings) for e in vocab.values()}
    tied = {s: n for n, e in embeddings.items() if (s := _storage(e.weight)) is not None}
    reasons: dict[str, str] = {}
    for layer in layers:
        weight = getattr(layer.module, "weight", None)
        storage = _storage(weight) if isinstance(weight, torch.Tensor) else None
        if storage is not None and storage in tied:
            reasons[layer.name] = f"weight tied to embedding {tied[storage]!r}"
        elif layer.d_out in sizes:
            reasons[layer.name] = f"output width {layer.d_out} = vocabulary size"
        elif layer.d_in in sizes:
            reasons[layer.name] = f"input width {layer.d_in} = vocabulary size"
        elif id(layer.module) in output_embeddings:
            reasons[layer.name] = "the model's output embeddings"
    return reasons


def _frozen_reasons(model: nn.Module, layers: list[TrackedLayer]) -> dict[str, str]:
    """Layer name → ``"frozen"`` for layers without a trainable parameter, when the model is
    partly frozen (some parameters trainable, some not); empty otherwise."""
    flags = {p.requires_grad for p in model.parameters()}
    if flags != {True, False}:
        return {}
    return {l.name: "frozen" for l in layers if not any(p.requires_grad for p in l.parameters())}


def _preview(names: list[str]) -> str:
    return preview(names) if names else "none"
