"""Approximate top-k over an index with FAISS (optional: ``pip install faiss-cpu``).

Exact streaming search (:meth:`InfluenceIndex.search`) reads every shard for every query set:
its cost grows linearly with the training set. For very large indexes FAISS answers
maximum-inner-product queries sub-linearly with an inverted file: the vectors are clustered
once (``nlist`` clusters by k-means on a sample), and a query scores only the training
examples of its ``nprobe`` most similar clusters. Results are approximate (compare them with
the exact search on a sample of queries: docs/benchmarks_index.md reports the recall), and the
FAISS index holds every vector in memory (float32 for ``"ivf"`` and ``"flat"``, one byte per
number for ``"ivf_sq8"``), unlike the streaming search whose memory does not grow with N.

Opponents (lowest scores) are the top-k of the negated queries.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch
from torch import Tensor

from .. import validation as check
from ..ranking import TopInfluences
from ..storage import read_artifact, read_manifest, write_artifact
from .shards import InfluenceIndexError

if TYPE_CHECKING:  # pragma: no cover
    from .search import InfluenceIndex

__all__ = ["FaissSearch", "FAISS_METHODS", "FAISS_KIND"]

FAISS_METHODS = ("ivf", "ivf_sq8", "flat")
FAISS_KIND = "index_faiss"
OWNER = "FaissSearch"


def _faiss():
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("approximate search needs FAISS: pip install faiss-cpu (the 'faiss' extra)") from e
    return faiss


def _concat(vectors: dict[str, Tensor], names: list[str]) -> np.ndarray:
    return np.ascontiguousarray(torch.cat([vectors[n].float() for n in names], dim=1).cpu().numpy())


class FaissSearch:
    """A FAISS inner-product index over every vector of an :class:`~lightning_influence.index.InfluenceIndex`.

    Build with :meth:`build` (saved as ``<index>/faiss``), reopen with :meth:`load`.

    Args:
        faiss_index: the FAISS index (ids are training example ids).
        layer_names: the index's layers, in the order their vectors are concatenated.
        method: ``"ivf"``, ``"ivf_sq8"`` or ``"flat"``.
        nprobe: clusters scanned per query (inverted-file methods).
    """

    def __init__(self, faiss_index: Any, layer_names: list[str], method: str, nprobe: int = 1) -> None:
        self.faiss_index = faiss_index
        self.layer_names = list(layer_names)
        self.method = method
        self.nprobe = int(nprobe)

    @classmethod
    def build(cls, index: "InfluenceIndex", method: str = "ivf", nlist: Optional[int] = None, nprobe: Optional[int] = None,
              train_rows: Optional[int] = None, save: bool = True, seed: int = 0) -> "FaissSearch":
        """Cluster and add every vector of ``index`` (two passes over its shards).

        Args:
            index: the :class:`~lightning_influence.index.InfluenceIndex`.
            method: ``"ivf"`` (inverted file, float32 vectors), ``"ivf_sq8"`` (inverted file,
                8-bit scalar-quantised vectors) or ``"flat"`` (exhaustive; a reference).
            nlist: clusters (default ``√N``).
            nprobe: clusters scanned per query (default ``max(1, nlist // 8)``).
            train_rows: vectors sampled (evenly over the index) for k-means (default ``50 · nlist``).
            save: write it to ``<index>/faiss`` so that :meth:`load` finds it.
            seed: k-means seed.
        """
        faiss = _faiss()
        check.choice(OWNER, "method", method, FAISS_METHODS)
        n, names = index.n_examples, index.layer_names
        d = sum(index.dims.values())
        nlist = check.positive_int(OWNER, "nlist", nlist, allow_none=True) or max(1, int(math.sqrt(n)))
        nlist = min(nlist, n)
        nprobe = check.positive_int(OWNER, "nprobe", nprobe, allow_none=True) or max(1, nlist // 8)
        if method == "flat":
            fi = faiss.IndexIDMap(faiss.IndexFlatIP(d))
        else:
            quantizer = faiss.IndexFlatIP(d)
            if method == "ivf":
                fi = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
            else:
                fi = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
            fi.cp.seed = seed
            want = min(n, train_rows or 50 * nlist)
            step = max(1, n // want)
            sample = []
            for block in index.blocks():
                pos = torch.arange(block.start, block.start + block.ids.shape[0])
                rows = (pos % step == 0).nonzero().flatten()
                if rows.numel():
                    sample.append(_concat({k: v[rows] for k, v in block.vectors.items()}, names))
            fi.train(np.concatenate(sample)[:want])
        for block in index.blocks():
            fi.add_with_ids(_concat(block.vectors, names), block.ids.numpy().astype(np.int64))
        out = cls(fi, names, method, nprobe)
        if save:
            out.save(index)
        return out

    def save(self, index: "InfluenceIndex") -> None:
        """Write to ``<index>/faiss`` (kind ``"index_faiss"``, checksummed like every artifact)."""
        faiss = _faiss()
        blob = torch.from_numpy(np.asarray(faiss.serialize_index(self.faiss_index)).copy())
        write_artifact(index.path / "faiss", FAISS_KIND, {"faiss": blob},
                       {"method": self.method, "nprobe": self.nprobe, "layers": self.layer_names,
                        "fingerprint": index.catalog.get("fingerprint")})

    @classmethod
    def load(cls, index: "InfluenceIndex") -> "FaissSearch":
        """Read ``<index>/faiss`` written by :meth:`build`.

        Raises:
            InfluenceIndexError: none there, or it belongs to another build of the index.
        """
        faiss = _faiss()
        if read_manifest(index.path / "faiss") is None:
            raise InfluenceIndexError(f"{index.path} has no FAISS index; build one with FaissSearch.build(index)")
        t, m = read_artifact(index.path / "faiss", kind=FAISS_KIND)
        if m.get("fingerprint") != index.catalog.get("fingerprint"):
            raise InfluenceIndexError(f"{index.path / 'faiss'} was built for another version of this index; build it again")
        fi = faiss.deserialize_index(t["faiss"].numpy())
        return cls(fi, m["layers"], m["method"], int(m["nprobe"]))

    def search_vectors(self, query_ids: Tensor, vectors: dict[str, Tensor], k: int = 10, opponents: bool = False,
                       nprobe: Optional[int] = None) -> TopInfluences:
        """Approximate top-``k`` for query vectors (:meth:`InfluenceIndex.query_vectors`).

        Returns:
            :class:`~lightning_influence.ranking.TopInfluences` (float32 scores; fewer than
            ``k`` valid entries are padded with id ``-1`` and score ``nan``).
        """
        check.positive_int(OWNER, "k", k)
        if hasattr(self.faiss_index, "nprobe"):
            self.faiss_index.nprobe = int(nprobe or self.nprobe)
        q = _concat(vectors, self.layer_names)

        def run(x: np.ndarray) -> tuple[Tensor, Tensor]:
            scores, ids = self.faiss_index.search(x, k)
            s, i = torch.from_numpy(scores), torch.from_numpy(ids)
            return s.masked_fill(i < 0, float("nan")), i

        s, i = run(q)
        if not opponents:
            return TopInfluences(query_ids.cpu(), i, s)
        so, io = run(-q)
        return TopInfluences(query_ids.cpu(), i, s, io, -so)
