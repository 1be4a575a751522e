"""A training-gradient index: the training set's preconditioned, compressed gradients written once
to disk in shards, then queried as often as wanted without touching the training data again.

* :func:`build_index` (:mod:`.builder`) — one pass over the training set; sharded, atomic,
  checksummed, resumable, one rank or many.
* :class:`InfluenceIndex` (:mod:`.search`) — ``search`` (streaming top-k), ``scores`` (dense),
  ``self_influence``, per-layer terms, ``token_scores`` (per-token influence).
* :mod:`.reference` — an index references the saved factor artifact it was built from (path
  and checksums) instead of copying the factors.
* :mod:`.transform` and :mod:`.projection` — how a gradient becomes an index vector (rotation
  into the EK-FAC eigenbasis, whitening, random projection).
* :mod:`.approximate` — optional FAISS search for very large indexes (``faiss-cpu``).

See docs/search.md.
"""

from .builder import DEFAULT_COMPRESSION, DEFAULT_DIM, DEFAULT_STORAGE_DTYPE, IndexOptions, build_index, build_index_from_preconditioner
from .reference import FactorReference, FactorReferenceError
from .projection import COMPRESSIONS, Flatten, Kronecker, LayerProjection, SparseSign, make_projection
from .search import IndexBlock, InfluenceIndex, load_index, top_as_scores
from .shards import CorruptShardError, InfluenceIndexError
from .tokens import TokenScores, token_scores
from .transform import IndexTransform, LayerTransform

__all__ = [
    "build_index",
    "build_index_from_preconditioner",
    "IndexOptions",
    "InfluenceIndex",
    "IndexBlock",
    "load_index",
    "top_as_scores",
    "InfluenceIndexError",
    "CorruptShardError",
    "FactorReference",
    "FactorReferenceError",
    "TokenScores",
    "token_scores",
    "IndexTransform",
    "LayerTransform",
    "LayerProjection",
    "Flatten",
    "SparseSign",
    "Kronecker",
    "make_projection",
    "COMPRESSIONS",
    "DEFAULT_COMPRESSION",
    "DEFAULT_DIM",
    "DEFAULT_STORAGE_DTYPE",
]
