"""Which layers of a pre-trained and a fine-tuned model take part in multi-stage scores.

A pre-trained layer takes part when it is present, of a supported type and with equal geometry
``(d_out, d_in, bias)`` in both models and in both factor sets (a stage without factors is not
checked); every other considered layer is excluded with a reason. No Lightning import.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional

from torch import nn

from ..ekfac.factors import EKFACFactors, FactorMismatchError
from ..ekfac.preconditioner import StageDamping
from ..layers import LayerSelectionError, TrackedLayer, select_layers
from ..patterns import select_names

__all__ = ["NoSharedLayersError", "LayerMap", "pair_layers", "finetuned_damping"]

LayerMap = Optional[Mapping[str, str] | Callable[[str], str]]
"""Pre-trained layer name → fine-tuned layer name: a mapping, a callable, or ``None`` (same names)."""


class NoSharedLayersError(FactorMismatchError):
    """The pre-trained and fine-tuned models (and factors) share no layer of equal shape."""


def pair_layers(
    owner: str,
    pt_modules: Mapping[str, nn.Module],
    ft_modules: Mapping[str, nn.Module],
    pretrained_model: nn.Module,
    pt_factors: Optional[EKFACFactors],
    ft_factors: Optional[EKFACFactors],
    patterns: Optional[list[str]],
    layer_map: LayerMap,
) -> tuple[dict[str, str], dict[str, str]]:
    """``({pt name: ft name} of the layers used, {pt name: reason} of those excluded)``.

    The candidates are the pre-training factors' layers (the pre-trained model's supported
    layers without factors) selected by ``patterns``; ``pt_modules`` / ``ft_modules`` are the
    unwrapped models' named modules (:func:`~lightning_influence.layers.named_modules`).

    Raises:
        NoSharedLayersError: no pair takes part (the message lists every exclusion).
        PatternError: a pattern matches no candidate.
    """
    pairs: dict[str, str] = {}
    excluded: dict[str, str] = {}
    for name in _candidate_names(owner, pretrained_model, pt_factors, patterns):
        ft_name = name if layer_map is None else (layer_map.get(name, name) if isinstance(layer_map, Mapping) else layer_map(name))
        reason = _exclusion(name, ft_name, pt_modules, ft_modules, pt_factors, ft_factors)
        if reason is None:
            pairs[name] = ft_name
        else:
            excluded[name] = reason
    if not pairs:
        detail = "\n  ".join(f"{n}: {r}" for n, r in excluded.items()) or "(no layer considered)"
        raise NoSharedLayersError(
            f"{owner}: the pre-trained and fine-tuned models share no layer with equal shapes "
            "in both models and both factor sets; pass layer_map= if module names differ, or check that "
            "both factor sets track the same layers. Considered:\n  " + detail
        )
    return pairs, excluded


def finetuned_damping(layer_pairs: Mapping[str, str], damping: StageDamping) -> StageDamping:
    """A fine-tuning damping with the pre-trained names of a mapping translated to fine-tuned names."""
    if isinstance(damping, Mapping):
        return {layer_pairs.get(k, k): v for k, v in damping.items()}
    return damping


def _candidate_names(owner: str, model: nn.Module, pt_factors: Optional[EKFACFactors], patterns: Optional[list[str]]) -> list[str]:
    """Pre-trained layer names to consider: the factors' layers (or the model's supported
    layers without factors) selected by ``patterns`` with the one glob rule."""
    if pt_factors is None:
        return [t.name for t in select_layers(model, patterns, owner=owner)]
    return select_names(pt_factors.layer_names, patterns, what="layer of the pre-training factors", owner=owner)


def _exclusion(
    name: str,
    ft_name: str,
    pt_modules: Mapping[str, nn.Module],
    ft_modules: Mapping[str, nn.Module],
    pt_factors: Optional[EKFACFactors],
    ft_factors: Optional[EKFACFactors],
) -> Optional[str]:
    """Why the layer pair cannot take part, or ``None`` when it can."""
    geo = {}
    for stage, modules, n in (("pre-trained", pt_modules, name), ("fine-tuned", ft_modules, ft_name)):
        m = modules.get(n)
        if m is None:
            return f"not in the {stage} model (as {n!r})"
        try:
            t = TrackedLayer.from_module(n, m)
        except LayerSelectionError:
            return f"unsupported type {type(m).__name__} in the {stage} model"
        geo[stage] = (t.d_out, t.d_in, t.has_bias)
    if geo["pre-trained"] != geo["fine-tuned"]:
        (o1, i1, b1), (o2, i2, b2) = geo["pre-trained"], geo["fine-tuned"]
        return f"shape mismatch: pre-trained (d_out={o1}, d_in={i1}, bias={b1}) vs fine-tuned (d_out={o2}, d_in={i2}, bias={b2})"
    for stage, factors, n in (("pre-training", pt_factors, name), ("fine-tuning", ft_factors, ft_name)):
        if factors is None:
            continue
        f = factors.layers.get(n)
        if f is None:
            return f"not in the {stage} factors (as {n!r})"
        if (f.d_out, f.d_in, f.has_bias) != geo["pre-trained"]:
            return f"{stage} factors are for (d_out={f.d_out}, d_in={f.d_in}, bias={f.has_bias}), the models have {geo['pre-trained']}"
    return None
