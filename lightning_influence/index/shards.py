"""The index on disk: a folder of artifacts written with :mod:`lightning_influence.storage`.

Layout of an index folder ``<root>`` (every entry an atomic, checksummed artifact)::

    <root>/transform                  kind "index_transform": rotations, whitening, projections
    <root>/shards/r00000-s000000      kind "index_shard": one block of training examples
    <root>/shards/r00000-s000001      ...
    <root>/ranks/r00000               kind "index_rank": rank 0 finished (its shard count and size)
    <root>/catalog                    kind "influence_index": written last; lists every shard
                                      with its SHA-256, so the index is complete iff it exists

A shard holds, for ``n`` training examples, ``ids: LongTensor[n]``, ``self_influence:
Tensor[n]`` (float32, exact), ``vectors::<layer>: Tensor[n, dim_layer]`` in the storage dtype,
and with a per-layer breakdown ``self::<layer>: Tensor[n]``. Its manifest records the rank, its
sequence number, the position of its first example in that rank's stream and the build's
fingerprint, which is what lets an interrupted build resume from its last complete shard.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from ..storage import ArtifactError, read_artifact, read_manifest, write_artifact

__all__ = [
    "CATALOG_KIND",
    "SHARD_KIND",
    "RANK_KIND",
    "InfluenceIndexError",
    "CorruptShardError",
    "ShardInfo",
    "ShardBuffer",
    "shard_path",
    "rank_path",
    "rank_shards",
    "all_shards",
    "read_shard",
    "remove_index_files",
    "clean_temporaries",
    "shard_bytes",
    "default_shard_size",
]

CATALOG_KIND = "influence_index"
SHARD_KIND = "index_shard"
RANK_KIND = "index_rank"
INDEX_KINDS = (CATALOG_KIND, SHARD_KIND, RANK_KIND, "index_transform", "index_faiss")
_SHARD_RE = re.compile(r"^r(\d{5})-s(\d{6})$")


class InfluenceIndexError(ArtifactError):
    """An index folder is incomplete, inconsistent or was built with other options."""


class CorruptShardError(InfluenceIndexError):
    """A shard of an index fails its checksum or does not match the catalog (the message names it)."""


def shard_path(root: Path, rank: int, seq: int) -> Path:
    return Path(root) / "shards" / f"r{rank:05d}-s{seq:06d}"


def rank_path(root: Path, rank: int) -> Path:
    return Path(root) / "ranks" / f"r{rank:05d}"


@dataclass
class ShardInfo:
    """A shard as listed by a manifest: where it is and what it holds (tensors not read)."""

    path: Path
    rank: int
    seq: int
    n: int
    first: int
    sha256: str
    nbytes: int
    fingerprint: str

    def entry(self, root: Path) -> dict[str, Any]:
        """Its catalog entry (path relative to the index root)."""
        return {"path": str(self.path.relative_to(root)), "rank": self.rank, "seq": self.seq, "n": self.n,
                "first": self.first, "sha256": self.sha256, "bytes": self.nbytes}


def _info(path: Path, m: dict[str, Any]) -> ShardInfo:
    return ShardInfo(path, int(m["rank"]), int(m["seq"]), int(m["n_examples"]), int(m["first"]), str(m["tensor_sha256"]),
                     int(m["tensor_bytes"]), str(m.get("fingerprint", "")))


def rank_shards(root: Path, rank: int) -> list[ShardInfo]:
    """Complete shards of ``rank`` (readable ``"index_shard"`` manifests), by sequence number.
    Temporaries of interrupted writes (dot-folders) are not listed."""
    d = Path(root) / "shards"
    out = []
    if d.is_dir():
        for p in d.iterdir():
            m = _SHARD_RE.match(p.name)
            if m and int(m.group(1)) == rank:
                man = read_manifest(p)
                if man is not None and man.get("kind") == SHARD_KIND:
                    out.append(_info(p, man))
    return sorted(out, key=lambda s: s.seq)


def all_shards(root: Path, world_size: int) -> list[ShardInfo]:
    """Complete shards of ranks ``0 .. world_size - 1``, by rank then sequence number."""
    return [s for r in range(world_size) for s in rank_shards(root, r)]


def read_shard(root: Path, entry: dict[str, Any]) -> dict[str, Tensor]:
    """Tensors of the shard listed by catalog ``entry``, checksum verified.

    Raises:
        CorruptShardError: missing, truncated, corrupt, or not the file the catalog lists.
    """
    path = Path(root) / entry["path"]
    try:
        tensors, m = read_artifact(path, kind=SHARD_KIND)
    except ArtifactError as e:
        raise CorruptShardError(
            f"index shard {path} is unreadable ({e}); rebuild the index, or delete this shard and run the "
            "same build again with if_exists='resume' to recompute it"
        ) from e
    if m.get("tensor_sha256") != entry["sha256"] or int(m.get("n_examples", -1)) != int(entry["n"]):
        raise CorruptShardError(
            f"index shard {path} is not the shard its catalog lists (checksum or size differs): it was replaced "
            "after the index was finished; rebuild the index"
        )
    return tensors


def remove_index_files(root: Path) -> None:
    """Delete the artifacts of an index at ``root`` (only folders whose manifest is an index
    kind, and this library's temporaries in the index's own sub-folders)."""
    root = Path(root)
    for sub in ("catalog", "transform", "faiss"):
        p = root / sub
        if (read_manifest(p) or {}).get("kind") in INDEX_KINDS:
            shutil.rmtree(p)
    for folder in ("shards", "ranks"):
        d = root / folder
        if not d.is_dir():
            continue
        for p in d.iterdir():
            kind = (read_manifest(p) or {}).get("kind")
            if kind in INDEX_KINDS or (p.name.startswith(".") and ".tmp-" in p.name):
                shutil.rmtree(p)
        if not any(d.iterdir()):
            d.rmdir()


def clean_temporaries(root: Path, rank: int) -> None:
    """Remove what writes of ``rank``'s shards left when they were killed (``.r<rank>-s*.tmp-*``)."""
    d = Path(root) / "shards"
    if d.is_dir():
        for p in d.iterdir():
            if p.is_dir() and p.name.startswith(f".r{rank:05d}-s") and ".tmp-" in p.name:
                shutil.rmtree(p, ignore_errors=True)


class ShardBuffer:
    """Rows of training examples collected into preallocated buffers and written as shards of
    ``shard_size`` examples (the last one may be shorter).

    Args:
        root: the index folder.
        rank: this process's rank (names its shards).
        dims: layer → vector length.
        shard_size: examples per shard.
        dtype: storage dtype of the vectors.
        per_layer: also store per-layer self-influence.
        manifest: fields added to every shard's manifest (fingerprint, world size, ...).
        seq: sequence number of the next shard.
        position: position (in this rank's stream) of the next example.
    """

    def __init__(self, root: Path, rank: int, dims: dict[str, int], shard_size: int, dtype: torch.dtype, per_layer: bool,
                 manifest: dict[str, Any], seq: int = 0, position: int = 0) -> None:
        self.root, self.rank, self.dims, self.size, self.dtype = Path(root), rank, dims, int(shard_size), dtype
        self.per_layer, self.manifest = per_layer, manifest
        self.seq, self.first, self.n = seq, position, 0
        self.ids = torch.empty(self.size, dtype=torch.long)
        self.self_influence = torch.empty(self.size, dtype=torch.float32)
        self.vectors = {n: torch.empty(self.size, d, dtype=dtype) for n, d in dims.items()}
        self.layer_self = {n: torch.empty(self.size, dtype=torch.float32) for n in dims} if per_layer else {}
        self.written: list[Path] = []

    def add(self, ids: Tensor, vectors: dict[str, Tensor], self_influence: Optional[Tensor], layer_self: dict[str, Tensor]) -> None:
        """Append ``b`` examples (writing full shards as they fill)."""
        start, b = 0, int(ids.shape[0])
        while start < b:
            take = min(b - start, self.size - self.n)
            rows = slice(self.n, self.n + take)
            self.ids[rows] = ids[start : start + take]
            if self_influence is not None:
                self.self_influence[rows] = self_influence[start : start + take].float()
            else:
                self.self_influence[rows] = float("nan")
            for n, v in vectors.items():
                self.vectors[n][rows] = v[start : start + take].to(self.dtype)
            for n, s in layer_self.items():
                self.layer_self[n][rows] = s[start : start + take].float()
            self.n += take
            start += take
            if self.n == self.size:
                self.flush()

    def flush(self) -> None:
        """Write the rows collected so far as one shard (nothing when empty)."""
        if self.n == 0:
            return
        rows = slice(0, self.n)
        tensors = {"ids": self.ids[rows], "self_influence": self.self_influence[rows]}
        tensors.update({f"vectors::{n}": v[rows] for n, v in self.vectors.items()})
        tensors.update({f"self::{n}": s[rows] for n, s in self.layer_self.items()})
        manifest = {**self.manifest, "rank": self.rank, "seq": self.seq, "first": self.first, "n_examples": self.n}
        path = write_artifact(shard_path(self.root, self.rank, self.seq), SHARD_KIND, tensors, manifest)
        self.written.append(path)
        self.seq += 1
        self.first += self.n
        self.n = 0


def shard_bytes(dims: dict[str, int], dtype: torch.dtype, per_layer: bool) -> int:
    """Bytes per example in a shard (vectors, id, self-influence)."""
    item = torch.empty((), dtype=dtype).element_size()
    return sum(dims.values()) * item + 8 + 4 + (4 * len(dims) if per_layer else 0)


def default_shard_size(dims: dict[str, int], dtype: torch.dtype, per_layer: bool, target_bytes: int = 8 << 20) -> int:
    """Examples per shard so that a shard holds about ``target_bytes`` (8 MiB: small enough that
    the two shards a search holds at once are a small, constant part of its memory)."""
    return max(64, target_bytes // shard_bytes(dims, dtype, per_layer))
