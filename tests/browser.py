"""A real headless Chromium for the HTML report tests: find (or install) it and run it on a page."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


def chromium() -> str:
    """Path of Debian's ``chromium`` (installed with apt-get when root); skips the test without it."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None and shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0:
        subprocess.run("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium", shell=True,
                       capture_output=True, timeout=900)
        exe = shutil.which("chromium")
    if exe is None:
        pytest.skip("the browser test needs Debian's chromium package; it is not installed and could not be installed "
                    "here (apt-get needs root and network access)")
    return exe


def run_chromium(exe: str, page, tmp_path, *args: str) -> str:
    """stdout of headless ``exe`` on ``page`` (a ``Path``) with ``args`` (``--dump-dom``, ``--screenshot=...``),
    a fresh profile under ``tmp_path``; asserts it exits cleanly."""
    proc = subprocess.run([exe, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args, page.as_uri()],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout
