"""Samplers that choose the mini-batch of each LiSSA step from a pool of training examples.

All samplers share one interface (:class:`Sampler`): :meth:`Sampler.prepare` is called once per
LiSSA run (per epoch) with the model, task and pool; :meth:`Sampler.sample` then returns
``LongTensor[m]`` pool positions for one step. With ``redraw=True`` every step gets a fresh
draw; with ``redraw=False`` one subset is drawn at the first step and reused for the whole run.

* :class:`RandomSampler` — ``sample_size`` positions uniformly without replacement.
* :class:`LogitSampler` — for each class ``y`` present among the pool's targets, ``k`` positions
  from a multinomial with ``p_i ∝ softmax(f(x_i))_y``. For sequence models the "class" is the
  example's target as the task defines it (the default :class:`~lightning_influence.task.CausalLMTask`
  uses the first non-ignored target token) and ``softmax(f(x_i))`` is read at the position that
  predicts that token.
* :class:`FeatureSampler` — k-means on feature vectors (by default the input of the model's last
  ``nn.Linear``/``Conv1D``, i.e. the penultimate activations, averaged over real tokens for
  sequences; or ``feature_fn(model, batch) -> Tensor[B, D]``), then per centroid either the ``k``
  nearest pool points (``selection="topk"``) or ``k`` draws from a multinomial with
  ``p_i ∝ exp(-d_i / (temperature · mean_i d_i))`` where ``d_i`` is the distance to the centroid
  (``selection="weighted"``).

The k-means here (:func:`kmeans`) is a small torch implementation with k-means++ seeding.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Literal, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset, default_collate

from .. import validation as check
from ..batches import move_to_device
from ..data import IndexedDataset
from ..task import TaskLike

__all__ = [
    "SamplePool",
    "Sampler",
    "RandomSampler",
    "LogitSampler",
    "FeatureSampler",
    "kmeans",
    "make_sampler",
    "SAMPLER_NAMES",
]

SAMPLER_NAMES = ("random", "logit", "feature", "feature_topk", "feature_weighted")


class SamplePool:
    """The examples a sampler draws from: a map-style dataset plus how to collate it.

    Args:
        dataset: map-style dataset whose items the task understands once collated.
        collate_fn: turns a list of items into a batch (default: torch's ``default_collate``).
        device: where batches go (default: CPU).
        batch_size: batch size of the passes that compute logits or features over the pool.
    """

    def __init__(
        self,
        dataset: Dataset | Sequence[Any],
        collate_fn: Optional[Callable[[list], Any]] = None,
        device: Optional[torch.device | str] = None,
        batch_size: int = 256,
    ) -> None:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise check.InvalidArgumentError(
                f"SamplePool(dataset=...) must be a map-style dataset (with __len__ and __getitem__), got {type(dataset).__name__}"
            )
        if len(dataset) == 0:
            raise check.InvalidArgumentError("SamplePool(dataset=...) is empty: the sampler needs at least one example")
        self.dataset = dataset
        self.collate_fn = collate_fn or default_collate
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.batch_size = check.positive_int("SamplePool", "batch_size", batch_size)

    def __len__(self) -> int:
        return len(self.dataset)

    def batch(self, positions: Tensor) -> Any:
        """Collate the examples at ``positions`` into a batch on :attr:`device`."""
        fast = self._fast_batch(positions)
        if fast is not None:
            return move_to_device(fast, self.device)
        items = [self.dataset[int(i)] for i in positions.tolist()]
        return move_to_device(self.collate_fn(items), self.device)

    def _fast_batch(self, positions: Tensor) -> Any:
        """Index tensors directly for ``TensorDataset`` (optionally inside ``IndexedDataset``),
        giving what ``default_collate`` would give, without the per-item loop."""
        if self.collate_fn is not default_collate:
            return None
        ds, offset = self.dataset, None
        if isinstance(ds, IndexedDataset):
            ds, offset = ds.dataset, ds.offset
        if not isinstance(ds, TensorDataset):
            return None
        pos = positions.long()
        fields = [t[pos] for t in ds.tensors]
        return fields if offset is None else [pos + offset, fields]

    def iter_batches(self) -> Iterator[tuple[Tensor, Any]]:
        """``(positions, batch)`` over the whole pool in order."""
        n = len(self)
        for start in range(0, n, self.batch_size):
            pos = torch.arange(start, min(start + self.batch_size, n))
            yield pos, self.batch(pos)


class Sampler:
    """Base class: chooses pool positions for each LiSSA step.

    Subclasses implement :meth:`_prepare` (look at the model and pool) and :meth:`_draw` (one
    subset); the base class handles ``redraw``.
    """

    name = "sampler"

    def __init__(self, redraw: bool = True) -> None:
        self.redraw = check.boolean(type(self).__name__, "redraw", redraw)
        self._fixed: Optional[Tensor] = None
        self.pool_size = 0

    def prepare(self, model: nn.Module, task: TaskLike, pool: SamplePool, generator: Optional[torch.Generator] = None) -> None:
        """Called once per LiSSA run before the first :meth:`sample` (model in eval mode)."""
        self._fixed = None
        self.pool_size = len(pool)
        with torch.no_grad():
            self._prepare(model, task, pool, generator)

    def sample(self, generator: Optional[torch.Generator] = None) -> Tensor:
        """``LongTensor[m]`` pool positions for one step (CPU)."""
        if self.pool_size == 0:
            raise RuntimeError(f"{type(self).__name__}.sample() called before prepare()")
        if self.redraw:
            return self._draw(generator)
        if self._fixed is None:
            self._fixed = self._draw(generator)
        return self._fixed

    def _prepare(self, model: nn.Module, task: TaskLike, pool: SamplePool, generator: Optional[torch.Generator]) -> None:
        pass

    def task_methods(self) -> tuple[str, ...]:
        """The task methods :meth:`prepare` calls beyond those every task has: what
        :func:`~lightning_influence.task.resolve_task` is given as ``needs``."""
        return ()

    def _draw(self, generator: Optional[torch.Generator]) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Options, for manifests and logs."""
        return {"name": self.name, "redraw": self.redraw}


class RandomSampler(Sampler):
    """Uniform mini-batches of ``sample_size`` distinct pool positions."""

    name = "random"

    def __init__(self, sample_size: int = 100, redraw: bool = True) -> None:
        super().__init__(redraw)
        self.sample_size = check.positive_int("RandomSampler", "sample_size", sample_size)

    def _draw(self, generator: Optional[torch.Generator]) -> Tensor:
        m = min(self.sample_size, self.pool_size)
        return torch.randperm(self.pool_size, generator=generator)[:m]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "sample_size": self.sample_size}


def _class_probs(model: nn.Module, task: TaskLike, batch: Any) -> tuple[Tensor, Tensor]:
    """``(probs Tensor[B, C] float32, targets LongTensor[B])`` for the logit sampler."""
    logits = task.logits(model, batch)
    targets = task.targets(batch)
    if logits.dim() == 3:  # sequence model: position that predicts the example's target
        source = task.default_for(batch) if callable(getattr(task, "default_for", None)) else task
        shifted = getattr(source, "shifted_labels", None)
        if shifted is not None:
            labels = shifted(batch)
            pos = (labels != -100).float().argmax(dim=1)
        else:
            pos = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        logits = logits[torch.arange(logits.shape[0], device=logits.device), pos]
    elif logits.dim() != 2:
        raise ValueError(f"the logit sampler needs logits Tensor[B, C] or Tensor[B, T, V], got shape {tuple(logits.shape)}")
    return torch.softmax(logits.float(), dim=-1), targets.reshape(-1).long()


class LogitSampler(Sampler):
    """For each class, ``k`` draws from a multinomial with probability ∝ the model's softmax
    probability of that class.

    Args:
        sample_size: examples per step in total; ``k = max(1, sample_size // n_classes)``.
        k: examples per class (overrides ``sample_size``).
        classes: the classes to draw for (default: the distinct targets in the pool).
        replacement: draw with replacement (default; empirical frequencies are then exactly
            proportional to the probabilities).
        redraw: new draw every step (``True``) or one subset per run.
    """

    name = "logit"

    def __init__(
        self,
        sample_size: int = 100,
        k: Optional[int] = None,
        classes: Optional[Sequence[int]] = None,
        replacement: bool = True,
        redraw: bool = True,
    ) -> None:
        super().__init__(redraw)
        self.sample_size = check.positive_int("LogitSampler", "sample_size", sample_size)
        self.k_arg = check.positive_int("LogitSampler", "k", k, allow_none=True)
        self.classes_arg = None if classes is None else [int(c) for c in classes]
        self.replacement = check.boolean("LogitSampler", "replacement", replacement)
        self.probs: Optional[Tensor] = None  # Tensor[N, n_classes], columns normalised
        self.classes: Optional[Tensor] = None
        self.k = k or 0

    def task_methods(self) -> tuple[str, ...]:
        return ("logits", "targets")

    def _prepare(self, model: nn.Module, task: TaskLike, pool: SamplePool, generator: Optional[torch.Generator]) -> None:
        probs, targets = [], []
        for _, batch in pool.iter_batches():
            p, y = _class_probs(model, task, batch)
            probs.append(p.cpu())
            targets.append(y.cpu())
        all_p = torch.cat(probs)
        classes = torch.tensor(self.classes_arg) if self.classes_arg is not None else torch.unique(torch.cat(targets))
        if int(classes.max()) >= all_p.shape[1] or int(classes.min()) < 0:
            raise ValueError(f"LogitSampler classes {classes.tolist()} fall outside the model's {all_p.shape[1]} outputs")
        cols = all_p[:, classes].double()
        self.probs = cols / cols.sum(dim=0, keepdim=True)
        self.classes = classes
        self.k = self.k_arg or max(1, self.sample_size // len(classes))

    def _draw(self, generator: Optional[torch.Generator]) -> Tensor:
        assert self.probs is not None
        n = self.probs.shape[0]
        k = self.k if self.replacement else min(self.k, n)
        draws = torch.multinomial(self.probs.t(), k, replacement=self.replacement, generator=generator)
        return draws.reshape(-1)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "sample_size": self.sample_size, "k": self.k, "replacement": self.replacement}


def kmeans(
    x: Tensor,
    n_clusters: int,
    generator: Optional[torch.Generator] = None,
    iters: int = 50,
    tol: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means with k-means++ seeding.

    Args:
        x: ``Tensor[N, D]`` points.
        n_clusters: ``k ≤ N``.
        generator: for the seeding.
        iters: maximum Lloyd iterations.
        tol: stop when no centroid moves by more than ``tol`` (relative to the data scale).

    Returns:
        ``(centroids Tensor[k, D], labels LongTensor[N])``. An emptied cluster is re-seeded at the
        point farthest from its centroid.
    """
    if x.dim() != 2:
        raise ValueError(f"kmeans needs points Tensor[N, D], got shape {tuple(x.shape)}")
    n = x.shape[0]
    if not 1 <= n_clusters <= n:
        raise ValueError(f"kmeans: n_clusters must be in [1, {n}] for {n} points, got {n_clusters}")
    x = x.double()
    first = int(torch.randint(n, (1,), generator=generator))
    centroids = [x[first]]
    d2 = ((x - x[first]) ** 2).sum(1)
    for _ in range(1, n_clusters):
        total = d2.sum()
        if total <= 0:
            idx = int(torch.randint(n, (1,), generator=generator))
        else:
            idx = int(torch.multinomial((d2 / total).cpu(), 1, generator=generator))
        centroids.append(x[idx])
        d2 = torch.minimum(d2, ((x - x[idx]) ** 2).sum(1))
    c = torch.stack(centroids)
    scale = x.std().clamp_min(1e-12)
    labels = torch.zeros(n, dtype=torch.long, device=x.device)
    for _ in range(iters):
        dist = torch.cdist(x, c)
        labels = dist.argmin(1)
        new = torch.zeros_like(c).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=n_clusters).to(x.dtype)
        empty = counts == 0
        new = new / counts.clamp_min(1)[:, None]
        if bool(empty.any()):
            far = dist.gather(1, labels[:, None]).squeeze(1).argsort(descending=True)
            for j, e in enumerate(torch.nonzero(empty).flatten().tolist()):
                new[e] = x[far[j]]
        shift = float((new - c).norm(dim=1).max())
        c = new
        if shift <= tol * float(scale):
            break
    labels = torch.cdist(x, c).argmin(1)
    return c, labels


class _LastLayerInput:
    """Forward pre-hook capturing the input of the model's last ``nn.Linear``/``Conv1D``."""

    def __init__(self, model: nn.Module) -> None:
        from ..layers import select_layers

        # every supported layer ("*"): the default selection leaves out vocabulary-sized heads
        self.module = select_layers(model, "*")[-1].module
        self.value: Optional[Tensor] = None

    def __enter__(self) -> "_LastLayerInput":
        self.handle = self.module.register_forward_pre_hook(self._hook)
        return self

    def _hook(self, module: nn.Module, args: tuple) -> None:
        self.value = args[0].detach()

    def __exit__(self, *exc: Any) -> None:
        self.handle.remove()


def _default_features(model: nn.Module, task: TaskLike, batch: Any) -> Tensor:
    with _LastLayerInput(model) as cap:
        task.logits(model, batch)
    feats = cap.value
    if feats is None:
        raise RuntimeError("the model's last Linear layer did not run; pass feature_fn=... to FeatureSampler")
    if feats.dim() == 3:  # sequences: mean over real tokens
        mask = task.padding_mask(batch)
        if mask is None:
            return feats.mean(1)
        m = mask.to(feats.dtype)[..., None]
        return (feats * m).sum(1) / m.sum(1).clamp_min(1)
    return feats.reshape(feats.shape[0], -1)


class FeatureSampler(Sampler):
    """k-means on feature vectors, then per centroid the ``k`` nearest points (``"topk"``) or
    ``k`` distance-weighted multinomial draws (``"weighted"``).

    Args:
        sample_size: examples per step in total; ``k = max(1, sample_size // n_clusters)``.
        n_clusters: number of k-means centroids ``C``.
        selection: ``"topk"`` or ``"weighted"``.
        k: examples per centroid (overrides ``sample_size``).
        feature_fn: ``feature_fn(model, batch) -> Tensor[B, D]``; default: penultimate activations.
        temperature: for ``"weighted"``, ``p_i ∝ exp(-d_i / (temperature * mean(d)))``.
        kmeans_iters: Lloyd iterations.
        redraw: new draw every step (only matters for ``"weighted"``; top-k is deterministic
            given the clustering, which runs once per :meth:`prepare`).
    """

    def __init__(
        self,
        sample_size: int = 100,
        n_clusters: int = 10,
        selection: Literal["topk", "weighted"] = "topk",
        k: Optional[int] = None,
        feature_fn: Optional[Callable[[nn.Module, Any], Tensor]] = None,
        temperature: float = 0.25,
        kmeans_iters: int = 50,
        redraw: bool = True,
    ) -> None:
        super().__init__(redraw)
        owner = "FeatureSampler"
        self.sample_size = check.positive_int(owner, "sample_size", sample_size)
        self.n_clusters = check.positive_int(owner, "n_clusters", n_clusters)
        self.selection = check.choice(owner, "selection", selection, ("topk", "weighted"))
        self.k_arg = check.positive_int(owner, "k", k, allow_none=True)
        self.k = k or max(1, sample_size // n_clusters)
        if feature_fn is not None and not callable(feature_fn):
            raise check.InvalidArgumentError(
                f"{owner}(feature_fn=...) must be callable(model, batch) -> Tensor[B, D], got {feature_fn!r}"
            )
        self.feature_fn = feature_fn
        self.temperature = check.finite_float(owner, "temperature", temperature, minimum=0.0, strict_minimum=True)
        self.kmeans_iters = check.positive_int(owner, "kmeans_iters", kmeans_iters)
        self.name = f"feature_{selection}"
        self.features: Optional[Tensor] = None  # Tensor[N, D] float64
        self.centroids: Optional[Tensor] = None  # Tensor[C, D]
        self.distances: Optional[Tensor] = None  # Tensor[N, C]
        self.weights: Optional[Tensor] = None  # Tensor[N, C], columns normalised (weighted)

    def task_methods(self) -> tuple[str, ...]:
        return () if self.feature_fn is not None else ("logits",)

    def _prepare(self, model: nn.Module, task: TaskLike, pool: SamplePool, generator: Optional[torch.Generator]) -> None:
        feats = []
        for _, batch in pool.iter_batches():
            f = self.feature_fn(model, batch) if self.feature_fn is not None else _default_features(model, task, batch)
            feats.append(f.detach().reshape(f.shape[0], -1).double().cpu())
        x = torch.cat(feats)
        c = min(self.n_clusters, x.shape[0])
        self.features = x
        self.centroids, _ = kmeans(x, c, generator=generator, iters=self.kmeans_iters)
        self.distances = torch.cdist(x, self.centroids)
        w = torch.exp(-self.distances / (self.temperature * self.distances.mean(0, keepdim=True).clamp_min(1e-12)))
        self.weights = w / w.sum(0, keepdim=True)

    def _draw(self, generator: Optional[torch.Generator]) -> Tensor:
        assert self.distances is not None and self.weights is not None
        n = self.distances.shape[0]
        if self.selection == "topk":
            k = min(self.k, n)
            return torch.topk(self.distances, k, dim=0, largest=False).indices.t().reshape(-1)
        return torch.multinomial(self.weights.t(), self.k, replacement=True, generator=generator).reshape(-1)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "sample_size": self.sample_size,
            "n_clusters": self.n_clusters,
            "k": self.k,
            "temperature": self.temperature,
        }


def make_sampler(
    sampler: str | Sampler,
    sample_size: int = 100,
    redraw: bool = True,
    n_clusters: int = 10,
    feature_fn: Optional[Callable[[nn.Module, Any], Tensor]] = None,
) -> Sampler:
    """A sampler by name (``"random"``, ``"logit"``, ``"feature"`` = ``"feature_topk"``,
    ``"feature_weighted"``) with ``sample_size`` examples per step, or ``sampler`` itself."""
    if isinstance(sampler, Sampler):
        return sampler
    if sampler == "random":
        return RandomSampler(sample_size, redraw=redraw)
    if sampler == "logit":
        return LogitSampler(sample_size, redraw=redraw)
    if sampler in ("feature", "feature_topk", "feature_weighted"):
        sel = "weighted" if sampler == "feature_weighted" else "topk"
        return FeatureSampler(sample_size, n_clusters=n_clusters, selection=sel, feature_fn=feature_fn, redraw=redraw)
    raise check.InvalidArgumentError(
        f"make_sampler(sampler=...) must be one of {', '.join(map(repr, SAMPLER_NAMES))} or a lissa.Sampler instance, "
        f"got {sampler!r}"
    )
