"""Every rank together: strategy checks, collectives and probe splitting for work inside a
distributed training run (no Lightning import).

``trainer`` is anything with Lightning's ``world_size``, ``global_rank``, ``is_global_zero`` and
``strategy`` (``broadcast``, ``all_gather``, ``reduce``, ``barrier``, ``root_device``). A function
that runs a collective must be called on every rank. ``owner`` names the caller in messages.

* :func:`strategy_family` / :func:`check_strategy` / :func:`check_sharded_model`: which sharding
  a strategy does, and refusals with what to do instead (:class:`UnsupportedStrategyError`);
* :func:`all_ranks` / :func:`on_rank_zero`: a step that raises on one rank raises on every rank,
  so none waits in a later collective;
* :func:`gather_by_id`: per-example rows from every rank, sorted by id, duplicates reported;
* :func:`split_probe` / :func:`probe_padding`: a probe split across ranks by striding (rank ``r``
  takes examples ``r, r + W, ...``), never padded except under a sharded strategy, where every
  forward pass is a collective and shares are padded to equal lengths.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Iterable, Optional, TypeVar

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, Subset

from . import validation as check
from .data import DuplicateIdsError
from .errors import InfluenceError

__all__ = ["UnsupportedStrategyError", "SHARDED_FAMILIES", "strategy_family", "check_strategy", "check_sharded_model",
           "broadcast", "reduce_sum", "all_ranks", "on_rank_zero", "gather_by_id", "split_probe", "probe_padding", "Strided",
           "Ranks", "assign_by_cost"]

T = TypeVar("T")


class UnsupportedStrategyError(InfluenceError, RuntimeError):
    """The training strategy is one this callback cannot run under (the message says what to do)."""


SHARDED_FAMILIES = {
    "FSDPStrategy": "fsdp",
    "ModelParallelStrategy": "fsdp2",
    "DeepSpeedStrategy": "deepspeed",
    "XLAFSDPStrategy": "xla_fsdp",
}
"""Lightning strategy class name → the family of parameter sharding it does. Matched by name along
the strategy's class hierarchy, so subclasses count and optional packages (DeepSpeed, XLA) are
never imported."""

STRATEGY_NAMES = {family: name for name, family in SHARDED_FAMILIES.items()}


def strategy_family(trainer: Any) -> str:
    """``"fsdp"`` (FSDP1), ``"fsdp2"`` (``ModelParallelStrategy``: ``fully_shard``), ``"deepspeed"``,
    ``"xla_fsdp"``, or ``"replicated"`` (one process, DDP and every strategy that keeps whole
    parameters on every rank)."""
    for klass in type(trainer.strategy).__mro__:
        family = SHARDED_FAMILIES.get(klass.__name__)
        if family is not None:
            return family
    return "replicated"


def check_strategy(trainer: Any, owner: str, supported: tuple[str, ...], refusal: str) -> bool:
    """Refuse a sharded strategy family not in ``supported`` (the message ends with ``refusal``:
    what to do instead), and FSDP2 with tensor parallelism (layer hooks would see slices of the
    activations).

    Returns:
        Whether parameters are sharded, so that every forward pass is a collective.

    Raises:
        UnsupportedStrategyError: the message names the strategy and what to do instead.
    """
    family = strategy_family(trainer)
    if family == "replicated":
        return False
    strategy = type(trainer.strategy).__name__
    if family not in supported:
        kind = STRATEGY_NAMES[family] + ("" if strategy == STRATEGY_NAMES[family] else f" ({strategy})")
        raise UnsupportedStrategyError(f"{owner} does not support {kind}: {refusal}")
    mesh = getattr(trainer.strategy, "_device_mesh", None)
    names = getattr(mesh, "mesh_dim_names", None) or ()
    if family == "fsdp2" and "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
        raise UnsupportedStrategyError(
            f"{owner} does not support tensor parallelism (ModelParallelStrategy(tensor_parallel_size="
            f"{mesh['tensor_parallel'].size()})): it splits activations and parameters along their feature "
            "dimensions, which this library does not read. Use tensor_parallel_size=1 (FSDP2 data parallelism: "
            "fully_shard in configure_model)."
        )
    return True


def check_sharded_model(trainer: Any, pl_module: Any, owner: str) -> None:
    """Once the strategy has wrapped the model: under FSDP1, refuse what a callback's own passes
    (which call the LightningModule, not the strategy's wrapper) cannot run:
    ``use_orig_params=False`` (the modules then hold no parameters of their own) and parameters in
    the unit that wraps the whole LightningModule (gathered only when the model is called through
    that wrapper); then initialise the outermost units (FSDP1 does so lazily at the first training
    forward; a pass before it, such as Z0's ``record_initial``, would make inner units initialise
    as roots). Nothing to do under other strategies.

    Raises:
        UnsupportedStrategyError: the message names the parameters and the fix.
    """
    if strategy_family(trainer) != "fsdp":
        return
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    root = trainer.strategy.model
    units = [m for m in [root, *pl_module.modules()] if isinstance(m, FSDP)]
    if any(not getattr(u, "_use_orig_params", True) for u in units):
        raise UnsupportedStrategyError(
            f"{owner} under FSDPStrategy needs use_orig_params=True (Lightning's default), so that every module "
            "keeps its own parameters; do not pass use_orig_params=False"
        )
    handle = getattr(root, "_handle", None) if isinstance(root, FSDP) and root is not pl_module else None
    if handle is not None and handle.uses_sharded_strategy and list(getattr(handle.flat_param, "_fqns", []) or []):
        from .layers import unwrapped_name

        names = [unwrapped_name(n) for n in handle.flat_param._fqns]
        raise UnsupportedStrategyError(
            f"{owner} under FSDPStrategy: the parameters {names[:8]}{' ...' if len(names) > 8 else ''} are in the "
            "FSDP unit that wraps the whole LightningModule, which gathers them only when Lightning calls the model "
            "through its wrapper, but the callback's own passes call the LightningModule. Give the modules that own "
            "them units of their own: FSDPStrategy(auto_wrap_policy={...}) naming their types (e.g. {nn.Linear, "
            "nn.Embedding} or your block class), or wrap them in configure_model; or use ModelParallelStrategy "
            "(FSDP2) with fully_shard on each block."
        )
    # summon_full_params initialises the outermost units (their own parameters only: the check
    # above leaves none in the one around the module)
    for outer in FSDP.fsdp_modules(root, root_only=True):
        with FSDP.summon_full_params(outer, recurse=False, writeback=False):
            pass


def broadcast(trainer: Any, obj: T) -> T:
    """``obj`` as rank zero has it, on every rank."""
    return trainer.strategy.broadcast(obj, src=0) if trainer.world_size > 1 else obj


def reduce_sum(trainer: Any) -> Callable[[Tensor], Tensor]:
    """A function summing a tensor over ranks (the identity on one process); the input is left as it was."""
    if trainer.world_size <= 1:
        return lambda t: t
    return lambda t: trainer.strategy.reduce(t.clone(), reduce_op="sum")


def all_ranks(trainer: Any, fn: Callable[[], T], owner: str, device: Optional[torch.device] = None) -> T:
    """Run ``fn`` on every rank; if it raises on any rank, raise on every rank (the failing rank
    re-raises its own error, the others a ``RuntimeError`` quoting it), so that no rank is left
    waiting in a later collective."""
    error: Optional[BaseException] = None
    result: Any = None
    try:
        result = fn()
    except Exception as e:  # reported after every rank has agreed
        error = e
    if trainer.world_size <= 1:
        if error is not None:
            raise error
        return result
    device = device or trainer.strategy.root_device
    flags = trainer.strategy.all_gather(torch.tensor([0.0 if error is None else 1.0], device=device)).reshape(-1)
    if float(flags.sum()) == 0:
        return result
    src = int(torch.nonzero(flags)[0])
    mine = f"{type(error).__name__}: {error}" if error is not None and trainer.global_rank == src else ""
    text = trainer.strategy.broadcast(mine, src=src)
    if error is not None:
        raise error
    raise RuntimeError(f"{owner} failed on rank {src} ({text}); this rank stops too so that no rank waits")


def on_rank_zero(trainer: Any, fn: Callable[[], T], owner: str) -> Optional[T]:
    """Run ``fn`` on rank zero only (e.g. a write); every rank returns once it has finished, and
    a failure there raises on every rank."""
    return all_ranks(trainer, lambda: fn() if trainer.is_global_zero else None, owner)


def gather_by_id(trainer: Any, ids: Tensor, values: Tensor, owner: str, padding: int = 0) -> tuple[Tensor, Tensor]:
    """Gather per-example rows from every rank and sort them by id (identical on every rank).

    Args:
        ids: ``LongTensor[n_local]`` (lengths may differ across ranks).
        values: ``Tensor[n_local, ...]`` rows matching ``ids``.
        padding: how many repeated ids are expected (a sampler's padding); the first row of each
            is kept.

    Raises:
        DuplicateIdsError: more repeated ids than ``padding``; the message lists them.
    """
    ids = ids.reshape(-1).long()
    if trainer.world_size > 1:
        n = torch.tensor([ids.numel()], device=ids.device)
        sizes = trainer.strategy.all_gather(n).reshape(-1).tolist()
        longest = max(int(s) for s in sizes)
        pad = longest - ids.numel()
        all_ids = trainer.strategy.all_gather(torch.cat([ids, ids.new_full((pad,), -1)]))
        all_vals = trainer.strategy.all_gather(torch.cat([values, values.new_zeros((pad,) + tuple(values.shape[1:]))]))
        keep = torch.cat([torch.arange(int(s), device=all_ids.device) + r * longest for r, s in enumerate(sizes)])
        ids = all_ids.reshape(-1)[keep]
        values = all_vals.reshape((-1,) + tuple(values.shape[1:]))[keep]
    order = torch.argsort(ids, stable=True)
    ids, values = ids[order], values[order]
    first = torch.ones_like(ids, dtype=torch.bool)
    first[1:] = ids[1:] != ids[:-1]
    repeated = int((~first).sum())
    if repeated > padding:
        dup = torch.unique(ids[~first])[:10].tolist()
        raise DuplicateIdsError(
            f"{owner}: {repeated} examples repeat an id of another example (e.g. ids {dup}); every "
            "example needs its own id (IndexedDataset numbers them 0..n-1; give a second set an offset)"
        )
    return ids[first], values[first]


def split_probe(trainer: Any, data: Any, batch_size: int, sharded: bool, owner: str) -> Iterable[Any]:
    """Batches of ``data`` (a ``Dataset`` or ``DataLoader``) for this rank.

    One process: ``data`` itself (a ``Dataset`` batched with ``batch_size``, in order). Several: a
    map-style dataset is strided across ranks without padding; an iterable one is split by batch
    (rank ``r`` takes batches ``r, r + W, ...``). ``sharded``: every rank gets ``ceil(n / W)``
    examples, the shorter shares padded with the dataset's first examples (:func:`probe_padding`
    repeats in all, dropped again by :func:`gather_by_id`); an iterable dataset is refused.

    Raises:
        InvalidArgumentError: an iterable dataset under a sharded strategy.
    """
    if isinstance(data, DataLoader):
        dataset, batch_size, kw = data.dataset, data.batch_size, {"collate_fn": data.collate_fn, "num_workers": data.num_workers}
        if trainer.world_size <= 1:
            return data
    else:
        dataset, kw = data, {}
    world, rank = trainer.world_size, trainer.global_rank
    if isinstance(dataset, IterableDataset):
        if sharded and world > 1:
            raise check.InvalidArgumentError(
                f"{owner}: an iterable probe dataset cannot be split into equal shares, which a sharded "
                "strategy needs (every forward pass is a collective); pass a map-style Dataset"
            )
        loader = data if isinstance(data, DataLoader) else DataLoader(dataset, batch_size=batch_size, **kw)
        return loader if world <= 1 else Strided(loader, rank, world)
    if world > 1:
        indices = list(range(rank, len(dataset), world))
        if sharded:
            indices += list(range(-(-len(dataset) // world) - len(indices)))
        dataset = Subset(dataset, indices)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, **kw)


def probe_padding(trainer: Any, data: Any, sharded: bool) -> int:
    """How many repeated examples :func:`split_probe` adds over all ranks (0 unless ``sharded``)."""
    dataset = data.dataset if isinstance(data, DataLoader) else data
    if not sharded or trainer.world_size <= 1 or isinstance(dataset, IterableDataset):
        return 0
    n, world = len(dataset), trainer.world_size
    return -(-n // world) * world - n


class Strided:
    """Every ``world``-th batch of ``loader``, starting at ``rank``."""

    def __init__(self, loader: Iterable[Any], rank: int, world: int) -> None:
        self.loader, self.rank, self.world = loader, rank, world

    def __iter__(self):
        return itertools.islice(iter(self.loader), self.rank, None, self.world)


class Ranks:
    """The ranks of a run as core objects use them: the collectives above, bound to ``trainer``
    and ``owner`` (the caller named in messages)."""

    def __init__(self, trainer: Any, owner: str) -> None:
        self.trainer, self.owner = trainer, owner

    @property
    def rank(self) -> int:
        return int(self.trainer.global_rank)

    @property
    def world(self) -> int:
        return int(self.trainer.world_size)

    @property
    def is_zero(self) -> bool:
        return bool(self.trainer.is_global_zero)

    @property
    def device(self) -> torch.device:
        return self.trainer.strategy.root_device

    def all(self, fn: Callable[[], T]) -> T:
        """:func:`all_ranks`."""
        return all_ranks(self.trainer, fn, self.owner)

    def zero(self, fn: Callable[[], T]) -> Optional[T]:
        """:func:`on_rank_zero`."""
        return on_rank_zero(self.trainer, fn, self.owner)

    def broadcast(self, obj: T) -> T:
        """:func:`broadcast` from rank zero."""
        return broadcast(self.trainer, obj)

    def reduce_sum(self, tensor: Tensor) -> Tensor:
        """``tensor`` summed over ranks."""
        return reduce_sum(self.trainer)(tensor)

    def gather_by_id(self, ids: Tensor, values: Tensor, padding: int = 0) -> tuple[Tensor, Tensor]:
        """:func:`gather_by_id`."""
        return gather_by_id(self.trainer, ids, values, self.owner, padding)

    def broadcast_tensor(self, tensor: Tensor, src: int) -> Tensor:
        """Rank ``src``'s ``tensor`` on every rank, in place (every rank passes a contiguous
        tensor of the same shape and dtype: the data on ``src``, a buffer elsewhere, on the
        strategy's device). ``torch.distributed.broadcast`` sends the bytes as they are, without
        pickling (a layer's eigenvectors can be hundreds of MB)."""
        if self.world > 1:
            torch.distributed.broadcast(tensor, src=src)
        return tensor


def assign_by_cost(costs: dict[str, float], world: int) -> dict[str, int]:
    """Name → rank in ``range(world)``, balancing the summed cost per rank: the costliest item
    first, each to the rank with the least cost so far (ties: the lowest rank). Deterministic,
    so every rank computes the same assignment."""
    load = [0.0] * max(1, world)
    out: dict[str, int] = {}
    for name in sorted(costs, key=lambda n: (-costs[n], n)):
        rank = min(range(len(load)), key=lambda r: (load[r], r))
        out[name] = rank
        load[rank] += costs[name]
    return out
