"""An index's reference to the EK-FAC factor artifact it was built from (instead of a copy).

An index needs, to turn a query gradient into a query vector, the eigenbases ``Q_S``, ``Q_A``
and the whitening ``(Λ + λ)^{-1/2}`` of every indexed layer: on GPT-2 small 3.3 GB in float64,
as much as the factors themselves. Copying them into every index made each index carry
gigabytes of fixed data. Instead an index built from a saved factor artifact records a
:class:`FactorReference`: the artifact's folder (absolute, and relative to the index so that
the two can be moved together), the SHA-256 of its tensor file (``tensor_sha256``: the
factors' numbers) and of its manifest (``manifest_sha256``, for the record: saving the same
factors again changes only the manifest's time). Opening the index reads the factors from
there, verifies the tensor checksum (and the artifact's own checksums) and rebuilds the
transform (the random projections are drawn
again from the index's seeds and checked against checksums recorded at build time), so a
referenced index's fixed size is its manifests: kilobytes.

When the referenced artifact is gone, replaced or edited, opening the index raises
:class:`FactorReferenceError` naming the path and the expected and found checksums; it never
scores with other factors.

Factors that exist only in memory (``fit_factors``, or an artifact whose contents differ from
the factors passed) cannot be referenced: the index then stores the factor-derived tensors
itself, as before (see :func:`~lightning_influence.index.build_index`).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from ..storage import TENSOR_FILE, ArtifactError, read_manifest
from .shards import InfluenceIndexError

__all__ = ["FactorReference", "FactorReferenceError", "factors_match_artifact", "FACTOR_KIND"]

FACTOR_KIND = "ekfac"
_SAMPLE_ROWS = 4


class FactorReferenceError(InfluenceIndexError):
    """The factor artifact an index references is missing, replaced or edited."""


def _file_sha256(path: Path) -> Optional[str]:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError:
        return None
    return h.hexdigest()


@dataclass(frozen=True)
class FactorReference:
    """Where an index's factors live and the checksums they had when the index was built.

    Attributes:
        path: the factor artifact's folder, absolute.
        relative: the same folder relative to the index folder (``None`` when there is no
            relative path, e.g. another drive); tried first, so an index moved together with
            its factors still opens.
        manifest_sha256: the artifact manifest's ``manifest_sha256`` (recorded, not required).
        tensor_sha256: the artifact manifest's ``tensor_sha256`` (the tensor file's SHA-256):
            opening requires it.
    """

    path: str
    relative: Optional[str]
    manifest_sha256: str
    tensor_sha256: str

    @classmethod
    def of(cls, factors_dir: str | os.PathLike, index_dir: Optional[str | os.PathLike] = None) -> "FactorReference":
        """A reference to the factor artifact at ``factors_dir`` as it is now (its manifest is
        read, not its tensors).

        Raises:
            FactorReferenceError: no EK-FAC factor artifact at ``factors_dir``.
        """
        path = Path(factors_dir).resolve()
        m = read_manifest(path)
        if m is None or m.get("kind") != FACTOR_KIND or not isinstance(m.get("manifest_sha256"), str):
            raise FactorReferenceError(f"{path} holds no EK-FAC factor artifact (a folder written by save_factors or EKFACInfluence)")
        relative = None
        if index_dir is not None:
            try:
                relative = os.path.relpath(path, Path(index_dir).resolve())
            except ValueError:  # pragma: no cover - another drive (Windows)
                relative = None
        return cls(str(path), relative, m["manifest_sha256"], str(m.get("tensor_sha256")))

    def as_manifest(self) -> dict[str, Any]:
        return {"kind": FACTOR_KIND, "path": self.path, "relative": self.relative,
                "manifest_sha256": self.manifest_sha256, "tensor_sha256": self.tensor_sha256}

    @classmethod
    def from_manifest(cls, d: Any, where: str) -> "FactorReference":
        if not isinstance(d, dict) or not all(isinstance(d.get(k), str) for k in ("path", "manifest_sha256", "tensor_sha256")):
            raise InfluenceIndexError(f"{where}: the factor reference {d!r} lacks path, manifest_sha256 or tensor_sha256")
        rel = d.get("relative")
        return cls(d["path"], rel if isinstance(rel, str) else None, d["manifest_sha256"], d["tensor_sha256"])

    def locate(self, index_dir: Optional[str | os.PathLike] = None) -> Path:
        """The folder to read: the relative path from ``index_dir`` when it holds an artifact
        whose tensor checksum is the recorded one, else the absolute path."""
        if index_dir is not None and self.relative is not None:
            cand = (Path(index_dir) / self.relative)
            m = read_manifest(cand)
            if m is not None and m.get("tensor_sha256") == self.tensor_sha256:
                return cand
        return Path(self.path)

    def load(self, index_dir: Optional[str | os.PathLike] = None, who: str = "the index") -> tuple[Path, Any]:
        """Read and verify the referenced factors: ``(folder, EKFACFactors)``.

        Raises:
            FactorReferenceError: the folder is gone, holds no artifact, its manifest or tensor
                checksum is not the recorded one, or its files fail their own checksums; the
                message names the path and the expected and found checksums.
        """
        from ..ekfac.factors import load_factors

        folder = self.locate(index_dir)
        expect = f"expected manifest_sha256 {self.manifest_sha256[:16]}…, tensor_sha256 {self.tensor_sha256[:16]}…"
        fix = ("Restore the factors it was built from, or rebuild the index from the factors you have now "
               "(build_index(..., if_exists='overwrite'))")
        if not folder.exists():
            raise FactorReferenceError(f"{who} references EK-FAC factors at {folder}, which are gone ({expect}; found no folder). {fix}")
        m = read_manifest(folder)
        if m is None:
            raise FactorReferenceError(f"{who} references EK-FAC factors at {folder}, which holds no artifact manifest ({expect}). {fix}")
        found_m, found_t = m.get("manifest_sha256"), m.get("tensor_sha256")
        if found_t != self.tensor_sha256:  # the numbers decide; a manifest written again (its time) for the same tensors is fine
            raise FactorReferenceError(
                f"{who} references EK-FAC factors at {folder} that have changed since it was built: {expect}; "
                f"found manifest_sha256 {str(found_m)[:16]}…, tensor_sha256 {str(found_t)[:16]}…. {fix}")
        try:
            factors = load_factors(folder)
        except ArtifactError as e:
            actual = _file_sha256(folder / str(m.get("tensor_file", TENSOR_FILE)))
            raise FactorReferenceError(
                f"{who} references EK-FAC factors at {folder} whose files have changed since it was built: {expect}; "
                f"found a tensor file with sha256 {str(actual)[:16]}… ({e}). {fix}") from e
        return folder, factors


def factors_match_artifact(factors: Any, names: list[str], factors_dir: str | os.PathLike, rtol: float = 1e-5) -> bool:
    """Whether the in-memory ``factors`` (:class:`~lightning_influence.ekfac.factors.EKFACFactors`)
    of layers ``names`` are those stored at ``factors_dir``, by a few rows of each layer's
    ``q_s``, ``q_a`` and ``lambdas`` read from the file (not the whole file) and compared within
    ``rtol`` (float32 storage of float64 factors agrees to about 1e-7). ``False`` on any doubt.
    """
    try:
        from safetensors import safe_open

        m = read_manifest(factors_dir)
        if m is None or m.get("kind") != FACTOR_KIND:
            return False
        with safe_open(str(Path(factors_dir) / str(m.get("tensor_file", TENSOR_FILE))), framework="pt") as f:
            keys = set(f.keys())
            for n in names:
                lf = factors.layers[n]
                for key in ("q_s", "q_a", "lambdas"):
                    k = f"{n}::{key}"
                    if k not in keys:
                        return False
                    mine = getattr(lf, key)
                    sl = f.get_slice(k)
                    if list(sl.get_shape()) != list(mine.shape):
                        return False
                    rows = sorted({0, mine.shape[0] // 2, mine.shape[0] - 1})[:_SAMPLE_ROWS]
                    for r in rows:
                        disk = sl[r : r + 1].double()
                        here = mine[r : r + 1].detach().double().cpu()
                        if not torch.allclose(disk, here, rtol=rtol, atol=rtol * float(here.abs().max().clamp_min(1e-30))):
                            return False
        return True
    except Exception:
        return False
