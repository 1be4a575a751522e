"""Artifacts on disk: a directory holding ``tensors.safetensors`` and ``manifest.json``.

The manifest records the format version, library version, artifact kind, creation time, the
SHA-256 and byte size of the tensor file, and whatever the method adds (layers, counts,
options). Writes are atomic: everything goes to a temporary sibling directory which is renamed
into place, so a crash never leaves a directory that loads. Reads verify the checksum, so a
truncated or corrupted file raises :class:`ArtifactError` instead of giving a wrong answer.
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

__all__ = [
    "ArtifactError",
    "ArtifactInfo",
    "FORMAT_VERSION",
    "write_artifact",
    "read_artifact",
    "read_manifest",
    "list_artifacts",
    "write_csv",
    "csv_text",
    "library_version",
]

FORMAT_VERSION = 1
TENSOR_FILE = "tensors.safetensors"
MANIFEST_FILE = "manifest.json"


class ArtifactError(RuntimeError):
    """An artifact is missing, incomplete, corrupt, of the wrong kind, or does not match."""


def library_version() -> str:
    from . import __version__

    return __version__


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def write_artifact(
    directory: str | os.PathLike,
    kind: str,
    tensors: Mapping[str, Tensor],
    manifest: Mapping[str, Any],
    extra_files: Optional[Mapping[str, str]] = None,
) -> Path:
    """Atomically write an artifact directory.

    Args:
        directory: final location. An existing artifact of the same ``kind`` there is replaced;
            anything else (a folder this library did not write, another kind of artifact) is
            never touched: :class:`ArtifactError` is raised instead.
        kind: artifact kind, e.g. ``"ekfac"``, ``"z0"``, ``"scores"`` (checked on read).
        tensors: name → tensor (made contiguous and moved to CPU).
        manifest: JSON-serialisable metadata merged into the manifest.
        extra_files: file name → text content written beside (e.g. CSV tables).

    Returns:
        The final directory path.
    """
    final = Path(directory)
    if final.exists():
        existing = read_manifest(final) if final.is_dir() else None
        if existing is None or existing.get("kind") != kind:
            what = "a file" if not final.is_dir() else (
                "a folder that is not a lightning-influence artifact" if existing is None
                else f"a {existing.get('kind')!r} artifact"
            )
            raise ArtifactError(
                f"refusing to write a {kind!r} artifact at {final}: it holds {what}, which this library never "
                "replaces; choose another output folder or name"
            )
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        tensor_path = tmp / TENSOR_FILE
        save_file(cpu, str(tensor_path))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        full = {
            "format_version": FORMAT_VERSION,
            "library_version": library_version(),
            "kind": kind,
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "tensor_file": TENSOR_FILE,
            "tensor_sha256": _sha256(tensor_path),
            "tensor_bytes": tensor_path.stat().st_size,
            **dict(manifest),
        }
        with open(tmp / MANIFEST_FILE, "w") as f:
            json.dump(full, f, indent=2, sort_keys=False, default=_json_default)
            f.flush()
            os.fsync(f.fileno())
        with open(tensor_path, "rb") as f:
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        old = None
        if final.exists():
            old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def read_artifact(directory: str | os.PathLike, kind: Optional[str] = None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read and verify an artifact written by :func:`write_artifact`.

    Raises:
        ArtifactError: the directory or a file is missing, the manifest is unreadable, the
            format version is newer than this library reads, the kind differs from ``kind``,
            or the tensor file's size or checksum differs from the manifest's.
    """
    d = Path(directory)
    if not d.is_dir():
        raise ArtifactError(f"no artifact directory at {d}")
    mpath = d / MANIFEST_FILE
    if not mpath.is_file():
        raise ArtifactError(f"{d} has no {MANIFEST_FILE}: not an artifact, or its write did not finish")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{mpath} is not valid JSON ({e}); the artifact is corrupt") from e
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{mpath} is not a JSON object; the artifact is corrupt")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ArtifactError(f"{mpath}: format_version {version!r} is not readable by this library (reads <= {FORMAT_VERSION})")
    if kind is not None and manifest.get("kind") != kind:
        raise ArtifactError(f"{d} holds a {manifest.get('kind')!r} artifact, expected {kind!r}")
    tpath = d / manifest.get("tensor_file", TENSOR_FILE)
    if not tpath.is_file():
        raise ArtifactError(f"{d} is missing {tpath.name}")
    size = tpath.stat().st_size
    if size != manifest.get("tensor_bytes"):
        raise ArtifactError(
            f"{tpath} has {size} bytes but the manifest says {manifest.get('tensor_bytes')}: truncated or replaced"
        )
    if _sha256(tpath) != manifest.get("tensor_sha256"):
        raise ArtifactError(f"{tpath} fails its SHA-256 check: the file is corrupt")
    try:
        tensors = load_file(str(tpath))
    except Exception as e:  # pragma: no cover - checksum catches nearly everything first
        raise ArtifactError(f"cannot read {tpath}: {e}") from e
    return tensors, manifest


def read_manifest(directory: str | os.PathLike) -> Optional[dict[str, Any]]:
    """The manifest of the artifact at ``directory`` as a dict, or ``None`` when there is none
    (or it is not a JSON object). Does not verify the tensors (see :func:`read_artifact`)."""
    try:
        manifest = json.loads((Path(directory) / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


@dataclass
class ArtifactInfo:
    """An artifact found under a folder: its path, its manifest's ``kind`` (``None`` when the
    manifest is missing or unreadable) and its manifest."""

    path: Path
    kind: Optional[str]
    manifest: Optional[dict[str, Any]]


def list_artifacts(root: str | os.PathLike) -> list[ArtifactInfo]:
    """Every artifact below ``root`` (``root`` itself included), in path order.

    A folder with a ``manifest.json`` is an artifact (its sub-folders are not searched); a
    folder holding a tensor file but no readable manifest is reported with ``kind=None`` (an
    interrupted write or a damaged artifact); any other folder is searched. Folders whose name
    starts with a dot (temporaries, snapshots) are skipped.
    """
    out: list[ArtifactInfo] = []

    def walk(d: Path) -> None:
        if (d / MANIFEST_FILE).is_file() or (d / TENSOR_FILE).is_file():
            m = read_manifest(d)
            out.append(ArtifactInfo(d, None if m is None else m.get("kind"), m))
            return
        for sub in sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")):
            walk(sub)

    r = Path(root)
    if r.is_dir():
        walk(r)
    return out


def write_csv(path: str | os.PathLike, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Write a small CSV table atomically (temporary file then rename)."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    os.replace(tmp, p)


def csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Render a CSV table as text (for :func:`write_artifact`'s ``extra_files``)."""
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.dtype):
        return str(o).replace("torch.", "")
    if isinstance(o, Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
