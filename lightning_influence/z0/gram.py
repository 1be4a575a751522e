"""Incremental Gram matrix of parameter snapshots, with the snapshots spilled to disk.

``G[i, j] = <θ_i, θ_j>`` needs every past snapshot when a new one arrives. Keeping them in RAM
costs ``P × E`` numbers; instead each snapshot is written to its own safetensors file
(``snapshot_00000.safetensors``, one tensor per parameter, in the parameter's own dtype, so
nothing is lost) and the new row of ``G`` is computed by streaming the old files **one
parameter tensor at a time** (``safetensors.safe_open``), in float64.

Memory bound: the snapshot being recorded (which is the live parameters: no copy beyond one
parameter tensor at a time on the CPU) plus one parameter tensor of one old snapshot, in float64.
Disk: ``P × E`` numbers in the parameters' dtype under ``directory`` while recording; the files
are deleted by :meth:`SnapshotGram.cleanup` unless they are to be kept.
Time per new snapshot: one read of every previous snapshot (``O(P × E)``).
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

__all__ = ["SnapshotGram", "snapshot_file_name", "load_snapshot", "flatten_snapshot"]


def snapshot_file_name(row: int) -> str:
    """File name of snapshot ``row``."""
    return f"snapshot_{row:05d}.safetensors"


def _dot(a: Tensor, b: Tensor) -> float:
    return float(torch.dot(a.reshape(-1).to(torch.float64), b.reshape(-1).to(torch.float64).to(a.device)))


class SnapshotGram:
    """Grow the Gram matrix one snapshot at a time.

    Args:
        directory: where snapshot files go (created on first :meth:`append`).

    Attributes:
        gram: ``float64 Tensor[E, E]`` (CPU).
        names: parameter names of every snapshot (fixed by the first one).
        shapes: their shapes.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.gram = torch.zeros(0, 0, dtype=torch.float64)
        self.names: list[str] = []
        self.shapes: list[list[int]] = []

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

    def _write(self, row: int, params: Mapping[str, Tensor]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.path(row)
        tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
        save_file({n: t.detach().to("cpu").contiguous() for n, t in params.items()}, str(tmp))
        os.replace(tmp, final)

    def set_gram(self, gram: Tensor) -> None:
        """Replace the Gram matrix (non-writing ranks receive it by broadcast)."""
        self.gram = gram.to(torch.float64).cpu()

    def cleanup(self) -> None:
        """Delete the snapshot directory."""
        shutil.rmtree(self.directory, ignore_errors=True)

    def state_dict(self) -> dict[str, Any]:
        return {"gram": self.gram.clone(), "names": list(self.names), "shapes": [list(s) for s in self.shapes],
                "directory": str(self.directory)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.gram = state["gram"].to(torch.float64).cpu()
        self.names = list(state["names"])
        self.shapes = [list(s) for s in state["shapes"]]


def load_snapshot(directory: str | os.PathLike, row: int, names: Optional[list[str]] = None) -> dict[str, Tensor]:
    """Read snapshot ``row`` from ``directory`` as name → tensor."""
    with safe_open(str(Path(directory) / snapshot_file_name(row)), framework="pt") as f:
        return {n: f.get_tensor(n) for n in (names or list(f.keys()))}


def flatten_snapshot(params: Mapping[str, Tensor]) -> Tensor:
    """Concatenate a snapshot into one ``float64 Tensor[P]`` (for tests and small models)."""
    return torch.cat([t.reshape(-1).to(torch.float64).cpu() for t in params.values()])
