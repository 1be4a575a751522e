"""Artifacts on disk: a directory holding ``tensors.safetensors`` and ``manifest.json``.

The manifest records the format version, library version, artifact kind, creation time, the
SHA-256 and byte size of the tensor file and of every extra file, whatever the method adds
(layers, counts, options) and, last, ``manifest_sha256``: the SHA-256 of the manifest itself
(its canonical JSON without that key). Reads verify every checksum, so a truncated or corrupted
file and an edited manifest raise :class:`ArtifactError` instead of giving a wrong answer.

Writes are atomic and never destroy what they did not write:

* everything goes to a temporary folder ``<parent>/.lightning-influence-tmp/<name>.tmp-XXXXXXXX``
  first (beside the artifact, so on the same file system; in a folder of its own, so that
  finding stale temporaries never scans a folder that holds many artifacts);
* a folder that is not an artifact of the same kind is never replaced (:class:`ArtifactError`);
* an existing artifact is replaced by an atomic exchange of the two folders (Linux
  ``renameat2(RENAME_EXCHANGE)``), so a reader always finds a complete artifact at the path;
  where the file system has no exchange, the old artifact is renamed aside to
  ``.lightning-influence-tmp/<name>.old-XXXXXXXX`` and the new one renamed into place, and
  readers that find no folder at the path read the aside copy meanwhile (also after a crash
  between the two renames);
* temporaries of the library's own naming left by a killed write are removed by the next
  write of the same artifact (and the temporary folder once it is empty);
* files are created with the permissions the process's umask allows (safetensors alone would
  write ``0600``).

The file-system operations (exchange, renames, temporaries, umask, fsync, reading one open
folder) are :mod:`lightning_influence.atomicfs`; this module is the artifact format.
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from .atomicfs import TEMP_DIR, OpenFolder, apply_umask, aside_name, fsync_dir, fsync_file, remove_stale, replacing, swap_into_place, temp_path, temporaries
from .errors import InfluenceError
from .faults import fault_point

__all__ = [
    "ArtifactError",
    "ArtifactInfo",
    "FORMAT_VERSION",
    "write_artifact",
    "read_artifact",
    "read_manifest",
    "list_artifacts",
    "manifest_digest",
    "manifest_field",
    "check_tensor",
    "write_csv",
    "csv_text",
    "library_version",
]

FORMAT_VERSION = 2
"""Version 2 adds ``manifest_sha256`` and ``file_sha256`` (required); version 1 is not read."""
TENSOR_FILE = "tensors.safetensors"
MANIFEST_FILE = "manifest.json"
_REQUIRED = {"format_version": int, "kind": str, "tensor_file": str, "tensor_sha256": str, "tensor_bytes": int,
             "file_sha256": dict, "manifest_sha256": str}


class ArtifactError(InfluenceError, RuntimeError):
    """An artifact is missing, incomplete, corrupt, of the wrong kind, or does not match."""


def library_version() -> str:
    from . import __version__

    return __version__


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return _sha256_file(f)


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """SHA-256 of a manifest's canonical JSON (sorted keys, no spaces) without its
    ``manifest_sha256`` entry: what that entry must equal."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), default=_json_default)
    return hashlib.sha256(text.encode()).hexdigest()


def _aside_copy(final: Path) -> Optional[Path]:
    """The ``.<name>.old-*`` copy a replacement renamed aside, when ``final`` itself is missing
    (during the two-rename replacement, or after a crash between the renames)."""
    if final.exists():
        return None
    olds = [p for p in temporaries(final, ("old",)) if (p / MANIFEST_FILE).is_file()]
    return max(olds, key=lambda p: p.stat().st_mtime_ns) if olds else None


def _resolve(directory: Path) -> Path:
    return _aside_copy(directory) or directory


def write_artifact(
    directory: str | os.PathLike,
    kind: str,
    tensors: Mapping[str, Tensor],
    manifest: Mapping[str, Any],
    extra_files: Optional[Mapping[str, str]] = None,
) -> Path:
    """Atomically write an artifact directory.

    Args:
        directory: final location. An existing artifact of the same ``kind`` there is replaced
            (a reader finds the old or the new one, complete, at every instant); anything else
            (a file, a folder this library did not write, another kind of artifact) is never
            touched: :class:`ArtifactError` is raised instead.
        kind: artifact kind, e.g. ``"ekfac"``, ``"z0"``, ``"scores"`` (checked on read).
        tensors: name → tensor (made contiguous and moved to CPU).
        manifest: JSON-serialisable metadata merged into the manifest.
        extra_files: file name → text content written beside (e.g. CSV tables).

    Returns:
        The final directory path.

    Raises:
        ArtifactError: ``directory`` holds something this library does not replace.
        OSError: the write failed (e.g. a full disk); the old artifact, if any, is untouched.
    """
    final = Path(directory)
    existing_path = _resolve(final)
    if existing_path.exists():
        existing = read_manifest(existing_path) if existing_path.is_dir() else None
        if existing is None or existing.get("kind") != kind:
            what = "a file" if not existing_path.is_dir() else (
                "a folder that is not a lightning-influence artifact" if existing is None
                else f"a {existing.get('kind')!r} artifact"
            )
            raise ArtifactError(
                f"refusing to write a {kind!r} artifact at {final}: it holds {what}, which this library never "
                "replaces; choose another output folder or name"
            )
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(final, "tmp")
    tmp.mkdir(parents=True)
    try:
        cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        tensor_path = tmp / TENSOR_FILE
        fault_point("storage.tensors", kind)
        save_file(cpu, str(tensor_path))
        apply_umask(tensor_path)
        files = {}
        for name, text in (extra_files or {}).items():
            if name in (TENSOR_FILE, MANIFEST_FILE) or Path(name).name != name:
                raise ValueError(f"extra file name {name!r} must be a plain file name other than the artifact's own")
            (tmp / name).write_text(text)
            files[name] = _sha256(tmp / name)
        full = {
            "format_version": FORMAT_VERSION,
            "library_version": library_version(),
            "kind": kind,
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "tensor_file": TENSOR_FILE,
            "tensor_sha256": _sha256(tensor_path),
            "tensor_bytes": tensor_path.stat().st_size,
            "file_sha256": files,
            **dict(manifest),
        }
        full = json.loads(json.dumps(full, default=_json_default))  # the form a reader will see
        full["manifest_sha256"] = manifest_digest(full)
        fault_point("storage.before_manifest", kind)
        with open(tmp / MANIFEST_FILE, "w") as f:
            json.dump(full, f, indent=2, sort_keys=False)
            f.flush()
            os.fsync(f.fileno())
        fsync_file(tensor_path)
        fsync_dir(tmp)
        fault_point("storage.before_swap", kind)
        swap_into_place(tmp, final, kind)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # after an exchange it holds the old artifact
        raise
    remove_stale(final)
    return final


def _load_manifest(folder: OpenFolder) -> dict[str, Any]:
    d = folder.path
    mpath = d / MANIFEST_FILE
    try:
        with folder.open(MANIFEST_FILE) as f:
            text = f.read()
    except (FileNotFoundError, IsADirectoryError):
        raise ArtifactError(f"{d} has no {MANIFEST_FILE}: not an artifact, or its write did not finish") from None
    try:
        manifest = json.loads(text)
    except ValueError as e:
        raise ArtifactError(f"{mpath} is not valid JSON ({e}); the artifact is corrupt") from e
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{mpath} is not a JSON object ({type(manifest).__name__}); the artifact is corrupt")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version != FORMAT_VERSION:
        raise ArtifactError(
            f"{mpath}: format_version {version!r} is not readable by this library (reads {FORMAT_VERSION}; version 1 "
            "artifacts carry no manifest checksum: write them again with this version)"
        )
    for key, typ in _REQUIRED.items():
        value = manifest.get(key)
        if not isinstance(value, typ) or isinstance(value, bool):
            raise ArtifactError(f"{mpath}: {key!r} is missing or not a {typ.__name__} (got {value!r}); the artifact is corrupt")
    if manifest_digest(manifest) != manifest["manifest_sha256"]:
        raise ArtifactError(f"{mpath} fails its manifest_sha256 check: the manifest was edited or is corrupt")
    return manifest


def _member(d: Path, name: Any, what: str) -> Path:
    """``d / name`` for a plain file name inside ``d``; anything pointing elsewhere is refused."""
    if not isinstance(name, str) or not name or name in (".", "..") or Path(name).name != name or "\\" in name:
        raise ArtifactError(f"{d / MANIFEST_FILE}: {what} {name!r} is not a file name inside the artifact folder")
    return d / name


def read_artifact(directory: str | os.PathLike, kind: Optional[str] = None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read and verify an artifact written by :func:`write_artifact`.

    While a replacement is between its two renames (file systems without an atomic exchange),
    or after a crash there, the folder renamed aside is read.

    Args:
        directory: the artifact folder.
        kind: the expected manifest ``kind`` (``None``: any).

    Returns:
        ``(tensors, manifest)``: name → CPU tensor, and the manifest as a dict.

    Raises:
        ArtifactError: the directory or a file is missing, the manifest is unreadable, not an
            object, lacks a required key, was edited (``manifest_sha256``), or has another
            format version; the kind differs from ``kind``; a file name points outside the
            folder; or a file's size or checksum differs from the manifest's.
    """
    attempts = 5
    for attempt in range(attempts):
        d = _resolve(Path(directory))
        try:
            with OpenFolder(d) as folder:
                try:
                    return _read_verified(folder, directory, kind)
                except (ArtifactError, OSError):
                    # a replacement moved the folder while we read it: read the one now in place
                    if attempt == attempts - 1 or folder.is_at(_resolve(Path(directory))):
                        raise
        except FileNotFoundError:
            if attempt == attempts - 1 or not _resolve(Path(directory)).exists():
                raise ArtifactError(f"no artifact directory at {directory}") from None
        except NotADirectoryError:
            raise ArtifactError(f"no artifact directory at {directory} (it is a file)") from None
    raise AssertionError("unreachable")  # pragma: no cover


def _read_verified(folder: OpenFolder, directory: str | os.PathLike, kind: Optional[str]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    d = folder.path
    manifest = _load_manifest(folder)
    if kind is not None and manifest.get("kind") != kind:
        raise ArtifactError(f"{directory} holds a {manifest.get('kind')!r} artifact, expected {kind!r}")
    tpath = _member(d, manifest["tensor_file"], "tensor_file")
    for name, digest in manifest["file_sha256"].items():
        p = _member(d, name, "file")
        try:
            with folder.open(name) as f:
                ok = _sha256_file(f) == digest
        except FileNotFoundError:
            ok = False
        if not ok:
            raise ArtifactError(f"{p} is missing or fails its SHA-256 check: the artifact is corrupt")
    try:
        f = folder.open(tpath.name)
    except FileNotFoundError:
        raise ArtifactError(f"{directory} is missing {tpath.name}") from None
    with f:  # the checksum and the tensors come from this one open file
        size = os.fstat(f.fileno()).st_size
        if size != manifest["tensor_bytes"]:
            raise ArtifactError(f"{tpath} has {size} bytes but the manifest says {manifest['tensor_bytes']}: truncated or replaced")
        if _sha256_file(f) != manifest["tensor_sha256"]:
            raise ArtifactError(f"{tpath} fails its SHA-256 check: the file is corrupt")
        try:
            tensors = _load_open_file(f)
        except Exception as e:  # pragma: no cover - the checksum catches nearly everything first
            raise ArtifactError(f"cannot read {tpath}: {e}") from e
    return tensors, manifest


def _sha256_file(f: Any) -> str:
    h = hashlib.sha256()
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
    return h.hexdigest()


def _load_open_file(f: Any) -> dict[str, Tensor]:
    """The tensors of an open safetensors file (through its descriptor where ``/proc`` shows it,
    so the very file that was verified is read; else from its bytes)."""
    fd_path = f"/proc/self/fd/{f.fileno()}"
    if os.path.exists(fd_path):
        return load_file(fd_path)
    from safetensors.torch import load  # pragma: no cover - systems without /proc

    f.seek(0)  # pragma: no cover
    return load(f.read())  # pragma: no cover


_MISSING = object()


def manifest_field(directory: str | os.PathLike, manifest: Mapping[str, Any], key: str, types: type | tuple[type, ...],
                   default: Any = _MISSING) -> Any:
    """``manifest[key]`` when it has one of ``types`` (``bool`` is never an ``int``); else
    :class:`ArtifactError` naming the file and the key (``default`` when the key is absent and a
    default is given)."""
    if key not in manifest and default is not _MISSING:
        return default
    value = manifest.get(key, _MISSING)
    types = types if isinstance(types, tuple) else (types,)
    if value is _MISSING or not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        got = "missing" if value is _MISSING else f"{value!r}"
        names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
        raise ArtifactError(f"{Path(directory) / MANIFEST_FILE}: {key!r} must be {names}, got {got}")
    return value


def check_tensor(directory: str | os.PathLike, tensors: Mapping[str, Tensor], name: str, shape: Optional[Sequence[Optional[int]]] = None,
                 dtypes: Optional[Sequence[torch.dtype]] = None, finite: bool = False) -> Tensor:
    """``tensors[name]`` when present with the given ``shape`` (``None`` entries: any size),
    one of ``dtypes`` and, with ``finite``, only finite values; else :class:`ArtifactError`
    naming the file and what differs."""
    where = Path(directory) / TENSOR_FILE
    t = tensors.get(name)
    if t is None:
        raise ArtifactError(f"{where}: tensor {name!r} is missing")
    if shape is not None and (t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape))):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ArtifactError(f"{where}: tensor {name!r} has shape {list(t.shape)}, expected {want}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ArtifactError(f"{where}: tensor {name!r} has dtype {t.dtype}, expected one of {list(dtypes)}")
    if finite and t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise ArtifactError(f"{where}: tensor {name!r} holds non-finite values")
    return t


def read_manifest(directory: str | os.PathLike) -> Optional[dict[str, Any]]:
    """The manifest of the artifact at ``directory`` as a dict, or ``None`` when there is none
    (or it is not a JSON object). Does not verify anything (see :func:`read_artifact`)."""
    try:
        manifest = json.loads((_resolve(Path(directory)) / MANIFEST_FILE).read_text())
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
    starts with a dot (temporaries, snapshots) are skipped, except that an artifact renamed
    aside by a replacement that has not finished is listed under its own path.
    """
    out: list[ArtifactInfo] = []

    def walk(d: Path) -> None:
        if (d / MANIFEST_FILE).is_file() or (d / TENSOR_FILE).is_file():
            m = read_manifest(d)
            out.append(ArtifactInfo(d, None if m is None else m.get("kind"), m))
            return
        subs = {p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")}
        if (d / TEMP_DIR).is_dir():
            for p in (d / TEMP_DIR).iterdir():
                name = aside_name(p.name)
                if name is not None and name not in subs and (p / MANIFEST_FILE).is_file():
                    subs.add(name)  # read through the aside copy (see read_artifact)
        for name in sorted(subs):
            sub = d / name
            if sub.is_dir():
                walk(sub)
            else:
                m = read_manifest(sub)
                out.append(ArtifactInfo(sub, None if m is None else m.get("kind"), m))

    r = Path(root)
    if r.is_dir():
        walk(r)
    return out


def write_csv(path: str | os.PathLike, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Write a small CSV table atomically (temporary file then rename)."""
    with replacing(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Render a CSV table as text (for :func:`write_artifact`'s ``extra_files``)."""
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
