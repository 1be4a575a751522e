"""Atomic file-system operations: the platform layer under :mod:`lightning_influence.storage`.

* folders are replaced by an atomic exchange (Linux ``renameat2(RENAME_EXCHANGE)`` through
  ctypes) or, where the file system has none, by two renames with the old folder set aside;
* temporaries live in ``<parent>/.lightning-influence-tmp/`` beside their final path (same file
  system; a folder of their own, so finding stale ones never scans a folder of many artifacts)
  and are named ``<name>.tmp-XXXXXXXX`` (being written) or ``<name>.old-XXXXXXXX`` (set aside);
* files get the mode the process's umask allows (read from ``/proc/self/status``);
* an :class:`OpenFolder` reads every file relative to one open folder descriptor.

Nothing here knows what an artifact is. The fault points (:mod:`lightning_influence.faults`)
``storage.between_renames`` and ``storage.after_swap`` are reached with the caller's ``label``.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from .faults import fault_point

__all__ = [
    "TEMP_DIR",
    "umask",
    "apply_umask",
    "fsync_dir",
    "fsync_file",
    "temp_path",
    "temporaries",
    "aside_name",
    "remove_stale",
    "exchange",
    "swap_into_place",
    "replacing",
    "OpenFolder",
]

TEMP_DIR = ".lightning-influence-tmp"
_TEMP = re.compile(r"^(?P<name>.+)\.(?P<what>tmp|old)-[0-9a-f]{8}$")


def umask() -> int:
    """The process's umask, read from ``/proc/self/status`` (else by setting it and back)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # pragma: no cover - systems without /proc: read it by setting it back
    os.umask(mask)  # pragma: no cover
    return mask  # pragma: no cover


def apply_umask(path: str | os.PathLike) -> None:
    """Give a file the mode ``0o666`` minus the process's umask (what ``open`` would have given;
    safetensors writes ``0600`` whatever the umask)."""
    os.chmod(path, 0o666 & ~umask())


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries to disk (a no-op where folders cannot be opened)."""
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


def fsync_file(path: Path) -> None:
    """Flush a file's content to disk."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def temp_path(final: Path, what: str) -> Path:
    """A fresh temporary path for ``final``: ``<parent>/.lightning-influence-tmp/<name>.<what>-XXXXXXXX``
    (``what``: ``"tmp"`` being written, ``"old"`` set aside)."""
    return final.parent / TEMP_DIR / f"{final.name}.{what}-{uuid.uuid4().hex[:8]}"


def temporaries(final: Path, what: tuple[str, ...] = ("tmp", "old")) -> list[Path]:
    """The temporaries of ``final`` of the given kinds (in the temporary folder beside it)."""
    prefix = f"{final.name}."
    try:
        with os.scandir(final.parent / TEMP_DIR) as entries:
            names = [e.name for e in entries if e.name.startswith(prefix)]
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [final.parent / TEMP_DIR / n for n in names
            if (m := _TEMP.match(n)) and m["name"] == final.name and m["what"] in what]


def aside_name(name: str) -> Optional[str]:
    """The final name whose folder ``name`` (an entry of the temporary folder) is set aside as,
    or ``None`` when ``name`` is no such copy."""
    m = _TEMP.match(name)
    return m["name"] if m and m["what"] == "old" else None


def remove_stale(final: Path) -> None:
    """Delete temporaries of ``final`` (left by killed writes), and the temporary folder when
    that leaves it empty."""
    for p in temporaries(final):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    try:
        (final.parent / TEMP_DIR).rmdir()
    except OSError:  # missing, or other writes' temporaries are in it
        pass


_renameat2: Any = None


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (``renameat2(RENAME_EXCHANGE)``); ``False`` where the
    platform or file system cannot, or ``LIGHTNING_INFLUENCE_NO_EXCHANGE`` is set (nothing is
    changed then)."""
    global _renameat2
    if os.environ.get("LIGHTNING_INFLUENCE_NO_EXCHANGE"):  # tests of the two-rename fallback
        return False
    if _renameat2 is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            fn.restype = ctypes.c_int
            _renameat2 = fn
        except (AttributeError, OSError):  # pragma: no cover - not glibc >= 2.28
            _renameat2 = False
    if _renameat2 is False:  # pragma: no cover
        return False
    at_fdcwd, rename_exchange = -100, 2
    return _renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def swap_into_place(tmp: Path, final: Path, label: str) -> None:
    """Move the complete folder ``tmp`` to ``final``, replacing what is there: a rename when
    ``final`` is missing, else an atomic :func:`exchange`, else two renames with the old folder
    set aside as ``<name>.old-*`` meanwhile (put back if the second rename fails). ``tmp`` is
    gone afterwards; ``label`` is the fault points' detail."""
    if not final.exists():
        os.replace(tmp, final)
        fsync_dir(final.parent)
        return
    if exchange(tmp, final):  # final now holds the new folder and tmp the old one
        fsync_dir(final.parent)
        fault_point("storage.after_swap", label)
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = temp_path(final, "old")
    os.replace(final, old)  # readers find no folder at final: they read this aside copy
    try:
        fault_point("storage.between_renames", label)
        os.replace(tmp, final)
    except BaseException:
        os.replace(old, final)
        raise
    fsync_dir(final.parent)
    fault_point("storage.after_swap", label)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def replacing(final: str | os.PathLike) -> Iterator[Path]:
    """A temporary path ``.<name>.tmp-XXXXXXXX`` beside the file ``final`` to write; renamed onto
    ``final`` atomically when the block ends without error, removed when it raises."""
    p = Path(final)
    tmp = p.with_name(f".{p.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class OpenFolder:
    """A folder held open: every file is read relative to it (``dir_fd``), so one read sees one
    folder even while a replacement renames folders around it.

    Raises (on ``with``):
        FileNotFoundError / NotADirectoryError: nothing, or a file, at ``path``.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: Optional[int] = None

    def __enter__(self) -> "OpenFolder":
        if os.open in os.supports_dir_fd and hasattr(os, "O_DIRECTORY"):
            self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        elif not self.path.is_dir():  # pragma: no cover - platforms without dir_fd
            raise FileNotFoundError(self.path)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fd is not None:
            os.close(self.fd)

    def open(self, name: str) -> Any:
        """The file ``name`` of this folder, opened for binary reading."""
        if self.fd is None:  # pragma: no cover
            return open(self.path / name, "rb")
        return open(name, "rb", opener=lambda p, flags: os.open(p, flags, dir_fd=self.fd))

    def is_at(self, path: Path) -> bool:
        """Whether ``path`` is still this folder (the open descriptor keeps its inode unique)."""
        if self.fd is None:  # pragma: no cover
            return True
        try:
            st, mine = path.stat(), os.fstat(self.fd)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)
