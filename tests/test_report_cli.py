"""The report CLI on a real (short) training run: ids, formats, plots, error messages."""

from __future__ import annotations

import csv
import io
import json
import shutil
import struct

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, Subset

from lightning_influence import EKFACInfluence, IndexedDataset, LiSSAOptions, LiSSASelfInfluence, Z0Influence
from lightning_influence.cli import main
from lightning_influence.report import PLOT_SIZE
from lightning_influence.scores import load_scores
from lightning_influence.demos import MLPClassifier, digits_dataset
from lightning_influence.z0 import load_z0


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    train, test, _ = digits_dataset(flip_fraction=0.1)
    tr, te = IndexedDataset(Subset(train, range(120))), IndexedDataset(Subset(test, range(6)))
    cbs = [EKFACInfluence(probe=tr, top_k=5), Z0Influence(probe=tr, queries=te, every_n_epochs=1)]
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=CSVLogger(str(tmp), name="run"), callbacks=cbs,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(MLPClassifier(hidden=16, lr=0.1), DataLoader(tr, batch_size=32))
    return tmp / "run" / "version_0"


def _png_size(path):
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_table_lists_the_saved_top_ids_and_writes_plots(run_dir, capsys):
    assert main(["report", str(run_dir), "--top-k", "4"]) == 0
    out = capsys.readouterr().out
    ekfac = load_scores(run_dir / "influence" / "ekfac" / "self_influence")
    expected = [i for i, _ in ekfac.top_self(4)]
    section = out.split("== ekfac  (")[1].split("==")[0]
    listed = [int(line.split()[1]) for line in section.splitlines() if line.strip()[:1].isdigit()]
    assert listed == expected
    z = load_z0(run_dir / "influence" / "z0" / "recording")
    zi = z.self_influence("variance")
    z_top = z.probe_ids[torch.argsort(zi, descending=True)[:4]].tolist()
    z_section = out.split("== z0  (")[1].split("==")[0]
    z_listed = [int(line.split()[1]) for line in z_section.splitlines() if line.strip()[:1].isdigit()]
    assert z_listed == z_top
    assert "== z0 recording  (" in out and "query" in out.split("== z0 recording  (")[1]
    plots = sorted((run_dir / "influence" / "plots").glob("*.png"))
    assert {p.name for p in plots} == {"ekfac_spectra.png", "self_influence_ekfac.png", "self_influence_z0.png"}
    for p in plots:
        assert p.stat().st_size > 5000 and _png_size(p) == PLOT_SIZE


def test_json_and_csv_parse_and_agree(run_dir, capsys):
    assert main(["report", str(run_dir), "--format", "json", "--no-plots", "--top-k", "3"]) == 0
    data = json.loads(capsys.readouterr().out)
    by_method = {d["method"]: d for d in data}
    assert set(by_method) == {"ekfac factors", "ekfac", "z0", "z0 recording"} and len(data) == 4
    saved = load_scores(run_dir / "influence" / "ekfac" / "self_influence")
    assert [e["id"] for e in by_method["ekfac"]["self_influence_top"]] == [i for i, _ in saved.top_self(3)]
    pw = by_method["z0 recording"]["pairwise_top"]
    assert len(pw) == 5 and all(len(q["proponents"]) == 3 and len(q["opponents"]) == 3 for q in pw)
    z = load_z0(run_dir / "influence" / "z0" / "recording")
    scores = z.pairwise()
    assert [e["id"] for e in pw[0]["proponents"]] == z.probe_ids[torch.topk(scores[0], 3).indices].tolist()
    assert [e["id"] for e in pw[0]["opponents"]] == z.probe_ids[torch.topk(scores[0], 3, largest=False).indices].tolist()
    assert main(["report", str(run_dir), "--format", "csv", "--no-plots", "--top-k", "3"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    ek = [int(r["id"]) for r in rows if r["method"] == "ekfac" and r["ranking"] == "self_influence"]
    assert ek == [i for i, _ in saved.top_self(3)]


def test_missing_and_incomplete_run_dirs_say_what_is_missing(run_dir, tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "no influence/ folder" in capsys.readouterr().err
    broken = tmp_path / "broken" / "influence"
    shutil.copytree(run_dir / "influence" / "ekfac" / "factors", broken / "ekfac" / "factors")
    (broken / "ekfac" / "factors" / "tensors.safetensors").write_bytes(b"truncated")
    assert main(["report", str(tmp_path / "broken")]) == 2
    err = capsys.readouterr().err
    assert "no complete influence artifact" in err and "ekfac/factors" in err and "truncated" in err


def test_report_twice_ignores_its_own_plots_and_names_broken_artifacts(run_dir, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    assert main(["report", str(copy)]) == 0
    assert main(["report", str(copy)]) == 0  # its own plots/ folder is not an artifact
    assert "skipped" not in capsys.readouterr().err
    (copy / "influence" / "ekfac" / "self_influence" / "manifest.json").write_text("[1, 2]")
    assert main(["report", str(copy), "--no-plots"]) == 0
    err = capsys.readouterr().err
    assert "warning: skipped incomplete artifact ekfac/self_influence" in err


def test_plots_are_logged_to_tensorboard(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(0)
    train, _, _ = digits_dataset()
    tr = IndexedDataset(Subset(train, range(64)))
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=logger, callbacks=[EKFACInfluence(probe=tr), Z0Influence(probe=tr),
                                                                                   LiSSASelfInfluence(probe=Subset(tr, range(16)), every_n_epochs=2, options=LiSSAOptions(depth=5, damping=0.1, scale=50.0))],
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(MLPClassifier(hidden=8), DataLoader(tr, batch_size=32))
    acc = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    acc.Reload()
    assert set(acc.Tags()["images"]) == {"influence/ekfac_spectra", "influence/self_influence_ekfac", "influence/self_influence_z0",
                                            "influence/self_influence_lissa"}
    img = acc.Images("influence/ekfac_spectra")[0]
    assert (img.width, img.height) == PLOT_SIZE and len(img.encoded_image_string) > 5000
    assert "influence/ekfac/self_mean" in acc.Tags()["scalars"]
