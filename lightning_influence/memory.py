"""Peak-memory measurement around a computation: the CUDA allocator's peak on a GPU, the process's
resident-memory high-water mark on CPU.

``peak_bytes`` is how far memory rose above what was in use when the block started, and
``method`` says how it was measured:

* ``"cuda_max_memory_allocated"``: ``torch.cuda.max_memory_allocated`` after
  ``reset_peak_memory_stats``, minus the bytes allocated at entry: the peak held by tensors on
  the device during the block.
* ``"linux_vmhwm"`` (Linux, where the peak may be reset): the process's resident high-water
  mark (``VmHWM`` in ``/proc/self/status``), reset at entry by writing ``5`` to
  ``/proc/self/clear_refs``, at exit, minus the resident size (``VmRSS``) at entry. The reset
  is process-wide (``getrusage``'s ``ru_maxrss`` is reset with it); pass ``reset_peak=False``
  to leave it alone.
* ``"linux_vmrss_sampled"`` (Linux without the reset): a background thread reads ``VmRSS``
  every ``interval`` seconds and keeps the largest value; also the high-water mark at exit when
  the block raised it. Spikes shorter than the interval can be missed.
* ``"ru_maxrss"`` (no ``/proc``): how far the block raised the process's peak resident size
  (``getrusage``; 0 when it stayed below an earlier peak, so a lower bound).

PyTorch's CPU tensors are not allocated through Python's allocator, so ``tracemalloc`` does not
see them: resident memory is the honest CPU measure. It includes allocator slack and is counted
in pages; memory the allocator keeps after ``del`` stays resident.
"""

from __future__ import annotations

import ctypes
import gc
import resource
import sys
import threading
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from .errors import InfluenceError

__all__ = ["PeakMemory", "release_free_memory", "resident_bytes", "available_memory", "format_bytes", "InsufficientMemoryError",
           "TrainingState", "OPTIMIZER_STATE_COPIES"]


class InsufficientMemoryError(InfluenceError, MemoryError):
    """A computation was refused before it started because its estimated memory exceeds what is
    available (or the budget given); the message gives the numbers and the knob to turn."""


def _status_kib(field: str, path: str = "/proc/self/status") -> Optional[int]:
    """A ``kB`` field of ``/proc/self/status`` (or another ``/proc`` file of that layout, e.g.
    ``/proc/meminfo``); ``None`` where there is no such file or field."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_hwm() -> bool:
    """Reset the process's resident high-water mark (Linux ≥ 4.0); whether it was allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _ru_maxrss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


class _RssSampler(threading.Thread):
    """Reads ``VmRSS`` every ``interval`` seconds until stopped; ``peak_kib`` is the largest value."""

    def __init__(self, interval: float) -> None:
        super().__init__(name="lightning-influence-rss", daemon=True)
        self.interval = interval
        self.peak_kib = _status_kib("VmRSS") or 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.interval):
            rss = _status_kib("VmRSS")
            if rss is not None and rss > self.peak_kib:
                self.peak_kib = rss

    def stop(self) -> int:
        self._done.set()
        self.join()
        rss = _status_kib("VmRSS") or 0
        return max(self.peak_kib, rss)


class PeakMemory:
    """Context manager; ``peak_bytes`` and ``method`` after exit (see the module docstring).

    Args:
        device: where the computation runs (``None``: CPU). On a CUDA device the allocator's
            statistics are used.
        reset_peak: on Linux, reset the process's resident high-water mark at entry (process-wide)
            and read it at exit; ``False`` (or where the reset is not allowed) samples the
            resident size in a background thread instead.
        interval: seconds between samples when sampling.
    """

    def __init__(self, device: Optional[torch.device | str] = None, reset_peak: bool = True, interval: float = 0.002) -> None:
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.reset_peak = reset_peak
        self.interval = interval
        self.peak_bytes = 0
        self.method = ""
        self._sampler: Optional[_RssSampler] = None

    def __enter__(self) -> "PeakMemory":
        self.peak_bytes = 0
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method = "cuda_max_memory_allocated"
            return self
        self._rss0 = _status_kib("VmRSS")
        if self._rss0 is None:
            self._ru0 = _ru_maxrss_bytes()
            self.method = "ru_maxrss"
        elif self.reset_peak and _reset_hwm():
            self.method = "linux_vmhwm"
        else:
            self._hwm0 = _status_kib("VmHWM") or 0
            self._sampler = _RssSampler(self.interval)
            self._sampler.start()
            self.method = "linux_vmrss_sampled"
        return self

    def __exit__(self, *exc: object) -> None:
        if self.method == "cuda_max_memory_allocated":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = max(0, torch.cuda.max_memory_allocated(self.device) - self._base)
        elif self.method == "linux_vmhwm":
            hwm = _status_kib("VmHWM") or 0
            self.peak_bytes = max(0, hwm - (self._rss0 or 0)) * 1024
        elif self.method == "linux_vmrss_sampled":
            peak = self._sampler.stop() if self._sampler is not None else 0
            self._sampler = None
            hwm = _status_kib("VmHWM") or 0
            if hwm > self._hwm0:  # the block raised the process's peak: that is a measured peak too
                peak = max(peak, hwm)
            self.peak_bytes = max(0, peak - (self._rss0 or 0)) * 1024
        else:
            self.peak_bytes = max(0, _ru_maxrss_bytes() - self._ru0)


def release_free_memory() -> None:
    """Collect garbage and hand the C allocator's free heap pages back to the OS (glibc's
    ``malloc_trim``; a no-op elsewhere), so that resident memory before a measured block is its
    live memory and memory the block reuses shows up as growth again."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def resident_bytes() -> Optional[int]:
    """The process's resident size now (``VmRSS``; ``None`` where ``/proc`` is missing)."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def format_bytes(n: float) -> str:
    """``n`` bytes for messages: GiB from 256 MiB up, else MiB."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def _cgroup_free() -> Optional[int]:
    """Bytes left under this process's cgroup (v2 or v1) memory limit, ``None`` when unlimited or unknown."""
    for limit_path, usage_path in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_path) as f:
                raw = f.read().strip()
            if raw == "max":
                return None
            limit = int(raw)
            if limit >= 2**60:  # v1's "unlimited"
                return None
            with open(usage_path) as f:
                usage = int(f.read().strip())
            return max(0, limit - usage)
        except (OSError, ValueError):
            continue
    return None


def available_memory(device: torch.device | str) -> Optional[int]:
    """Bytes available for new tensors on ``device`` now: on CUDA the driver's free memory plus
    the blocks PyTorch's allocator holds unused; on CPU the kernel's ``MemAvailable`` bounded by
    the cgroup limit. ``None`` where neither can be read."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + max(0, cached))
    if device.type != "cpu":
        return None
    meminfo = _status_kib("MemAvailable", "/proc/meminfo")
    found = [v for v in (None if meminfo is None else meminfo * 1024, _cgroup_free()) if v is not None]
    return min(found) if found else None


OPTIMIZER_STATE_COPIES = {"Adam": 2, "AdamW": 2, "NAdam": 2, "RAdam": 2, "Adamax": 2, "Adadelta": 2, "Rprop": 2,
                          "Adagrad": 1, "SparseAdam": 2, "ASGD": 1}
"""Parameter-sized buffers a ``torch.optim`` optimizer creates per parameter at its first step
(``amsgrad`` adds one; ``SGD`` and ``RMSprop`` are counted from their options; an optimizer not
listed here is assumed to keep 2, as Adam does)."""


def _state_copies(optimizer: Any, group: dict) -> int:
    kind = type(optimizer).__name__
    if kind == "SGD":
        return int(group.get("momentum", 0) > 0)
    if kind == "RMSprop":
        return 1 + int(group.get("momentum", 0) > 0) + int(bool(group.get("centered", False)))
    return OPTIMIZER_STATE_COPIES.get(kind, 2) + int(bool(group.get("amsgrad", False)))


def _local_bytes(p: torch.Tensor) -> int:
    local = p.to_local() if hasattr(p, "to_local") else p  # an FSDP2 DTensor: this rank's shard
    return local.numel() * local.element_size()


@dataclass(frozen=True)
class TrainingState:
    """The memory training will still allocate after ``fit`` starts, in bytes on this rank: the
    gradients of trainable parameters that have none yet and the optimizers' state of parameters
    that have none yet (created lazily at the first step; a resumed run already holds it).
    Activations are not counted (they depend on the batch; a margin is left for them)."""

    gradients: int = 0
    optimizer: int = 0
    optimizers: tuple[str, ...] = ()

    @classmethod
    def of(cls, module: torch.nn.Module, optimizers: Sequence[Any] = ()) -> "TrainingState":
        grads = sum(_local_bytes(p) for p in module.parameters() if p.requires_grad and p.grad is None)
        state, names = 0, []
        for opt in optimizers:
            opt = getattr(opt, "optimizer", opt)  # Lightning's LightningOptimizer wraps it
            names.append(type(opt).__name__)
            for group in getattr(opt, "param_groups", []):
                copies = _state_copies(opt, group)
                state += copies * sum(_local_bytes(p) for p in group["params"] if p.requires_grad and not opt.state.get(p))
        return cls(grads, state, tuple(names))

    @property
    def total(self) -> int:
        return self.gradients + self.optimizer

    def describe(self) -> str:
        opts = "/".join(self.optimizers) or "no optimizer"
        return f"gradients {format_bytes(self.gradients)} and {opts} state {format_bytes(self.optimizer)} still to be allocated"
