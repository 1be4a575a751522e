"""Crash injection: a training subprocess (tests/crash_worker.py: EK-FAC with a probe, Z0, LiSSA
every epoch; a checkpoint after every epoch) is killed with SIGKILL at named points, resumed from
its last checkpoint, and every artifact it ends with must equal an uninterrupted run's exactly,
with no temporary left behind. Between the kill and the resume, no half-written artifact loads,
and an artifact being replaced is still readable.

The points: mid-epoch; inside the end-of-fit correction pass; between the tensor write and the
manifest write of the factors; between the two renames of a replacement (file systems without an
atomic exchange); after an atomic exchange, before the old copy is deleted. The full disk at the
save is in tests/test_resume.py (in one process, with the fault injected at the write).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lightning_influence
from lightning_influence.atomicfs import TEMP_DIR
from lightning_influence.storage import ArtifactError, list_artifacts, read_artifact
from lightning_influence.z0 import load_z0

WORKER = Path(__file__).with_name("crash_worker.py")
REPO = Path(lightning_influence.__file__).resolve().parents[1]
TIMEOUT = 240


def _run(root: Path, *args: str, fault: str = "", no_exchange: bool = False) -> int:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("LIGHTNING_INFLUENCE_FAULT", None)
    env.pop("LIGHTNING_INFLUENCE_NO_EXCHANGE", None)
    if fault:
        env["LIGHTNING_INFLUENCE_FAULT"] = fault
    if no_exchange:
        env["LIGHTNING_INFLUENCE_NO_EXCHANGE"] = "1"
    proc = subprocess.run([sys.executable, str(WORKER), str(root), *args], env=env, capture_output=True, text=True, timeout=TIMEOUT)
    if proc.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"worker failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.returncode


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("uninterrupted")
    assert _run(root) == 0
    return root / "influence"


def _assert_same_artifacts(got: Path, want: Path) -> None:
    expected = {i.path.relative_to(want).as_posix(): i.kind for i in list_artifacts(want)}
    found = {i.path.relative_to(got).as_posix(): i.kind for i in list_artifacts(got)}
    assert found == expected
    for rel in expected:
        tg, mg = read_artifact(got / rel)
        tw, mw = read_artifact(want / rel)
        assert tg.keys() == tw.keys(), rel
        for k in tw:
            assert torch.equal(tg[k], tw[k]), (rel, k)
        for key in ("step", "epoch", "n_examples", "n_lambda_examples", "num_checkpoints", "layers"):
            assert mg.get(key) == mw.get(key), (rel, key)
    stale = [p for p in got.rglob(".*") if p.name != ".snapshots" and p.parent.name != ".snapshots"]
    assert not stale, stale


SCENARIOS = {
    # name: (worker arguments, fault, no atomic exchange)
    "mid-epoch": (["--kill-at-step", "6"], "", False),
    "inside-the-correction-pass": ([], "ekfac.correction_batch=kill@2", False),
    "between-tensor-and-manifest-write": ([], "storage.before_manifest:ekfac=kill", False),
    "between-the-renames": ([], "storage.between_renames:z0=kill@1", True),
    "after-the-exchange": ([], "storage.after_swap:scores=kill@1", False),
}


@pytest.mark.slow
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_killed_then_resumed_equals_uninterrupted(tmp_path, reference, scenario):
    args, fault, no_exchange = SCENARIOS[scenario]
    assert _run(tmp_path, *args, fault=fault, no_exchange=no_exchange) == -signal.SIGKILL
    folder = tmp_path / "influence"
    # what the kill left: nothing half-written loads, an artifact being replaced is still readable
    if scenario in ("inside-the-correction-pass", "between-tensor-and-manifest-write"):
        with pytest.raises(ArtifactError):
            read_artifact(folder / "ekfac" / "factors")
        assert not (folder / "lissa" / "self_influence").exists()
    if scenario == "between-tensor-and-manifest-write":
        assert [p.name[:12] for p in (folder / "ekfac" / TEMP_DIR).glob("factors.tmp-*")] == ["factors.tmp-"]
    if scenario == "between-the-renames":
        assert not (folder / "z0" / "recording").exists()  # renamed aside, the new one not yet in place
        assert load_z0(folder / "z0" / "recording").steps.tolist() == [4]  # read through the aside copy
        assert ("recording", "z0") in [(i.path.name, i.kind) for i in list_artifacts(folder)]
        from lightning_influence.cli import main

        assert main(["report", str(tmp_path), "--no-plots"]) == 0  # not "incomplete" during the rename gap
    if scenario == "after-the-exchange":
        assert list((folder / "z0" / TEMP_DIR).glob("self_influence.tmp-*"))  # the old copy, not yet deleted
        assert read_artifact(folder / "z0" / "self_influence")[1]["step"] == 12  # the new one is in place
    assert _run(tmp_path, "--resume") == 0
    _assert_same_artifacts(folder, reference)
