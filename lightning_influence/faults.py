"""Fault injection for crash tests: named points in the library's write paths.

Each point calls :func:`fault_point` with its name (and, for storage points, the artifact kind
as ``detail``). Nothing happens unless the environment variable ``LIGHTNING_INFLUENCE_FAULT``
names the point, as a comma-separated list of ``<point>[:<detail>]=<action>[@<hit>]`` items:

* ``kill``: the process kills itself with ``SIGKILL`` (no clean-up, no ``finally``), as a
  power cut or an out-of-memory killer would;
* ``enospc``: raise ``OSError(ENOSPC, "No space left on device")``, as a full disk would;
* ``:<detail>``: only where the point is reached with that detail (e.g. ``storage.tensors:ekfac``:
  the factors' write, not a scores artifact's);
* ``@<hit>``: act on the ``hit``-th time the point (with that detail) is reached in this process
  (1-based; default 1).

Example: ``LIGHTNING_INFLUENCE_FAULT="ekfac.correction_batch=kill@2"`` kills the process at the
second batch of the end-of-fit correction pass. The points are listed in :data:`POINTS`.
"""

from __future__ import annotations

import errno
import os
import signal

__all__ = ["fault_point", "reset", "ENV", "POINTS"]

ENV = "LIGHTNING_INFLUENCE_FAULT"

POINTS = {
    "storage.tensors": "before the tensor file of an artifact is written",
    "storage.before_manifest": "after the tensor file is written, before the manifest is",
    "storage.before_swap": "after the new artifact is complete in its temporary folder, before it replaces the old one",
    "storage.between_renames": "between the two renames of a replacement (file systems without an atomic exchange)",
    "storage.after_swap": "after the new artifact is in place, before the old one is deleted",
    "ekfac.correction_batch": "at each batch of EKFACInfluence's end-of-fit correction pass",
    "ekfac.before_save": "after EKFACInfluence's factors are computed, before they are written",
    "z0.snapshot_written": "after a Z0 snapshot file is written, before the recording is",
}
"""Point name → where it is."""

_hits: dict[str, int] = {}


def fault_point(name: str, detail: str = "") -> None:
    """Act as ``LIGHTNING_INFLUENCE_FAULT`` says for point ``name`` reached with ``detail`` (see
    the module docstring); return at once when the variable is unset."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    for key in (name, f"{name}:{detail}"):
        _hits[key] = _hits.get(key, 0) + 1
    for item in spec.split(","):
        point, _, action = item.strip().partition("=")
        if point not in (name, f"{name}:{detail}"):
            continue
        action, _, hit = action.partition("@")
        if _hits[point] != (int(hit) if hit else 1):
            continue
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if action == "enospc":
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (injected at {point})")
        raise ValueError(f"{ENV}: unknown action {action!r} for point {point!r} (use kill or enospc)")


def reset() -> None:
    """Forget how often each point was reached (for tests that inject faults in one process)."""
    _hits.clear()
