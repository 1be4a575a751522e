"""The Z0 recording artifact: Gram matrix + loss tables on disk, and :func:`load_z0` to read them back.

Layout of a recording (artifact kind ``"z0"``; :class:`~lightning_influence.Z0Influence` writes it
to ``<log dir>/influence/<name>/recording``, atomically, through
:func:`lightning_influence.storage.write_artifact`):

* ``tensors.safetensors``: ``gram`` (float64 ``[E, E]``), ``probe_ids`` (int64 ``[n_probe]``),
  ``probe_losses`` (float32 ``[E, n_probe]``), ``query_ids`` / ``query_losses`` (when queries
  were given), ``steps`` and ``epochs`` (int64 ``[E]``: global step and epoch of each row);
* ``manifest.json``: counts, options, parameter names and shapes, snapshot directory
  (:attr:`Z0Result.manifest`);
* ``self_influence.csv``: per probe example, loss variance, mean loss and final loss;
* ``checkpoints.csv``: row, epoch, step, ‖θ‖.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import torch
from torch import Tensor

from ..storage import ArtifactError, check_tensor, csv_text, manifest_field, read_artifact, write_artifact
from .estimators import (
    DirectionalFit,
    GradientFit,
    self_influence_directional,
    self_influence_mean_loss,
    self_influence_variance,
    train_test_influence,
)
from .gram import load_snapshot
from .neighbours import NeighbourMode, select_neighbours

__all__ = ["Z0Result", "load_z0", "write_z0", "Z0_KIND", "SELF_METHODS"]

Z0_KIND = "z0"
SELF_METHODS = ("variance", "mean_loss", "finite_difference", "least_squares")


@dataclass
class Z0Result:
    """What a Z0 recording holds, with the estimators as methods.

    Attributes:
        gram: ``float64 Tensor[E, E]`` Gram matrix of the parameter snapshots.
        probe_ids: ``int64 Tensor[n_probe]`` (sorted); probe_losses: ``float32 Tensor[E, n_probe]``
            (per-example losses, summed over tokens; row ``i`` at snapshot ``i``).
        query_ids / query_losses: the same for the query set (their ``measurement``), or ``None``.
        steps, epochs: ``int64 Tensor[E]``: global step and completed epochs of each row.
        manifest: the recording's options, parameter names and shapes, snapshot directory.
        directory: where it was loaded from or written to (``None`` when only in memory).
    """

    gram: Tensor
    probe_ids: Tensor
    probe_losses: Tensor
    steps: Tensor
    epochs: Tensor
    query_ids: Optional[Tensor] = None
    query_losses: Optional[Tensor] = None
    manifest: dict[str, Any] = field(default_factory=dict)
    directory: Optional[Path] = None

    @property
    def num_checkpoints(self) -> int:
        return int(self.gram.shape[0])

    def neighbours(self, mode: NeighbourMode = "knn", k: int = 4, tau: Optional[float] = None,
                   band: Sequence[float] = (0.0, 0.5)) -> list[Tensor]:
        """Neighbour checkpoints of each checkpoint (see :func:`select_neighbours`)."""
        return select_neighbours(self.gram, mode=mode, k=k, tau=tau, band=band)

    def self_influence(
        self,
        method: Literal["variance", "mean_loss", "finite_difference", "least_squares"] = "variance",
        neighbours: NeighbourMode = "knn",
        k: int = 4,
        tau: Optional[float] = None,
        band: Sequence[float] = (0.0, 0.5),
        centre: bool = False,
        rcond: float = 1e-10,
        damping: float = 0.0,
    ) -> Tensor:
        """Self-influence of every probe example, ``float64 Tensor[n_probe]`` (>= 0; higher =
        more atypical / memorised / likely mislabeled), in the order of :attr:`probe_ids`.

        ``"variance"``: loss variance over checkpoints; ``"mean_loss"``: mean loss;
        ``"finite_difference"`` / ``"least_squares"``: ``Σ_i ‖g_i‖²`` with the given neighbours
        (:meth:`neighbours`) and ``DirectionalFit(method, rcond, damping)``.
        """
        if method == "variance":
            return self_influence_variance(self.probe_losses)
        if method == "mean_loss":
            return self_influence_mean_loss(self.probe_losses)
        if method in ("finite_difference", "least_squares"):
            nb = self.neighbours(neighbours, k, tau, band)
            fit = DirectionalFit(method, rcond, damping)
            return self_influence_directional(self.gram, self.probe_losses, nb, fit=fit, centre=centre)
        raise ValueError(f"self_influence(method=...) must be one of {SELF_METHODS}, got {method!r}")

    def pairwise(
        self,
        fit: GradientFit = "least_squares",
        neighbours: NeighbourMode = "knn",
        k: int = 4,
        tau: Optional[float] = None,
        band: Sequence[float] = (0.0, 0.5),
        centre: bool = False,
        spearman_weight: bool = False,
        rcond: float = 1e-10,
        damping: float = 0.0,
        chunk_size: int = 16384,
    ) -> Tensor:
        """Train-test influence ``Tensor[n_query, n_train]`` (float32; rows follow
        :attr:`query_ids`, columns :attr:`probe_ids`; positive = the training example helps
        the query) with ``DirectionalFit(fit, rcond, damping)``. See
        :func:`~lightning_influence.z0.estimators.train_test_influence`."""
        if self.query_losses is None:
            raise ValueError("this Z0 recording has no query losses: pass queries= to Z0Influence")
        nb = self.neighbours(neighbours, k, tau, band)
        return train_test_influence(self.gram, self.probe_losses, self.query_losses, nb,
                                    fit=DirectionalFit(fit, rcond, damping), centre=centre,
                                    spearman_weight=spearman_weight, chunk_size=chunk_size)

    def snapshot(self, row: int) -> dict[str, Tensor]:
        """Parameter snapshot ``row`` (name → tensor), when snapshots were kept on disk."""
        d = self.manifest.get("snapshot_dir")
        if not d or not self.manifest.get("keep_snapshots"):
            raise ArtifactError("snapshots were not kept for this recording (Z0Influence(keep_snapshots=True))")
        return load_snapshot(d, row, self.manifest.get("param_names"))


def write_z0(directory: str | os.PathLike, result: Z0Result) -> Path:
    """Write ``result`` (its tensors, and :attr:`Z0Result.manifest` in the manifest) as a ``z0``
    artifact with its CSV tables (see the module docstring); returns the directory."""
    tensors = {
        "gram": result.gram.to(torch.float64),
        "probe_ids": result.probe_ids.to(torch.int64),
        "probe_losses": result.probe_losses.to(torch.float32),
        "steps": result.steps.to(torch.int64),
        "epochs": result.epochs.to(torch.int64),
    }
    if result.query_losses is not None:
        tensors["query_ids"] = result.query_ids.to(torch.int64)
        tensors["query_losses"] = result.query_losses.to(torch.float32)
    e = result.num_checkpoints
    extra = {
        "checkpoints.csv": csv_text(
            ["row", "epoch", "step", "param_norm"],
            [[r, ep, st, nrm] for r, (ep, st, nrm) in enumerate(zip(
                result.epochs.tolist(), result.steps.tolist(), torch.diagonal(result.gram).sqrt().tolist()))],
        )
    }
    if e > 0 and result.probe_losses.numel() > 0:
        var = self_influence_variance(result.probe_losses)
        mean = self_influence_mean_loss(result.probe_losses)
        last = result.probe_losses[-1]
        rows = list(zip(result.probe_ids.tolist(), var.tolist(), mean.tolist(), last.tolist()))
        extra["self_influence.csv"] = csv_text(["id", "loss_variance", "mean_loss", "final_loss"], rows)
    full = {
        "num_checkpoints": e,
        "num_probe": int(result.probe_ids.numel()),
        "num_query": int(result.query_ids.numel()) if result.query_ids is not None else 0,
        **result.manifest,
    }
    return write_artifact(directory, Z0_KIND, tensors, full, extra_files=extra)


def load_z0(directory: str | os.PathLike) -> Z0Result:
    """Read a Z0 recording written by :class:`~lightning_influence.Z0Influence` (its
    ``<folder>/recording``) or :func:`write_z0`.

    Raises:
        ArtifactError: missing, corrupt or edited, not a ``z0`` artifact, or tensors missing or
            of inconsistent shapes or dtypes (ids and loss tables of different lengths included;
            the message names the file and the problem).
    """
    tensors, manifest = read_artifact(directory, Z0_KIND)
    ints = (torch.int64,)
    gram = check_tensor(directory, tensors, "gram", (None, None), (torch.float64,))
    e = gram.shape[0]
    if gram.shape[1] != e:
        raise ArtifactError(f"{directory}: gram has shape {list(gram.shape)}, expected a square matrix")
    probe_ids = check_tensor(directory, tensors, "probe_ids", (None,), ints)
    floats = (torch.float32, torch.float64)
    res = Z0Result(
        gram=gram,
        probe_ids=probe_ids,
        probe_losses=check_tensor(directory, tensors, "probe_losses", (e, probe_ids.numel()), floats),
        steps=check_tensor(directory, tensors, "steps", (e,), ints),
        epochs=check_tensor(directory, tensors, "epochs", (e,), ints),
        manifest=manifest,
        directory=Path(directory),
    )
    if "query_ids" in tensors or "query_losses" in tensors:
        res.query_ids = check_tensor(directory, tensors, "query_ids", (None,), ints)
        res.query_losses = check_tensor(directory, tensors, "query_losses", (e, res.query_ids.numel()), floats)
    names = manifest_field(directory, manifest, "param_names", list, [])
    shapes = manifest_field(directory, manifest, "param_shapes", list, [])
    if len(names) != len(shapes) or not all(isinstance(n, str) for n in names):
        raise ArtifactError(f"{directory}: manifest param_names and param_shapes do not describe the same parameters")
    return res
