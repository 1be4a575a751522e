"""The damped inverse EK-FAC curvature, layer by layer: the one preconditioner of the scorers.

For a layer with factors ``(Q_A, Q_S, Λ)`` and damping ``λ``, a gradient ``G: [..., d_out, a_dim]``
becomes ``Q_S [ (Q_Sᵀ G Q_A) / (Λ + λ) ] Q_Aᵀ``. The three steps are exposed separately
(:meth:`Preconditioner.rotate`, :meth:`~Preconditioner.scale`, :meth:`~Preconditioner.unrotate`)
because an inner product of two gradients needs only one of them rotated back (or neither, when
both sides are expressed in the same eigenbasis: rotations are orthogonal).

Without factors, or with ``damping="identity"``, the scaling is the identity (the "gradient dot
product" baseline); rotation then uses the factors' basis when there are factors, else none.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor

from .factors import Damping, EKFACFactors, LayerFactors, damping_rule_name

__all__ = ["Preconditioner", "StageDamping"]

StageDamping = Optional[float | Mapping[str, float] | str]
"""A damping (:data:`~lightning_influence.ekfac.factors.Damping`: float, mapping, rule name or
``None``) or ``"identity"``."""


class Preconditioner:
    """``(G + λI)⁻¹`` per layer from EK-FAC factors (or the identity).

    Args:
        factors: the factors, or ``None`` for the identity.
        layers: layer names to keep (default: all of ``factors``); required without factors.
        damping: a float for every layer, a mapping layer → float, a rule name of
            :data:`~lightning_influence.ekfac.damping.DAMPING_RULES`, ``None`` for the default
            rule (:mod:`lightning_influence.ekfac.damping`), or ``"identity"`` (no scaling).
        dtype: dtype of the reciprocals and of rotated gradients.
        device: where the factors go.

    Attributes:
        damping: layer → λ used (empty for the identity).
        damping_rule: the rule that chose ``damping`` (``"quantile"``, ``"mean"``), ``"identity"``,
            or ``None`` when the values were given.
        identity: whether scaling is the identity.
    """

    def __init__(
        self,
        factors: Optional[EKFACFactors],
        layers: Optional[Sequence[str]] = None,
        damping: StageDamping = None,
        dtype: torch.dtype = torch.float32,
        device: Optional[torch.device | str] = None,
    ) -> None:
        if factors is None and layers is None:
            raise ValueError("Preconditioner needs factors or the layer names")
        names = list(layers) if layers is not None else list(factors.layers)
        self.names = names
        self.dtype = dtype
        self.factors: dict[str, LayerFactors] = {}
        if factors is not None:
            self.factors = {n: factors.layers[n].to(device) if device is not None else factors.layers[n] for n in names}
        self.identity = factors is None or damping == "identity"
        self.damping: dict[str, float] = {}
        self.damping_rule: Optional[str] = "identity" if self.identity else damping_rule_name(damping)
        self._inv: dict[str, Tensor] = {}
        self._cast: dict[tuple[str, str, torch.dtype, torch.device], Tensor] = {}
        if not self.identity:
            self.damping = EKFACFactors(dict(self.factors)).dampings(damping)  # type: ignore[arg-type]

    @property
    def has_factors(self) -> bool:
        return bool(self.factors)

    def with_damping(self, damping: StageDamping) -> "Preconditioner":
        """The same factors with another damping (a new object; this one is unchanged)."""
        factors = EKFACFactors(dict(self.factors)) if self.factors else None
        return Preconditioner(factors, self.names, damping, self.dtype)

    def eigenbasis(self, name: str, dtype: Optional[torch.dtype] = None, device: Optional[torch.device | str] = None) -> tuple[Tensor, Tensor]:
        """``(Q_S, Q_A)`` of layer ``name`` in ``dtype`` (default :attr:`dtype`) on ``device``
        (default: the factors'), cast once and kept: rotating a batch never converts the
        eigenbases again."""
        f = self.factors[name]
        dtype = dtype or self.dtype
        device = torch.device(device) if device is not None else f.q_s.device
        out = []
        for key in ("q_s", "q_a"):
            k = (name, key, dtype, device)
            if k not in self._cast:
                t = getattr(f, key)
                self._cast[k] = t if (t.dtype == dtype and t.device == device) else t.to(device=device, dtype=dtype)
            out.append(self._cast[k])
        return out[0], out[1]

    def rotate(self, name: str, g: Tensor) -> Tensor:
        """``Q_Sᵀ G Q_A`` in :attr:`dtype` (``G`` unchanged but cast without factors)."""
        g = g.to(self.dtype)
        if not self.factors:
            return g
        q_s, q_a = self.eigenbasis(name, g.dtype, g.device)
        return q_s.T @ g @ q_a

    def scale(self, name: str, r: Tensor) -> Tensor:
        """``R / (Λ + λ)`` in the eigenbasis (identity: ``R``)."""
        return r if self.identity else r * self.inverse_scale(name).to(device=r.device)

    def unrotate(self, name: str, r: Tensor) -> Tensor:
        """``Q_S R Q_Aᵀ`` (inverse of :meth:`rotate`)."""
        if not self.factors:
            return r
        q_s, q_a = self.eigenbasis(name, r.dtype, r.device)
        return q_s @ r @ q_a.T

    def precondition(self, name: str, g: Tensor) -> Tensor:
        """``(G + λI)⁻¹ G`` in the standard basis, ``[..., d_out, a_dim]``."""
        return self.unrotate(name, self.scale(name, self.rotate(name, g)))

    def inverse_scale(self, name: str) -> Tensor:
        """``1 / (Λ + λ)``, ``[d_out, a_dim]`` in :attr:`dtype`."""
        if self.identity:
            raise ValueError("the identity preconditioner has no eigenvalue scaling")
        if name not in self._inv:  # formed in float64 when first needed, kept in :attr:`dtype`
            self._inv[name] = self.factors[name].inverse_scale(self.damping[name]).to(self.dtype)
        return self._inv[name]
