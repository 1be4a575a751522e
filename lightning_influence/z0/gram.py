"""Incremental Gram matrix of parameter snapshots, with the snapshots spilled to disk.

``G[i, j] = <θ_i, θ_j>`` needs every past snapshot when a new one arrives. Keeping them in RAM
costs ``P × E`` numbers; instead each snapshot is written to its own safetensors file
(``snapshot_00000.safetensors``, one tensor per parameter, in the parameter's own dtype, so
nothing is lost) and the new row of ``G`` is computed by streaming the old files **one
parameter tensor at a time** (``safetensors.safe_open``), in float64.

Memory bound: the snapshot being recorded (which is the live parameters: no copy beyond one
parameter tensor at a time on the CPU) plus one parameter tensor of one old snapshot, in float64.
Disk: ``P × E`` numbers in the parameters' dtype under ``directory`` while recording; the files
are deleted by :meth:`SnapshotGram.cleanup` unless they are to be kept. Cleaning up deletes only
the snapshot files this recording wrote, and the folder only when the recording created it and
nothing else is left in it: a user's folder given as ``directory`` keeps its other files.
Time per new snapshot: one read of every previous snapshot (``O(P × E)``).
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from ..faults import fault_point
from ..storage import apply_umask

__all__ = ["SnapshotGram", "snapshot_file_name", "load_snapshot", "flatten_snapshot"]


_SNAPSHOT = re.compile(r"^snapshot_(\d{5,})\.safetensors$")
_SNAPSHOT_TMP = re.compile(r"^\.snapshot_(\d{5,})\.safetensors\.tmp-[0-9a-f]{8}$")


def snapshot_file_name(row: int) -> str:
    """File name of snapshot ``row``."""
    return f"snapshot_{row:05d}.safetensors"


def _dot(a: Tensor, b: Tensor) -> float:
    return float(torch.dot(a.reshape(-1).to(torch.float64), b.reshape(-1).to(torch.float64).to(a.device)))


class SnapshotGram:
    """Grow the Gram matrix one snapshot at a time.

    Args:
        directory: where snapshot files go (created on first :meth:`append` when missing).

    Attributes:
        gram: ``float64 Tensor[E, E]`` (CPU).
        names: parameter names of every snapshot (fixed by the first one).
        shapes: their shapes.
        created_directory: whether this recording created ``directory`` (only then does
            :meth:`cleanup` remove the folder itself).
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.gram = torch.zeros(0, 0, dtype=torch.float64)
        self.names: list[str] = []
        self.shapes: list[list[int]] = []
        self.created_directory = False

    @property
    def rows(self) -> int:
        """Number of snapshots recorded."""
        return self.gram.shape[0]

    def path(self, row: int) -> Path:
        return self.directory / snapshot_file_name(row)

    def check(self, params: Mapping[str, Tensor]) -> None:
        """Check that ``params`` has the names and shapes of the first snapshot (the first call
        fixes them).

        Raises:
            ValueError: no parameter, or names / shapes differ from the first snapshot's.
        """
        names = list(params)
        shapes = [list(t.shape) for t in params.values()]
        if not self.names:
            if not names:
                raise ValueError("a snapshot needs at least one parameter")
            self.names, self.shapes = names, shapes
        elif names != self.names or shapes != self.shapes:
            raise ValueError(
                "snapshot parameters differ from the first snapshot's: "
                f"expected {list(zip(self.names, self.shapes))[:5]}..., got {list(zip(names, shapes))[:5]}..."
            )

    def append(self, params: Mapping[str, Tensor]) -> Tensor:
        """Record a snapshot: extend the Gram matrix and write the snapshot file.

        Args:
            params: name → tensor (any device; read, never modified).

        Returns:
            The new row ``G[E, :E+1]`` (float64).

        Raises:
            FileNotFoundError: a previous snapshot file is missing (e.g. a resumed run on a
                machine without the run's snapshot directory).
        """
        self.check(params)
        e = self.rows
        row = torch.zeros(e + 1, dtype=torch.float64)
        for j in range(e):
            p = self.path(j)
            if not p.is_file():
                raise FileNotFoundError(
                    f"Z0 snapshot {p} is missing: the Gram matrix needs every earlier snapshot. "
                    "Resume with the same snapshot_dir; it must survive between runs, and a run that finished "
                    "deletes its snapshots unless recorded with Z0Influence(keep_snapshots=True)."
                )
            with safe_open(str(p), framework="pt") as f:
                row[j] = sum(_dot(t, f.get_tensor(n)) for n, t in params.items())
        row[e] = sum(_dot(t, t) for t in params.values())
        self._write(e, params)
        g = torch.zeros(e + 1, e + 1, dtype=torch.float64)
        g[:e, :e] = self.gram
        g[e, :] = row
        g[:, e] = row
        self.gram = g
        return row

    def missing(self) -> list[Path]:
        """Snapshot files of the recorded rows that are not on disk."""
        return [self.path(j) for j in range(self.rows) if not self.path(j).is_file()]

    def foreign_snapshots(self) -> list[Path]:
        """Snapshot files in ``directory`` beyond the recorded rows (another recording's)."""
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.iterdir() if (m := _SNAPSHOT.match(p.name)) and int(m[1]) >= self.rows)

    def _write(self, row: int, params: Mapping[str, Tensor]) -> None:
        if not self.directory.is_dir():
            self.directory.mkdir(parents=True)
            self.created_directory = True
        final = self.path(row)
        tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
        save_file({n: t.detach().to("cpu").contiguous() for n, t in params.items()}, str(tmp))
        apply_umask(tmp)
        os.replace(tmp, final)
        fault_point("z0.snapshot_written")

    def set_gram(self, gram: Tensor) -> None:
        """Replace the Gram matrix (non-writing ranks receive it by broadcast)."""
        self.gram = gram.to(torch.float64).cpu()

    def cleanup(self) -> None:
        """Delete this recording's snapshot files (rows ``0..E``: the recorded ones and the file of
        an interrupted next append, with temporaries of their naming); then the folder, when this
        recording created it and it is empty. Nothing else is deleted."""
        if not self.directory.is_dir():
            return
        for p in self.directory.iterdir():
            m = _SNAPSHOT.match(p.name) or _SNAPSHOT_TMP.match(p.name)
            if m and int(m[1]) <= self.rows:  # the recorded rows, and the next one of an interrupted append
                p.unlink(missing_ok=True)
        if self.created_directory:
            try:
                self.directory.rmdir()  # only when empty
            except OSError:
                pass

    def state_dict(self) -> dict[str, Any]:
        return {"gram": self.gram.clone(), "names": list(self.names), "shapes": [list(s) for s in self.shapes],
                "directory": str(self.directory), "created_directory": self.created_directory}

    def load_state_dict(self, state: Mapping[str, Any], directory: Optional[str | os.PathLike] = None) -> None:
        """Continue from :meth:`state_dict`, in the snapshot folder the state records unless
        ``directory`` is given (the snapshots were moved)."""
        self.gram = state["gram"].to(torch.float64).cpu()
        self.names = list(state["names"])
        self.shapes = [list(s) for s in state["shapes"]]
        self.directory = Path(directory if directory is not None else state.get("directory", self.directory))
        self.created_directory = bool(state.get("created_directory", False)) and directory is None


def load_snapshot(directory: str | os.PathLike, row: int, names: Optional[list[str]] = None) -> dict[str, Tensor]:
    """Read snapshot ``row`` from ``directory`` as name → tensor."""
    with safe_open(str(Path(directory) / snapshot_file_name(row)), framework="pt") as f:
        return {n: f.get_tensor(n) for n in (names or list(f.keys()))}


def flatten_snapshot(params: Mapping[str, Tensor]) -> Tensor:
    """Concatenate a snapshot into one ``float64 Tensor[P]`` (for tests and small models)."""
    return torch.cat([t.reshape(-1).to(torch.float64).cpu() for t in params.values()])
