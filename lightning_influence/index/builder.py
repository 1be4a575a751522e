"""Building an index: one pass over the training set, written in shards, resumable, one rank or many.

:func:`build_index` streams the training loader through the model (eval mode, the per-example
loss of each example), turns each tracked layer's per-example gradient into an index vector
(:mod:`.transform`) and writes shards (:mod:`.shards`) as they fill. Memory is one batch of
per-example gradients plus one shard buffer, whatever the training set's size.

**Resuming.** Every shard records the position of its first example and a fingerprint of the
build (model weights of the tracked layers, factors, damping, compression, projection, storage
dtype, shard size, world size). Run the same build again after a crash and it keeps the
complete shards of each rank, skips their examples (the loader must yield the same examples
in the same order; skipped batches are loaded but not run through the model) and ends with an
index identical to an uninterrupted build. A build with other options or weights refuses to
touch the folder unless ``if_exists="overwrite"``.

**Several processes.** Each rank passes its own part of the training data and writes its own
shards; rank zero writes the transform first and the catalog last, after a barrier, so the
index is one object whatever the number of ranks. Rank and world size default to
``torch.distributed``'s when it is initialised; the Lightning callback passes the trainer's.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Literal, Optional, Sequence

import torch
from torch import Tensor, nn

from .. import validation as check
from ..data import DuplicateIdsError
from ..ekfac.factors import Damping, EKFACFactors
from ..ekfac.layer_data import iter_layer_data
from ..ekfac.preconditioner import Preconditioner
from ..layers import TrackedLayer
from ..patterns import select_names
from ..storage import ArtifactError, read_artifact, read_manifest, write_artifact
from ..task import TaskLike, example_count, resolve_task
from .projection import COMPRESSIONS, DEFAULT_BUDGET
from .reference import FactorReference, FactorReferenceError, factors_match_artifact
from .shards import (
    CATALOG_KIND,
    RANK_KIND,
    InfluenceIndexError,
    ShardBuffer,
    all_shards,
    clean_temporaries,
    default_shard_size,
    rank_path,
    rank_shards,
    remove_index_files,
)
from .transform import TRANSFORM_KIND, IndexTransform

if TYPE_CHECKING:  # pragma: no cover
    from .search import InfluenceIndex

__all__ = ["IndexOptions", "build_index", "build_index_from_preconditioner", "DEFAULT_BUDGET", "DEFAULT_COMPRESSION", "DEFAULT_DIM",
           "DEFAULT_STORAGE_DTYPE"]

DEFAULT_COMPRESSION = "auto"
DEFAULT_DIM = 1024
DEFAULT_STORAGE_DTYPE = "float16"
STORAGE_DTYPES = ("float16", "bfloat16", "float32", "float64")
IfExists = Literal["resume", "overwrite", "error"]
OWNER = "build_index"


@dataclass(frozen=True)
class IndexOptions:
    """How training gradients are compressed and stored: plain values, checked on construction
    and saved with the index (its catalog's and transform's ``settings``).

    Attributes:
        compression: ``"auto"`` (default: layers stored exactly while the example fits
            ``budget`` numbers, the rest sketched by SJLT to an equal share, at least ``dim``;
            see :func:`~lightning_influence.index.projection.layer_dims`), ``"exact"`` (no
            projection), ``"sjlt"`` (sparse sign projection of the whitened gradient, ``dim``
            per layer) or ``"kronecker"`` (``P_S X P_Aᵀ`` per layer); see
            :mod:`lightning_influence.index.projection`.
        dim: numbers stored per layer and example for ``"sjlt"`` and ``"kronecker"`` (a layer
            with no more entries than ``dim`` is stored exactly); for ``"auto"`` the fewest
            numbers a sketched layer gets (``None``: no floor); ignored by ``"exact"``.
        dtype: storage dtype of the vectors: ``"float16"``, ``"bfloat16"``, ``"float32"`` or
            ``"float64"`` (:attr:`storage_dtype` is the ``torch.dtype``); self-influence is
            always float32.
        seed: seed of the random projections.
        shard_size: examples per shard (``None``: about 8 MiB per shard).
        per_layer: also store each layer's self-influence (``InfluenceScores.per_layer``).
        self_influence: compute exact self-influence during the build (needs each rotated
            per-example gradient; ``False`` lets a Kronecker projection skip forming them).
        budget: numbers per example that ``"auto"`` may spend (default 49,152: GPT-2 small's
            48 layers × 1,024, 98,304 bytes in float16); ignored by the other compressions.

    Raises:
        InvalidArgumentError: an option has the wrong type or value (the message names it).
    """

    compression: str = DEFAULT_COMPRESSION
    dim: Optional[int] = DEFAULT_DIM
    dtype: str = DEFAULT_STORAGE_DTYPE
    seed: int = 0
    shard_size: Optional[int] = None
    per_layer: bool = False
    self_influence: bool = True
    budget: Optional[int] = DEFAULT_BUDGET

    def __post_init__(self) -> None:
        owner = "IndexOptions"
        check.choice(owner, "compression", self.compression, COMPRESSIONS)
        check.positive_int(owner, "dim", self.dim, allow_none=self.compression in ("exact", "auto"))
        check.positive_int(owner, "budget", self.budget, allow_none=self.compression != "auto")
        check.choice(owner, "dtype", self.dtype, STORAGE_DTYPES)
        check.non_negative_int(owner, "seed", self.seed)
        check.positive_int(owner, "shard_size", self.shard_size, allow_none=True)
        check.boolean(owner, "per_layer", self.per_layer)
        check.boolean(owner, "self_influence", self.self_influence)

    @property
    def storage_dtype(self) -> torch.dtype:
        """``dtype`` as a ``torch.dtype``."""
        return getattr(torch, self.dtype)

    def as_dict(self) -> dict[str, Any]:
        """The options as JSON values, for manifests."""
        return asdict(self)


def _model_digest(tracked: Sequence[TrackedLayer]) -> str:
    """SHA-256 of the tracked layers' weights (part of the build fingerprint)."""
    h = hashlib.sha256()
    for t in tracked:
        for p in t.parameters():
            h.update(t.name.encode())
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _default_rank_world(rank: Optional[int], world_size: Optional[int]) -> tuple[int, int]:
    dist = torch.distributed
    initialised = dist.is_available() and dist.is_initialized()
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    if world_size is None:
        world_size = dist.get_world_size() if initialised else 1
    if not 0 <= rank < world_size:
        raise check.InvalidArgumentError(f"{OWNER}(rank={rank}, world_size={world_size}): need 0 <= rank < world_size")
    return int(rank), int(world_size)


def _default_barrier(world_size: int) -> Callable[[], None]:
    dist = torch.distributed
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        return dist.barrier
    if world_size > 1:
        raise check.InvalidArgumentError(f"{OWNER}(world_size={world_size}) needs a barrier= callable or an initialised torch.distributed")
    return lambda: None


class _Positions:
    """``positions[a:b]`` → ids of id-less examples ``a .. b-1`` of the batches a :class:`_Skipping`
    yields, counted from the start of the whole loader (skipped examples included)."""

    def __init__(self, skipping: "_Skipping") -> None:
        self.skipping = skipping

    def __getitem__(self, s: slice) -> Tensor:
        return torch.arange(self.skipping.skipped + s.start, self.skipping.skipped + s.stop)


class _Skipping:
    """The batches of ``loader`` from the one holding example ``done`` on (resumption);
    ``skipped`` counts the examples of the batches left out, ``drop`` the examples of the first
    batch yielded that were already written."""

    def __init__(self, loader: Iterable[Any], task: TaskLike, done: int) -> None:
        self.loader, self.task, self.done = loader, task, done
        self.skipped = 0
        self.drop = 0

    def __iter__(self) -> Iterator[Any]:
        seen = 0
        first = True
        for batch in self.loader:
            n = example_count(self.task, batch)
            if seen + n <= self.done:
                seen += n
                self.skipped = seen
                continue
            if first:
                self.drop = self.done - seen
                first = False
            yield batch


def build_index_from_preconditioner(
    model: nn.Module,
    preconditioner: Preconditioner,
    tracked: Sequence[TrackedLayer],
    train_loader: Iterable[Any],
    path: str | os.PathLike,
    options: IndexOptions,
    task: Optional[TaskLike] = None,
    dtype: Optional[torch.dtype] = None,
    if_exists: IfExists = "resume",
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    barrier: Optional[Callable[[], None]] = None,
    progress: Optional[bool] = None,
    transform: Optional[IndexTransform] = None,
    factors_path: Optional[str | os.PathLike] = None,
) -> "InfluenceIndex":
    """:func:`build_index` from a ready :class:`~lightning_influence.ekfac.preconditioner.Preconditioner`
    and tracked layers (what the multi-stage scorer and the callback use).

    Args:
        factors_path: the saved factor artifact holding ``preconditioner``'s factors: the index
            then references it (path and checksums) instead of storing the eigenbases and
            whitening itself (see :mod:`~lightning_influence.index.reference`). The caller
            vouches that the artifact holds these factors (:func:`~.reference.factors_match_artifact`
            checks a sample).

    Returns:
        The finished :class:`~lightning_influence.index.InfluenceIndex`, bound to ``model``.

    Raises:
        DuplicateIdsError: two training examples carry the same id.
    """
    from .search import InfluenceIndex

    if not isinstance(options, IndexOptions):
        raise check.InvalidArgumentError(f"{OWNER}(options=...) must be an IndexOptions, got {options!r}")
    check.choice(OWNER, "if_exists", if_exists, ("resume", "overwrite", "error"))
    rank, world_size = _default_rank_world(rank, world_size)
    barrier = barrier or _default_barrier(world_size)
    root = Path(path)
    if root.exists() and (not root.is_dir() or read_manifest(root) is not None):
        raise InfluenceIndexError(f"{OWNER}: {root} is a file or an artifact, not an index folder; choose another path")
    task = resolve_task(model, task)
    dtype = dtype or torch.promote_types(next(model.parameters()).dtype, torch.float32)
    reference = FactorReference.of(factors_path, root) if factors_path is not None and transform is None else None
    if reference is None and transform is None and preconditioner.has_factors:
        _warn_if_copy_is_large(preconditioner)
    transform = transform or IndexTransform.from_preconditioner(preconditioner, tracked, options.compression, options.dim, options.seed,
                                                                reference=reference, budget=options.budget)
    shard_size = options.shard_size or default_shard_size(transform.dims, options.storage_dtype, options.per_layer)
    # the per-layer choice the rule resolved to (None: stored exactly; else the sketch's length)
    settings = {**options.as_dict(), "shard_size": shard_size, "world_size": world_size, "layer_dims": transform.layer_choice}
    fingerprint = transform.fingerprint({"settings": settings, "model": _model_digest(tracked)})

    if rank == 0:
        _prepare_folder(root, fingerprint, if_exists)
        if read_manifest(root / "transform") is None:
            transform.save(root / "transform", {"fingerprint": fingerprint, "settings": settings})
    barrier()
    if _catalog_fingerprint(root) != fingerprint:
        on_disk = (read_manifest(root / "transform") or {}).get("fingerprint")
        if on_disk != fingerprint:
            raise InfluenceIndexError(
                f"{OWNER}: rank {rank} computes a different transform or model than rank 0 wrote to {root / 'transform'} "
                "(every rank needs the same model weights, factors and options)"
            )
        _build_rank(model, transform, tracked, task, train_loader, root, rank, world_size, shard_size, options, settings,
                    fingerprint, dtype, progress)
        barrier()
        if rank == 0:
            _write_catalog(root, transform, world_size, settings, fingerprint)
        barrier()
    return _finished(root, transform, fingerprint, model, task, progress)


def _finished(root: Path, transform: IndexTransform, fingerprint: str, model: nn.Module, task: TaskLike,
              progress: Optional[bool]) -> "InfluenceIndex":
    """The finished index with the transform this build holds, not read back from disk (which
    would load a referencing index's factors a second time); opened from disk when the catalog
    is not this build's."""
    from .search import InfluenceIndex, load_index

    try:
        _, catalog = read_artifact(root / "catalog", kind=CATALOG_KIND)
    except ArtifactError:
        catalog = None
    if catalog is None or catalog.get("fingerprint") != fingerprint:
        return load_index(root, model=model, task=task, progress=progress)
    return InfluenceIndex(root, catalog, transform, model, task, progress)


def _catalog_fingerprint(root: Path) -> Optional[str]:
    """The finished index's fingerprint, or ``None`` when there is no catalog or a shard it lists
    is missing or replaced (deleted after a corruption report: the build then resumes)."""
    m = read_manifest(root / "catalog")
    if m is None or m.get("kind") != CATALOG_KIND:
        return None
    for e in m.get("shards", []):
        sm = read_manifest(root / e["path"])
        if sm is None or sm.get("tensor_sha256") != e["sha256"]:
            return None
    return m.get("fingerprint")


def _prepare_folder(root: Path, fingerprint: str, if_exists: IfExists) -> None:
    """Rank zero: refuse, clear or keep what is already at ``root`` according to ``if_exists``."""
    existing = [p for p in (root / "catalog", root / "transform") if read_manifest(p) is not None]
    if not existing and not (root / "shards").exists():
        return
    if if_exists == "error":
        raise InfluenceIndexError(f"{OWNER}: {root} already holds an index (or part of one); pass if_exists='resume' or 'overwrite'")
    if if_exists == "overwrite":
        remove_index_files(root)
        return
    on_disk = (read_manifest(root / "transform") or {}).get("fingerprint")
    if on_disk is not None and on_disk != fingerprint:
        raise InfluenceIndexError(
            f"{OWNER}: {root} holds an index built from other weights, factors or options; resuming it would mix "
            "two builds. Pass if_exists='overwrite' to replace it, or choose another folder"
        )


def _build_rank(model, transform, tracked, task, loader, root, rank, world_size, shard_size, options, settings, fingerprint, dtype, progress) -> None:
    """This rank's shards: resume from the complete ones, compute the rest, mark the rank done."""
    clean_temporaries(root, rank)
    shards = _resumable(root, rank, fingerprint)
    done = sum(s.n for s in shards)
    marker = read_manifest(rank_path(root, rank))
    if marker is not None and marker.get("fingerprint") == fingerprint and marker.get("n_shards") == len(shards) \
            and marker.get("n_examples") == done:
        return  # this rank had finished; its shards are all there
    names = transform.names
    buffer = ShardBuffer(root, rank, transform.dims, shard_size, options.storage_dtype, options.per_layer,
                         {"fingerprint": fingerprint, "world_size": world_size, "layers": names},
                         seq=len(shards), position=done)
    seen = _SeenIds(root, shards)
    skipping = _Skipping(loader, task, done)
    stream = iter_layer_data(model, skipping, tracked, task, "loss", progress=progress, desc="index build", default_ids=_Positions(skipping))
    for ids, data in stream:
        seen.add(ids[skipping.drop:], rank)
        vectors, total, layer_self = {}, None, {}
        for n in names:
            io = data.pop(n)
            lt = transform.layers[n]
            if options.self_influence or not lt.factorised:
                vec, s = lt.train_batch(io.a, io.ds, dtype)
                if options.self_influence:
                    total = s if total is None else total + s
                    if options.per_layer:
                        layer_self[n] = s
            else:
                vec = lt.train_vectors_from_tokens(io.a, io.ds, dtype)
            vectors[n] = vec
        drop, skipping.drop = skipping.drop, 0
        if drop:
            ids, vectors = ids[drop:], {n: v[drop:] for n, v in vectors.items()}
            total = None if total is None else total[drop:]
            layer_self = {n: s[drop:] for n, s in layer_self.items()}
        buffer.add(ids, vectors, total, layer_self)
    buffer.flush()
    n_total = buffer.first
    write_artifact(rank_path(root, rank), RANK_KIND, {"n_examples": torch.tensor([n_total])},
                   {"rank": rank, "world_size": world_size, "fingerprint": fingerprint, "n_examples": n_total,
                    "n_shards": buffer.seq})


def _resumable(root: Path, rank: int, fingerprint: str):
    """The leading run of complete, consistent shards of ``rank``; later ones are removed."""
    keep = []
    position = 0
    for s in rank_shards(root, rank):
        if s.seq != len(keep) or s.first != position or s.fingerprint != fingerprint:
            break
        keep.append(s)
        position += s.n
    for s in rank_shards(root, rank)[len(keep):]:
        shutil.rmtree(s.path)  # this rank's own shard, listed because its manifest is an index shard's
    return keep


def _write_catalog(root: Path, transform: IndexTransform, world_size: int, settings: dict, fingerprint: str) -> None:
    """Rank zero, after every rank finished: the catalog listing every shard."""
    counts = []
    for r in range(world_size):
        m = read_manifest(rank_path(root, r))
        if m is None or m.get("kind") != RANK_KIND or m.get("fingerprint") != fingerprint:
            raise InfluenceIndexError(f"{OWNER}: rank {r} did not finish its part of the index at {root}")
        counts.append(int(m["n_examples"]))
    shards = all_shards(root, world_size)
    for r in range(world_size):
        if sum(s.n for s in shards if s.rank == r) != counts[r]:
            raise InfluenceIndexError(f"{OWNER}: the shards of rank {r} at {root} do not add up to the {counts[r]} examples it reported")
    if world_size > 1:
        seen = _SeenIds(root, [])
        for s in shards:
            seen.add(_shard_ids(s.path), s.rank)
    entries = [s.entry(root) for s in shards]
    n = sum(counts)
    write_artifact(root / "catalog", CATALOG_KIND, {"shard_sizes": torch.tensor([s.n for s in shards], dtype=torch.long)}, {
        "fingerprint": fingerprint,
        "n_examples": n,
        "n_shards": len(entries),
        "bytes": sum(s.nbytes for s in shards),
        "settings": settings,
        "layers": [t.meta() for t in transform.layers.values()],
        "compression": transform.compression,
        "dim": transform.dim,
        "damping": transform.damping,
        "shards": entries,
    })


def _shard_ids(path: Path) -> Tensor:
    """The ``ids`` tensor of a shard, read alone (not its vectors)."""
    from safetensors import safe_open

    m = read_manifest(path) or {}
    with safe_open(str(path / str(m.get("tensor_file", "tensors.safetensors"))), framework="pt") as f:
        return f.get_tensor("ids")


class _SeenIds:
    """Every training id written so far (of resumed shards too); raises
    :class:`~lightning_influence.data.DuplicateIdsError` on a repeat, as the callbacks do."""

    def __init__(self, root: Path, shards: Sequence[Any]) -> None:
        self.root = root
        self.ids: set[int] = set()
        for s in shards:
            self.add(_shard_ids(s.path), s.rank)

    def add(self, ids: Tensor, rank: int) -> None:
        values = ids.reshape(-1).tolist()
        batch = set(values)
        repeated = sorted(batch & self.ids) if len(batch) == len(values) else sorted({v for v in values if values.count(v) > 1} | (batch & self.ids))
        if repeated:
            raise DuplicateIdsError(
                f"{OWNER}: {len(repeated)} training ids repeat an id of another example (e.g. ids {repeated[:10]}, rank {rank}) in the "
                f"index at {self.root}; every example needs its own id (IndexedDataset numbers them 0..n-1; give a second set "
                "an offset, and under several processes give each rank other examples)")
        self.ids |= batch


_LARGE_COPY = 10 << 20


def _warn_if_copy_is_large(preconditioner: Preconditioner) -> None:
    """Warn when an index is about to store a copy of factor-derived tensors larger than 10 MB
    (factors passed as an in-memory object that no saved artifact is known to hold)."""
    n = sum(f.q_s.numel() + f.q_a.numel() + f.lambdas.numel() for f in preconditioner.factors.values())
    nbytes = 8 * n
    if nbytes > _LARGE_COPY:
        warnings.warn(
            f"{OWNER}: these factors are not known to be saved, so the index stores its own copy of their eigenbases and "
            f"whitening ({nbytes / 1e9:.2f} GB in float64); pass the saved factor folder instead "
            "(build_index(model, 'path/to/factors', ...)) and the index references it (a few KB)",
            stacklevel=3)


def build_index(
    model: nn.Module,
    factors: Optional[EKFACFactors | str | os.PathLike],
    train_loader: Iterable[Any],
    path: str | os.PathLike,
    *,
    compression: str = DEFAULT_COMPRESSION,
    dim: Optional[int] = DEFAULT_DIM,
    dtype: str = DEFAULT_STORAGE_DTYPE,
    budget: Optional[int] = DEFAULT_BUDGET,
    damping: Damping = None,
    layers: Optional[str | Sequence[str]] = None,
    task: Optional[TaskLike] = None,
    seed: int = 0,
    shard_size: Optional[int] = None,
    per_layer: bool = False,
    self_influence: bool = True,
    compute_dtype: Optional[torch.dtype] = None,
    if_exists: IfExists = "resume",
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    barrier: Optional[Callable[[], None]] = None,
    progress: Optional[bool] = None,
    factors_path: Optional[str | os.PathLike] = None,
) -> "InfluenceIndex":
    """Write the training set's preconditioned, compressed gradients to ``path``, once.

    Args:
        model: the model at the weights to explain.
        factors: the saved factor artifact's folder (the index then *references* it: its path
            and checksums are recorded, not a copy of the factors, and opening the index reads
            the factors from there, refusing them when they changed), EK-FAC factors in memory
            (:class:`~lightning_influence.ekfac.factors.EKFACFactors`: referenced when they are
            the ones saved at ``factors_path``, or at their ``artifact_path`` attribute when they
            carry one; else the index stores the eigenbases and whitening it needs), or ``None``
            for plain gradients (then ``layers`` names the layers).
        train_loader: the training examples, in a fixed order (their per-example loss is
            differentiated). Under several processes, this rank's part.
        path: the index folder (created).
        compression: ``"auto"`` (default), ``"exact"``, ``"sjlt"`` or ``"kronecker"`` (see
            :class:`IndexOptions`). ``"auto"`` stores every layer exactly when the example's
            gradient entries fit ``budget`` numbers; otherwise the smallest layers exactly while
            each fits an equal share of what is left, and the rest by SJLT to that share but at
            least ``dim`` numbers each (GPT-2 small: 1,024 per layer).
        dim: numbers per layer and example (default 1024; under ``"auto"`` the floor of a sketched layer).
        dtype: storage dtype of the vectors: ``"float16"`` (default), ``"bfloat16"``, ``"float32"`` or ``"float64"``.
        budget: numbers per example for ``"auto"`` (default 49,152, about 98 KB in float16).
        damping: λ per layer as in :class:`~lightning_influence.InfluenceScorer`: a float, a
            mapping, a rule name, ``None`` for the default rule (``"spectrum"`` over the indexed
            layers: :mod:`lightning_influence.ekfac.damping`), or ``"identity"`` for
            unpreconditioned gradients.
        layers: glob pattern(s) selecting layers of the factors (default: all).
        task: how to read batches (default: from the module / batch layout).
        seed: seed of the random projections.
        shard_size: examples per shard (default: about 8 MiB per shard).
        per_layer: store each layer's self-influence too.
        self_influence: compute exact self-influence during the build.
        compute_dtype: dtype of gradients during the build (default float32, float64 for a
            float64 model).
        if_exists: what to do when ``path`` holds an index: ``"resume"`` (continue an
            interrupted build with the same options; a finished one is returned as is),
            ``"overwrite"`` or ``"error"``.
        rank: this process's rank (default: ``torch.distributed``'s, else 0).
        world_size: number of processes building together (default: ``torch.distributed``'s, else 1).
        barrier: a callable that waits for every rank (default: ``torch.distributed.barrier``).
        progress: show a progress bar (``None``: only on a terminal).
        factors_path: where in-memory ``factors`` are saved (checked on a sample of each
            layer's tensors): the index references that artifact instead of copying them.

    Returns:
        The :class:`~lightning_influence.index.InfluenceIndex`, bound to ``model`` for queries.

    Raises:
        InvalidArgumentError: a bad argument.
        InfluenceIndexError: ``path`` holds something else, or an index built differently.
        FactorReferenceError: ``factors_path`` does not hold these factors.
        DuplicateIdsError: two training examples carry the same id.
    """
    options = IndexOptions(compression, dim, dtype, seed, shard_size, per_layer, self_influence, budget)
    loaded_here = isinstance(factors, (str, os.PathLike))
    if isinstance(factors, (str, os.PathLike)):
        if factors_path is not None:
            raise check.InvalidArgumentError(f"{OWNER}: pass the factors' folder as factors= or factors_path=, not both")
        from ..ekfac.factors import load_factors

        factors_path = factors
        factors = load_factors(factors_path)
    elif factors is not None and not isinstance(factors, EKFACFactors):
        raise check.InvalidArgumentError(f"{OWNER}(factors=...) must be a factor folder, EKFACFactors (see load_factors) or None, "
                                         f"got {type(factors).__name__}")
    elif factors is None and factors_path is not None:
        raise check.InvalidArgumentError(f"{OWNER}(factors_path=...) needs factors (or pass the folder as factors=)")
    pats = check.patterns(OWNER, "layers", layers)
    if factors is None:
        if pats is None:
            raise check.InvalidArgumentError(f"{OWNER}(layers=...) is required without factors")
        from ..layers import select_layers

        tracked = select_layers(model, pats, owner=OWNER)
        pre = Preconditioner(None, [t.name for t in tracked])
    else:
        names = select_names(factors.layer_names, pats, what="layer of the factors", owner=OWNER)
        sub = EKFACFactors({n: factors.layers[n] for n in names}, factors.fisher, factors.n_examples, factors.n_lambda_examples, factors.meta)
        tracked = sub.check_model(model)
        pre = Preconditioner(sub, names, damping if damping != "identity" else "identity", torch.float64)  # type: ignore[arg-type]
        if factors_path is not None and not loaded_here and not factors_match_artifact(factors, names, factors_path):
            raise FactorReferenceError(f"{OWNER}(factors_path={str(factors_path)!r}): that folder does not hold these factors "
                                       "(a sample of their eigenvectors and eigenvalues differs, or it is no factor artifact)")
        if factors_path is None:  # factors that know the artifact they were loaded from (``artifact_path``)
            known = getattr(factors, "artifact_path", None)
            if known is not None and factors_match_artifact(factors, names, known):
                factors_path = known
    return build_index_from_preconditioner(model, pre, tracked, train_loader, path, options, task, compute_dtype, if_exists, rank, world_size, barrier,
                            progress, factors_path=factors_path if factors is not None else None)
