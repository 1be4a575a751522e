"""A run's output folder: writable before training, resumable, and never clobbering another
method's results (no Lightning import; the callbacks call these on rank zero)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Iterable, Optional

from .errors import InfluenceError
from .storage import ArtifactError, read_artifact, read_manifest

__all__ = ["OutputFolderError", "writable_folder", "remove_empty_folders", "written_by_run", "check_replaceable"]


class OutputFolderError(InfluenceError, OSError):
    """An output folder cannot be written, or two callbacks would write into the same one."""


def writable_folder(path: Path, owner: str) -> list[Path]:
    """Create ``path`` (and parents) when missing and check that a file can be written in it.

    Returns:
        The folders it created, deepest first.

    Raises:
        OutputFolderError: the path is a file, or the folder cannot be created or written.
    """
    created = [p for p in [path, *path.parents] if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-check-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OutputFolderError(
            f"{owner} cannot write its output folder {path} ({e.strerror or e}); pass a writable dirpath"
        ) from e
    return created


def remove_empty_folders(path: Path, made: Iterable[Path]) -> None:
    """Remove ``path`` and then its parents while they are empty and among ``made`` (the folders
    a set-up check created)."""
    made = set(made)
    for d in [path, *path.parents]:
        try:
            if d not in made:
                break
            d.rmdir()
        except OSError:
            break


def written_by_run(path: Path, run_id: Optional[str], step: int, step_key: str = "step") -> bool:
    """Whether ``path`` holds a complete artifact that run ``run_id`` wrote at global step ``step``
    (its manifest's ``meta[step_key]``, else ``step_key``)."""
    m = read_manifest(path)
    if m is None:
        return False
    meta = m.get("meta") if isinstance(m.get("meta"), dict) else {}
    if meta.get("run_id") != run_id or meta.get(step_key, m.get(step_key)) != step:
        return False
    try:
        read_artifact(path)
    except ArtifactError:
        return False
    return True


def check_replaceable(path: Path, method: str, owner: str) -> None:
    """Refuse to write ``method`` scores over another method's scores at ``path``.

    Raises:
        ArtifactError: ``path`` holds scores of another method.
    """
    old = read_manifest(path)
    if old is not None and old.get("kind") == "scores" and old.get("method") != method:
        raise ArtifactError(
            f"{owner} refuses to replace {path}: it holds {old.get('method')!r} scores, not {method!r} ones; give "
            "the callback another name or dirpath"
        )
