"""Artifacts and plots in the experiment tracker: a real server-less MLflow backend (SQLite
tracking store, local artifact root) and Weights & Biases in offline mode. (TensorBoard images:
tests/test_report_cli.py.)"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_influence import EKFACInfluence, Z0Influence
from lightning_influence.callbacks.loggers import log_artifacts
from lightning_influence.demos import MLPClassifier, digits_dataset
from scaffold import indexed, quiet_trainer


def _fit(tmp_path, logger) -> L.Trainer:
    torch.manual_seed(0)
    train, test, _ = digits_dataset()
    tr, te = indexed(train, 64), indexed(test, 4)
    trainer = quiet_trainer(tmp_path, [EKFACInfluence(probe=tr), Z0Influence(probe=tr, queries=te)], max_epochs=2, logger=logger)
    trainer.fit(MLPClassifier(hidden=8), DataLoader(tr, batch_size=32))
    return trainer


def _local_files(root: Path) -> dict[str, str]:
    """Relative path → sha256 of every file the callbacks wrote (dot-named ones excluded)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts):
            out[rel.as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.mark.slow
def test_mlflow_run_holds_the_artifacts_plots_and_html_report(tmp_path):
    pytest.importorskip("mlflow", reason="needs mlflow (pip install mlflow) for the MLflow logger test")
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = MLFlowLogger(experiment_name="influence-test", tracking_uri=uri, artifact_location=(tmp_path / "store").as_uri())
    trainer = _fit(tmp_path, logger)
    influence = tmp_path / "influence"  # an MLflow logger with a SQLite store has no local log dir
    client = MlflowClient(uri)
    listed = {}

    def walk(path=None):
        for a in client.list_artifacts(logger.run_id, path):
            walk(a.path) if a.is_dir else listed.setdefault(a.path, a.file_size)

    walk()
    for rel in _local_files(influence / "ekfac"):
        assert f"influence/ekfac/{rel}" in listed
    assert {"influence/ekfac/factors/tensors.safetensors", "influence/ekfac/examples/views.json",
            "influence/z0/recording/manifest.json", "influence/z0/self_influence/self_influence.csv"} <= set(listed)
    assert not any("/." in p for p in listed)  # snapshots and temporaries stay local
    assert {"influence/plots/ekfac_spectra.png", "influence/plots/self_influence_ekfac.png", "influence/plots/self_influence_z0.png",
            "influence/report.html"} <= set(listed)
    down = Path(client.download_artifacts(logger.run_id, "influence", str(tmp_path / "down")))
    for rel, digest in _local_files(influence / "ekfac").items():  # byte for byte what the callback wrote
        assert hashlib.sha256((down / "ekfac" / rel).read_bytes()).hexdigest() == digest
    assert (down / "report.html").read_bytes() == (influence / "plots" / "report.html").read_bytes()
    assert "influence/ekfac/self_mean" in trainer.callback_metrics  # metrics still flow as before


@pytest.mark.slow
def test_wandb_offline_run_holds_the_plots_and_an_artifact_of_the_files(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="needs wandb for the Weights & Biases logger test")
    from lightning.pytorch.loggers import WandbLogger

    for k, v in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path), "WANDB_DATA_DIR": str(tmp_path / "data"),
                 "WANDB_CACHE_DIR": str(tmp_path / "cache"), "WANDB_CONFIG_DIR": str(tmp_path / "config")}.items():
        monkeypatch.setenv(k, v)
    logger = WandbLogger(project="influence-test", offline=True, save_dir=str(tmp_path))
    _fit(tmp_path, logger)
    wandb.finish()
    run = next((tmp_path / "wandb").glob("offline-run-*"))
    images = {p.name.rsplit("_", 2)[0] for p in (run / "files" / "media" / "images" / "influence").glob("*.png")}
    assert {"ekfac_spectra", "self_influence_ekfac", "self_influence_z0"} <= images
    local = _local_files(tmp_path / "influence" / "ekfac")
    # W&B's service process writes the offline run file on its own schedule; wandb.finish() can
    # return before the artifact's records are flushed to it, so read until they are (or 60 s)
    deadline = time.monotonic() + 60
    while True:
        log = next(run.glob("run-*.wandb")).read_bytes()
        if (b"influence-ekfac" in log and all(rel.encode() in log for rel in local)) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert b"influence-ekfac" in log and all(rel.encode() in log for rel in local)  # the artifact's manifest
    staged = {hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "data").rglob("*") if p.is_file()}
    assert set(local.values()) <= staged  # every file's bytes were handed to W&B


def test_log_artifacts_ignores_loggers_without_files(tmp_path):
    class Trainer:
        is_global_zero = True
        loggers = [type("CSVLogger", (), {})(), type("TensorBoardLogger", (), {})()]

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.txt").write_text("x")
    assert log_artifacts(Trainer(), tmp_path / "a", "influence/a") == 0
    calls = []

    class MLFlowLogger:
        run_id = "r"
        experiment = type("E", (), {"log_artifact": lambda self, run, path, where: calls.append((Path(path).name, where))})()

    Trainer.loggers = [MLFlowLogger()]
    (tmp_path / "a" / ".snapshots").mkdir()
    (tmp_path / "a" / ".snapshots" / "big.bin").write_text("x")
    (tmp_path / "a" / "sub").mkdir()
    (tmp_path / "a" / "sub" / "y.txt").write_text("y")
    assert log_artifacts(Trainer(), tmp_path / "a", "influence/a") == 2
    assert calls == [("x.txt", "influence/a"), ("y.txt", "influence/a/sub")]
    Trainer.is_global_zero = False
    assert log_artifacts(Trainer(), tmp_path / "a", "influence/a") == 0
    assert os.path.exists(tmp_path / "a" / ".snapshots" / "big.bin")
