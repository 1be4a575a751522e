"""Incremental Gram matrix of parameter snapshots, with the snapshots spilled to disk.

``G[i, j] = <θ_i, θ_j>`` needs every past snapshot when a new one arrives. Keeping them in RAM
costs ``P × E`` numbers; instead each snapshot is written to its own safetensors file
(``snapshot_00000.safetensors``, one tensor per parameter, in the parameter's own dtype, so
nothing is lost) and the new row of ``G`` is computed by streaming the old files **one
parameter tensor at a time** (``safetensors.safe_open``), in float64.

**In-memory copies while they fit** ``cache_bytes`` (default ``DEFAULT_CACHE_BYTES``, 256 MiB):
while every snapshot so far, as one float64 vector each, fits the budget, they are also kept in
RAM and the new row is one matrix-vector product with them, with no file read (a small model
recorded every epoch would otherwise reopen ``E`` files per row, ``O(E²)`` reads in all). The
files are written at once unless ``lazy_files=True`` (what :class:`~lightning_influence.z0.recorder.Z0Recorder`
uses); then the files of snapshots held in memory are written only when they are needed (:meth:`SnapshotGram.flush`):
when a checkpoint takes the state (:meth:`SnapshotGram.state_dict`, so that a resumed run finds
them), when the copies no longer fit and are dropped, and when the caller keeps the snapshots; a
run that never checkpoints and keeps no snapshots writes none while they fit. Past the budget the
copies are dropped and rows stream from the files as below. Both paths compute the same numbers (float64
dot products of the same values, reduced over the concatenated parameters when cached, and per
parameter when streamed; they differ by float64 round-off only).

Memory bound past the budget: the snapshot being recorded (which is the live parameters: no copy
beyond one parameter tensor at a time on the CPU) plus one parameter tensor of one old snapshot,
in float64.
Disk: ``P × E`` numbers in the parameters' dtype under ``directory`` while recording; the files
are deleted by :meth:`SnapshotGram.cleanup` unless they are to be kept. Cleaning up deletes only
the snapshot files this recording wrote, and the folder only when the recording created it and
nothing else is left in it: a user's folder given as ``directory`` keeps its other files.
Time per new snapshot: one read of every previous snapshot (``O(P × E)``).

**Sharded parameters** (FSDP): with ``shard=(rank, count)`` each process records only its own
part of the parameters (:func:`~lightning_influence.z0.shards.local_parts`) in its own files,
``snapshot_00000.shard-00001-of-00002.safetensors``, and computes its part of each new Gram row
from its own files (:meth:`SnapshotGram.partial_row`); the caller sums the parts over ranks and
hands the row back (:meth:`SnapshotGram.extend`). No process reads or holds another's part;
:func:`load_snapshot` reassembles a whole snapshot from the shard files when asked (tests, small
models). Memory and disk per process are then those of its shard.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from ..faults import fault_point
from ..atomicfs import apply_umask

__all__ = ["SnapshotGram", "snapshot_file_name", "load_snapshot", "flatten_snapshot", "DEFAULT_CACHE_BYTES"]

DEFAULT_CACHE_BYTES = 256 * 2**20
"""RAM for in-memory float64 copies of the snapshots (see the module docstring)."""


_SHARD = r"(?:\.shard-(\d{5})-of-(\d{5}))?"
_SNAPSHOT = re.compile(rf"^snapshot_(\d{{5,}}){_SHARD}\.safetensors$")
_SNAPSHOT_TMP = re.compile(rf"^\.snapshot_(\d{{5,}}){_SHARD}\.safetensors\.tmp-[0-9a-f]{{8}}$")
Shard = tuple[int, int]
"""``(rank, count)``: this process records part ``rank`` of ``count``."""


def snapshot_file_name(row: int, shard: Optional[Shard] = None) -> str:
    """File name of snapshot ``row`` (of one shard of it with ``shard=(rank, count)``)."""
    if shard is None:
        return f"snapshot_{row:05d}.safetensors"
    return f"snapshot_{row:05d}.shard-{shard[0]:05d}-of-{shard[1]:05d}.safetensors"


def _dot(a: Tensor, b: Tensor) -> float:
    return float(torch.dot(a.reshape(-1).to(torch.float64), b.reshape(-1).to(torch.float64).to(a.device)))


class SnapshotGram:
    """Grow the Gram matrix one snapshot at a time.

    Args:
        directory: where snapshot files go (created on first :meth:`append` when missing).
        shard: ``(rank, count)`` when parameters are sharded over ``count`` processes and this
            one records part ``rank`` (see the module docstring); ``None``: whole parameters.
        cache_bytes: RAM for float64 copies of the snapshots, used while all of them fit
            (``0``: always read the files).
        lazy_files: write the files of snapshots held in memory only when needed (see the
            module docstring; :meth:`flush`), not at :meth:`append`.

    Attributes:
        gram: ``float64 Tensor[E, E]`` (CPU).
        names: parameter names of every snapshot (fixed by the first one).
        shapes: their (full) shapes.
        shard: ``(rank, count)`` or ``None``.
        created_directory: whether this recording created ``directory`` (only then does
            :meth:`cleanup` remove the folder itself).
    """

    def __init__(self, directory: str | os.PathLike, shard: Optional[Shard] = None,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, lazy_files: bool = False) -> None:
        self.directory = Path(directory)
        self.cache_bytes = int(cache_bytes)
        self.lazy_files = bool(lazy_files)
        self._matrix: Optional[Tensor] = None  # float64 [capacity, P]: in-memory copies of snapshots 0.._held-1
        self._held = 0
        self._unwritten: list[int] = []  # rows held in memory whose files are not written yet
        self._layout: list[tuple[tuple[int, ...], torch.dtype]] = []  # this process's shape and dtype of each tensor
        self._next: Optional[tuple[int, Tensor]] = None  # (row, flat copy) of the snapshot partial_row just saw
        self.shard = None if shard is None else (int(shard[0]), int(shard[1]))
        self.gram = torch.zeros(0, 0, dtype=torch.float64)
        self.names: list[str] = []
        self.shapes: list[list[int]] = []
        self.created_directory = False

    @property
    def rows(self) -> int:
        """Number of snapshots recorded."""
        return self.gram.shape[0]

    def path(self, row: int) -> Path:
        """This process's file of snapshot ``row``."""
        return self.directory / snapshot_file_name(row, self.shard)

    def check(self, params: Mapping[str, Tensor], shapes: Optional[Mapping[str, Sequence[int]]] = None) -> None:
        """Check that ``params`` has the names and shapes of the first snapshot (the first call
        fixes them).

        Args:
            params: name → tensor (this process's parts when sharded).
            shapes: name → full shape when ``params`` are parts (default: their own shapes).

        Raises:
            ValueError: no parameter, or names / shapes differ from the first snapshot's.
        """
        names = list(params)
        shapes = [list(shapes[n]) if shapes is not None else list(t.shape) for n, t in params.items()]
        if not self.names:
            if not names:
                raise ValueError("a snapshot needs at least one parameter")
            self.names, self.shapes = names, shapes
        elif names != self.names or shapes != self.shapes:
            raise ValueError(
                "snapshot parameters differ from the first snapshot's: "
                f"expected {list(zip(self.names, self.shapes))[:5]}..., got {list(zip(names, shapes))[:5]}..."
            )

    def append(self, params: Mapping[str, Tensor], reduce: Optional[Callable[[Tensor], Tensor]] = None,
               shapes: Optional[Mapping[str, Sequence[int]]] = None) -> Tensor:
        """Record a snapshot: extend the Gram matrix and write the snapshot file.

        Args:
            params: name → tensor (any device; read, never modified); this process's parts
                when sharded.
            reduce: sums a ``float64 Tensor[E+1]`` over the processes (sharded: every process
                calls, with its own parts).
            shapes: name → full shape when ``params`` are parts.

        Returns:
            The new row ``G[E, :E+1]`` (float64).

        Raises:
            FileNotFoundError: a previous snapshot file is missing (e.g. a resumed run on a
                machine without the run's snapshot directory).
        """
        row = self.partial_row(params, shapes)
        if reduce is not None:
            row = reduce(row)
        self.extend(row, params, shapes)
        return row

    def partial_row(self, params: Mapping[str, Tensor], shapes: Optional[Mapping[str, Sequence[int]]] = None) -> Tensor:
        """This process's part of the next Gram row: ``float64 Tensor[E+1]`` of dot products of
        ``params`` with each earlier snapshot (read from this process's files, one parameter
        tensor at a time) and with themselves. Unsharded, it is the row itself.

        Raises:
            ValueError: names or shapes differ from the first snapshot's.
            FileNotFoundError: an earlier snapshot file of this process is missing.
        """
        self.check(params, shapes)
        e = self.rows
        row = torch.zeros(e + 1, dtype=torch.float64)
        numbers = sum(t.numel() for t in params.values())
        flat = None
        if numbers * 8 * (e + 1) <= self.cache_bytes:  # every snapshot so far and this one fit in RAM
            flat = torch.cat([t.detach().reshape(-1).to("cpu", torch.float64) for t in params.values()])
        else:
            self.flush()  # the copies are dropped: their files must exist first
            self._held, self._matrix = 0, None
        self._next = None if flat is None else (e, flat)
        for j in range(self._held if flat is not None else 0, e):  # the rows not in memory: from the files
            p = self.path(j)
            if not p.is_file():
                raise FileNotFoundError(
                    f"Z0 snapshot {p} is missing: the Gram matrix needs every earlier snapshot. "
                    "Resume with the same snapshot_dir; it must survive between runs, and a run that finished "
                    "deletes its snapshots unless recorded with Z0Influence(keep_snapshots=True)."
                )
            with safe_open(str(p), framework="pt") as f:
                if flat is not None:  # kept in memory from now on
                    self._keep(j, torch.cat([f.get_tensor(n).reshape(-1).to(torch.float64) for n in params]))
                else:
                    row[j] = sum(_dot(t, f.get_tensor(n)) for n, t in params.items())
        if flat is not None:
            if e:  # one matrix-vector product with every earlier snapshot (the same whether they came from files or not)
                row[:e] = torch.mv(self._matrix[:e], flat)
            row[e] = float(torch.dot(flat, flat))
        else:
            row[e] = sum(_dot(t, t) for t in params.values())
        return row

    def extend(self, row: Tensor, params: Mapping[str, Tensor], shapes: Optional[Mapping[str, Sequence[int]]] = None) -> None:
        """Add the snapshot whose Gram row (summed over processes) is ``row`` (``Tensor[E+1]``):
        write this process's snapshot file and grow the Gram matrix.

        Raises:
            ValueError: ``row`` has the wrong length, or names / shapes differ from the first snapshot's.
        """
        self.check(params, shapes)
        e = self.rows
        row = row.detach().to("cpu", torch.float64).reshape(-1)
        if row.numel() != e + 1:
            raise ValueError(f"Z0: a Gram row of {row.numel()} entries does not extend a {e} x {e} Gram matrix")
        if self._next is not None and self._next[0] == e:
            self._keep(e, self._next[1])
        self._next = None
        if self.lazy_files and self._held > e:  # held in memory: the file waits until it is needed (flush)
            self._layout = [(tuple(t.shape), t.dtype) for t in params.values()]
            self._unwritten.append(e)
        else:
            self._write(e, params)
        g = torch.zeros(e + 1, e + 1, dtype=torch.float64)
        g[:e, :e] = self.gram
        g[e, :] = row
        g[:, e] = row
        self.gram = g

    def _keep(self, row: int, flat: Tensor) -> None:
        """Keep the in-memory copy of snapshot ``row`` (rows arrive in order, from the files and then
        as they are recorded); the matrix grows by doubling, never past ``cache_bytes``."""
        if row != self._held:
            return
        if self._matrix is None or row >= self._matrix.shape[0]:
            fit = max(self.cache_bytes // (8 * max(flat.numel(), 1)), row + 1)
            grown = torch.zeros(min(max(2 * row, 8), fit), flat.numel(), dtype=torch.float64)
            if self._matrix is not None:
                grown[:row] = self._matrix[:row]
            self._matrix = grown
        self._matrix[row] = flat
        self._held = row + 1

    def flush(self) -> None:
        """Write the files of the snapshots held only in memory (in their own dtypes and shapes:
        the float64 copies hold their values exactly)."""
        for row in self._unwritten:
            flat, parts, offset = self._matrix[row], {}, 0
            for name, (shape, dtype) in zip(self.names, self._layout):
                n = 1
                for d in shape:
                    n *= d
                parts[name] = flat[offset : offset + n].reshape(shape).to(dtype)
                offset += n
            self._write(row, parts)
        self._unwritten = []

    def missing(self) -> list[Path]:
        """This process's snapshot files of the recorded rows that are not on disk (nor held in
        memory to be written)."""
        return [self.path(j) for j in range(self.rows) if j not in self._unwritten and not self.path(j).is_file()]

    def foreign_snapshots(self) -> list[Path]:
        """Snapshot files in ``directory`` beyond the recorded rows (another recording's)."""
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.iterdir() if (m := _SNAPSHOT.match(p.name)) and int(m[1]) >= self.rows)

    def refuse_foreign(self, owner: str) -> None:
        """Raise ``FileExistsError`` when :meth:`foreign_snapshots` finds any (never overwritten)."""
        foreign = self.foreign_snapshots()
        if foreign:
            raise FileExistsError(
                f"{owner}: the snapshot folder {self.directory} already holds {len(foreign)} snapshot files of another "
                f"recording (e.g. {foreign[0].name}); this library never overwrites them. Resume that run from its "
                "checkpoint, or pass another snapshot_dir (or delete them)."
            )

    def ensure_directory(self) -> None:
        """Create ``directory`` when missing (then :meth:`remove_folder` may remove it). Under
        sharding one process creates it before any writes, so that one process knows it did."""
        if not self.directory.is_dir():
            self.directory.mkdir(parents=True, exist_ok=True)
            self.created_directory = True

    def _write(self, row: int, params: Mapping[str, Tensor]) -> None:
        self.ensure_directory()
        final = self.path(row)
        tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
        meta = None
        if self.shard is not None:  # what load_snapshot needs to put the parts back together
            meta = {"shard": json.dumps(list(self.shard)), "shapes": json.dumps(dict(zip(self.names, self.shapes)))}
        save_file({n: t.detach().to("cpu").contiguous() for n, t in params.items()}, str(tmp), metadata=meta)
        apply_umask(tmp)
        os.replace(tmp, final)
        fault_point("z0.snapshot_written")

    def set_gram(self, gram: Tensor) -> None:
        """Replace the Gram matrix (non-writing ranks receive it by broadcast)."""
        self.gram = gram.to(torch.float64).cpu()

    def _own(self, m: Optional[re.Match]) -> bool:
        """Whether a file name match is of this process's naming (its shard, or unsharded)."""
        if m is None:
            return False
        shard = None if m[2] is None else (int(m[2]), int(m[3]))
        return shard == self.shard

    def cleanup(self, remove_folder: bool = True) -> None:
        """Delete this process's snapshot files of this recording (rows ``0..E``: the recorded
        ones and the file of an interrupted next append, with temporaries of their naming); then,
        with ``remove_folder``, the folder (see :meth:`remove_folder`). Nothing else is deleted.
        Sharded: every process deletes its files, then the one that created the folder removes it."""
        self._held, self._next, self._matrix, self._unwritten = 0, None, None, []
        if not self.directory.is_dir():
            return
        for p in self.directory.iterdir():
            m = _SNAPSHOT.match(p.name) or _SNAPSHOT_TMP.match(p.name)
            if self._own(m) and int(m[1]) <= self.rows:  # the recorded rows, and the next one of an interrupted append
                p.unlink(missing_ok=True)
        if remove_folder:
            self.remove_folder()

    def remove_folder(self) -> None:
        """Remove ``directory`` when this recording created it and it is empty."""
        if self.created_directory and self.directory.is_dir():
            try:
                self.directory.rmdir()  # only when empty
            except OSError:
                pass

    def state_dict(self) -> dict[str, Any]:
        """The Gram matrix, names, shapes, folder and the number of shards (not this process's
        rank: every process of a sharded recording may load process 0's state). The snapshot
        files a resumed run needs are written first (:meth:`flush`)."""
        self.flush()
        return {"gram": self.gram.clone(), "names": list(self.names), "shapes": [list(s) for s in self.shapes],
                "directory": str(self.directory), "created_directory": self.created_directory,
                "shards": None if self.shard is None else self.shard[1]}

    def load_state_dict(self, state: Mapping[str, Any], directory: Optional[str | os.PathLike] = None) -> None:
        """Continue from :meth:`state_dict`, in the snapshot folder the state records unless
        ``directory`` is given (the snapshots were moved).

        Raises:
            ValueError: the state was recorded with another number of shards (processes).
        """
        shards = state.get("shards")
        if shards != (None if self.shard is None else self.shard[1]):
            raise ValueError(
                f"Z0: the recording was made {'unsharded' if shards is None else f'in {shards} shards (processes)'}; "
                f"this run is {'unsharded' if self.shard is None else f'in {self.shard[1]}'}: each process reads its own "
                "snapshot files, so resume it with the same strategy and number of processes"
            )
        self.gram = state["gram"].to(torch.float64).cpu()
        self._held, self._next, self._matrix, self._unwritten = 0, None, None, []
        self.names = list(state["names"])
        self.shapes = [list(s) for s in state["shapes"]]
        self.directory = Path(directory if directory is not None else state.get("directory", self.directory))
        self.created_directory = bool(state.get("created_directory", False)) and directory is None


def load_snapshot(directory: str | os.PathLike, row: int, names: Optional[list[str]] = None) -> dict[str, Tensor]:
    """Read snapshot ``row`` from ``directory`` as name → tensor (whole parameters: a sharded
    recording's parts are put back together in rank order).

    Raises:
        FileNotFoundError: the snapshot, or one of its shards, is not there.
    """
    directory = Path(directory)
    whole = directory / snapshot_file_name(row)
    if whole.is_file():
        with safe_open(str(whole), framework="pt") as f:
            return {n: f.get_tensor(n) for n in (names or list(f.keys()))}
    shards = sorted((int(m[2]), int(m[3]), p) for p in directory.glob(f"snapshot_{row:05d}.shard-*.safetensors")
                    if (m := _SNAPSHOT.match(p.name)) and m[2] is not None)
    if not shards:
        raise FileNotFoundError(f"Z0 snapshot {row} is not in {directory} (neither {whole.name} nor its shards)")
    count = shards[0][1]
    if [r for r, _, _ in shards] != list(range(count)) or any(c != count for _, c, _ in shards):
        raise FileNotFoundError(f"Z0 snapshot {row} in {directory}: expected shards 0..{count - 1} of {count}, found "
                                f"{[p.name for _, _, p in shards]}")
    parts: dict[str, list[Tensor]] = {}
    shapes: dict[str, list[int]] = {}
    for _, _, p in shards:
        with safe_open(str(p), framework="pt") as f:
            shapes = json.loads((f.metadata() or {}).get("shapes", "{}"))
            for n in names or list(f.keys()):
                parts.setdefault(n, []).append(f.get_tensor(n).reshape(-1))
    return {n: torch.cat(ps).reshape(shapes[n]) for n, ps in parts.items()}


def flatten_snapshot(params: Mapping[str, Tensor]) -> Tensor:
    """Concatenate a snapshot into one ``float64 Tensor[P]`` (for tests and small models)."""
    return torch.cat([t.reshape(-1).to(torch.float64).cpu() for t in params.values()])
