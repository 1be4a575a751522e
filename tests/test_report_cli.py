"""The report CLI on a real (short) training run: ids, score forms, formats, plots, error
messages, and what the callbacks save at the end of fit for the HTML report."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import struct

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, Subset

from lightning_influence import EKFACInfluence, LiSSAOptions, LiSSASelfInfluence, Z0Influence
from lightning_influence.cli import main
from lightning_influence.demos import MLPClassifier, digits_dataset
from lightning_influence.report.views import load_views
from lightning_influence.report import PLOT_SIZE
from lightning_influence.scores import load_scores
from lightning_influence.z0 import load_z0
from scaffold import indexed, quiet_trainer


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    train, test, flipped = digits_dataset(flip_fraction=0.1)
    tr, te = indexed(train, 120), indexed(test, 6)
    cbs = [EKFACInfluence(probe=tr, top_k=5, update_every_n_steps=16), Z0Influence(probe=tr, queries=te, every_n_epochs=1)]
    trainer = quiet_trainer(None, cbs, max_epochs=3, logger=CSVLogger(str(tmp), name="run"))
    model = MLPClassifier(hidden=16, lr=0.1)
    trainer.fit(model, DataLoader(tr, batch_size=32))
    return tmp / "run" / "version_0", model.eval(), tr, te


@pytest.fixture(scope="module")
def run_dir(trained):
    return trained[0]


def _png_size(path):
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def _section(out: str, method: str) -> str:
    return out.split(f"[{method}]  (")[1].split("\n== ")[0]


# rank, id, label (the run saved views with labels: "3", or "3≠5" where the model predicts 5), score, ×median, top %
_ROW = re.compile(r"^\s+(\d+)\s+(\d+)\s+\d+(?:≠\d+)?\s+(\S+)(?:\s+(\S+)×)?(?:\s+top (\S+)%)?\s*$")


def _rows(section: str) -> list[tuple]:
    return [m.groups() for m in map(_ROW.match, section.splitlines()) if m]


def test_table_lists_the_saved_top_ids_with_normalised_and_rank_scores(run_dir, capsys):
    assert main(["report", str(run_dir), "--top-k", "4", "--scores", "all"]) == 0
    out = capsys.readouterr().out
    ekfac = load_scores(run_dir / "influence" / "ekfac" / "self_influence")
    s = ekfac.self_influence.double().numpy()
    median = np.median(np.abs(s))
    rows = _rows(_section(out, "ekfac"))
    assert [int(r[1]) for r in rows] == [i for i, _ in ekfac.top_self(4)]
    for rank, (_, _, raw, norm, top) in enumerate(rows, 1):
        assert float(norm) == pytest.approx(float(raw) / median, rel=5e-3)   # × the median example (3 digits printed)
        assert float(top) == pytest.approx(100 * rank / len(s), abs=0.051)  # share ranked at least as high (as printed)
    assert "EK-FAC self-influence  [ekfac]" in out and "g·(F + λI)⁻¹·g" in out
    z = load_z0(run_dir / "influence" / "z0" / "recording")
    zi = z.self_influence("mean_loss")
    z_top = z.probe_ids[torch.argsort(zi, descending=True)[:4]].tolist()
    assert [int(r[1]) for r in _rows(_section(out, "z0"))] == z_top
    assert "Z0-Inf self-influence  [z0]" in out and "mean loss across the recorded checkpoints" in out
    recording = _section(out, "z0 recording")
    assert "proponents (help)" in recording and "Z0Influence(queries=...)" in recording
    plots = sorted((run_dir / "influence" / "plots").glob("*.png"))
    assert {p.name for p in plots} == {"ekfac_spectra.png", "self_influence_ekfac.png", "self_influence_z0.png"}
    for p in plots:
        assert p.stat().st_size > 5000 and _png_size(p) == PLOT_SIZE
    assert (run_dir / "influence" / "plots" / "report.html").stat().st_size > 20000


def test_raw_scores_only_when_asked(run_dir, capsys):
    assert main(["report", str(run_dir), "--top-k", "2", "--scores", "raw", "--no-plots"]) == 0
    rows = _rows(_section(capsys.readouterr().out, "ekfac"))
    assert len(rows) == 2 and all(r[3] is None and r[4] is None for r in rows)


def test_factor_summary_says_what_the_counts_are(run_dir, capsys):
    assert main(["report", str(run_dir), "--no-plots"]) == 0
    section = " ".join(_section(capsys.readouterr().out, "ekfac factors").split())
    # 120 examples in batches of 32 over 3 epochs (12 batches): update_every_n_steps=16 takes the 1st only
    assert "examples=32" in section and "every 16th training batch over all epochs" in section
    assert "damping" in section


def test_json_and_csv_parse_and_agree(run_dir, capsys):
    assert main(["report", str(run_dir), "--format", "json", "--no-plots", "--top-k", "3"]) == 0
    data = json.loads(capsys.readouterr().out)
    by_method = {d["method"]: d for d in data}
    assert set(by_method) == {"ekfac factors", "ekfac", "z0", "z0 recording"} and len(data) == 4
    saved = load_scores(run_dir / "influence" / "ekfac" / "self_influence")
    top = by_method["ekfac"]["self_influence_top"]
    assert [e["id"] for e in top] == [i for i, _ in saved.top_self(3)]
    median = float(np.median(np.abs(saved.self_influence.double().numpy())))
    assert all(e["normalised"] == pytest.approx(e["score"] / median, rel=1e-6) and e["top_fraction"] == e["rank"] / 120 for e in top)
    assert by_method["ekfac"]["title"] == "EK-FAC self-influence" and by_method["ekfac"]["meaning"]["self_influence"]
    pw = by_method["z0 recording"]["pairwise_top"]
    assert len(pw) == 5 and all(len(q["proponents"]) == 3 and len(q["opponents"]) == 3 for q in pw)
    z = load_z0(run_dir / "influence" / "z0" / "recording")
    scores = z.pairwise()
    row = z.query_ids.tolist().index(pw[0]["query_id"])  # the queries shown are the highest-loss ones, not the first
    assert [e["id"] for e in pw[0]["proponents"]] == z.probe_ids[torch.topk(scores[row], 3).indices].tolist()
    assert [e["id"] for e in pw[0]["opponents"]] == z.probe_ids[torch.topk(scores[row], 3, largest=False).indices].tolist()
    row_median = float(np.median(np.abs(scores[row].double().numpy())))
    assert pw[0]["proponents"][0]["normalised"] == pytest.approx(pw[0]["proponents"][0]["score"] / row_median, rel=1e-5)
    assert main(["report", str(run_dir), "--format", "csv", "--no-plots", "--top-k", "3"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    ek = [r for r in rows if r["method"] == "ekfac" and r["ranking"] == "self_influence"]
    assert [int(r["id"]) for r in ek] == [i for i, _ in saved.top_self(3)]
    assert float(ek[0]["normalised"]) == pytest.approx(top[0]["normalised"], rel=1e-5)


def test_fit_end_saves_the_top_examples_with_given_and_predicted_labels(trained):
    run_dir, model, tr, te = trained
    views = load_views(run_dir / "influence" / "ekfac" / "examples")
    saved = load_scores(run_dir / "influence" / "ekfac" / "self_influence")
    top = [i for i, _ in saved.top_self(10)]
    assert set(top) <= set(views.train)
    with torch.no_grad():
        for i in top:
            x, y = tr.dataset[i]
            v = views.train[i]
            assert v.label == str(int(y)) and v.predicted == str(int(model(x[None]).argmax()))
            assert v.table is not None and v.table[0] == ("[0]", f"{float(x[0]):.4g}")  # 64 features: a table row
    z0 = load_views(run_dir / "influence" / "z0" / "examples")
    z = load_z0(run_dir / "influence" / "z0" / "recording")
    listed = sorted(int(z.query_ids[k]) for k in torch.argsort(z.query_losses[-1].double(), descending=True)[:5])
    assert sorted(z0.queries) == listed  # the queries the report lists (the highest final losses), with their labels
    assert all(z0.queries[q].label == str(int(te.dataset[q][1])) for q in listed)


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
    (tmp_path / "ids.txt").write_text("1, x")
    assert main(["report", str(run_dir), "--mark-ids", str(tmp_path / "ids.txt")]) == 2
    assert "--mark-ids" in capsys.readouterr().err


def test_report_twice_ignores_its_own_plots_and_names_broken_artifacts(run_dir, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    assert main(["report", str(copy)]) == 0
    assert main(["report", str(copy)]) == 0  # its own plots/ folder and the saved examples are not reports
    assert "skipped" not in capsys.readouterr().err
    (copy / "influence" / "ekfac" / "self_influence" / "manifest.json").write_text("[1, 2]")
    assert main(["report", str(copy), "--no-plots"]) == 0
    err = capsys.readouterr().err
    assert "warning: skipped incomplete artifact ekfac/self_influence" in err


def test_html_option_and_marked_ids(run_dir, tmp_path, capsys):
    ids = load_scores(run_dir / "influence" / "ekfac" / "self_influence").top_self(3)
    marks = [ids[0][0], ids[2][0], 100000]
    (tmp_path / "ids.txt").write_text("\n".join(map(str, marks)))
    out = tmp_path / "page" / "r.html"
    assert main(["report", str(run_dir), "--html", str(out), "--mark-ids", str(tmp_path / "ids.txt"), "--mark-label",
                 "known noisy", "--plots-dir", str(tmp_path / "plots")]) == 0
    page = out.read_text()
    assert page == (tmp_path / "plots" / "report.html").read_text()
    ekfac = page.split(">EK-FAC self-influence</h2>")[1].split("<section")[0]
    cards = re.split(r'<div class="card(?: \w+)*" data-id=', ekfac)[1:4]
    assert [c.split('"')[1] for c in cards] == [str(i) for i, _ in ids]
    assert ["known noisy" in c for c in cards] == [True, False, True]


def test_plots_are_logged_to_tensorboard(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(0)
    train, _, _ = digits_dataset()
    tr = indexed(train, 64)
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = quiet_trainer(None, [EKFACInfluence(probe=tr), Z0Influence(probe=tr),
                                   LiSSASelfInfluence(probe=Subset(tr, range(16)), every_n_epochs=2, options=LiSSAOptions(depth=5, damping=0.1, scale=50.0))],
                            max_epochs=2, logger=logger)
    trainer.fit(MLPClassifier(hidden=8), DataLoader(tr, batch_size=32))
    acc = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    acc.Reload()
    assert set(acc.Tags()["images"]) == {"influence/ekfac_spectra", "influence/self_influence_ekfac", "influence/self_influence_z0",
                                            "influence/self_influence_lissa"}
    img = acc.Images("influence/ekfac_spectra")[0]
    assert (img.width, img.height) == PLOT_SIZE and len(img.encoded_image_string) > 5000
    assert "influence/ekfac/self_mean" in acc.Tags()["scalars"]


def _readme_command(fragment: str) -> list[str]:
    """The README's command line containing ``fragment``, without its comment, split as a shell would."""
    import shlex
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    line = next(l for l in readme.splitlines() if l.startswith("lightning-influence ") and fragment in l)
    return shlex.split(line.split("#")[0])


def _console(args: list[str], cwd) -> "subprocess.CompletedProcess":
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).parent / args[0]
    assert exe.exists(), f"the console script {exe} is not installed"
    return subprocess.run([str(exe), *args[1:]], cwd=cwd, capture_output=True, text=True, timeout=300)


def _badges(page: str, label: str) -> int:
    return page.count(f'<span class="badge mark">{label}</span>')


def test_readme_html_command_runs_verbatim(run_dir, tmp_path):
    args = _readme_command("--html")
    assert args[:2] == ["lightning-influence", "report"] and args[-1] == "--html"
    shutil.copytree(run_dir, tmp_path / args[2])
    proc = _console(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    page = tmp_path / args[2] / "influence" / "plots" / "report.html"
    assert f"wrote {page.relative_to(tmp_path)}" in proc.stderr
    text = page.read_text()
    assert ">EK-FAC self-influence</h2>" in text and text.count('<div class="card') >= 10


def test_the_cli_keeps_what_the_training_run_s_page_knew(trained, tmp_path, capsys):
    from lightning_influence.report import write_html_report
    from lightning_influence.report.html import page_record

    run_dir, model, tr, te = trained
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    top = [i for i, _ in load_scores(run / "influence" / "ekfac" / "self_influence").top_self(5)]
    flipped = [top[0], top[3], 100000]
    # a page like the demo's: examples from the saved views, flipped labels marked; the CLI keeps the marks
    page = write_html_report(run, mark_ids=flipped, mark_label="flipped label")
    before = _badges(page.read_text(), "flipped label")
    assert before >= 2 and page_record(page)["mark_ids"] == sorted(flipped)
    assert main(["report", str(run), "--html"]) == 0
    err = capsys.readouterr().err
    assert "kept the 3 ids marked 'flipped label'" in err
    assert _badges(page.read_text(), "flipped label") == before
    assert not (page.parent / "report-cli.html").exists()
    # a page rendered from the datasets with the model (images drawn by a hook): never replaced
    rendered = write_html_report(run, tmp_path / "rich.html", datasets=tr, model=model, mark_ids=flipped,
                                 mark_label="flipped label", render=lambda ex: ex[0].reshape(8, 8).clamp(0, 1).numpy())
    rich = rendered.read_text()
    assert rich.count('src="data:image/png;base64,') >= 10
    assert main(["report", str(run), "--html", str(rendered), "--no-plots"]) == 0
    err = capsys.readouterr().err
    assert rendered.read_text() == rich
    cli_page = tmp_path / "rich-cli.html"
    assert f"left {rendered} as it is" in err and f"wrote {cli_page}" in err
    assert _badges(cli_page.read_text(), "flipped label") == before


def test_mark_ids_file_replaces_the_kept_marks(run_dir, tmp_path, capsys):
    from lightning_influence.report import write_html_report

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    top = [i for i, _ in load_scores(run / "influence" / "ekfac" / "self_influence").top_self(3)]
    page = write_html_report(run, mark_ids=[top[0]], mark_label="flipped label")
    (tmp_path / "mine.txt").write_text(f"{top[1]}, {top[2]}\n")
    assert main(["report", str(run), "--html", "--mark-ids", str(tmp_path / "mine.txt"), "--mark-label", "mine"]) == 0
    text = page.read_text()
    assert _badges(text, "flipped label") == 0 and _badges(text, "mine") >= 2


def test_text_report_shows_labels_epochs_and_why_z0_queries_were_chosen(trained, capsys):
    run_dir, model, tr, te = trained
    assert main(["report", str(run_dir), "--no-plots", "--scores", "raw"]) == 0
    out = capsys.readouterr().out
    ekfac = _section(out, "ekfac")
    assert "epochs_completed=3" in ekfac and "epoch=2" not in ekfac  # 3 epochs ran (the artifact's 0-based epoch is 2)
    rows = [line.split() for line in ekfac.split("most self-influential")[1].splitlines()[2:12]]
    with torch.no_grad():
        for rank, i, label, score in rows:
            x, y = tr.dataset[int(i)]
            pred = int(model(x[None]).argmax())
            assert label == (str(int(y)) if pred == int(y) else f"{int(y)}≠{pred}")
    # Z0's train-test lists: the queries with the highest loss at the last checkpoint, highest first, said so
    z = load_z0(run_dir / "influence" / "z0" / "recording")
    final = z.query_losses[-1].double()
    want = [int(z.query_ids[k]) for k in torch.argsort(final, descending=True)[:5]]
    z0 = _section(out, "z0 recording")
    shown = [int(line.split()[1]) for line in z0.splitlines() if line.startswith("   query ")]
    assert shown == want and want != sorted(want)
    assert "the 5 with the highest loss at the last checkpoint" in " ".join(z0.split())
    first = next(line for line in z0.splitlines() if line.startswith("   query "))
    assert f"final loss {float(final.max()):.4g}" in first and f"label {int(te.dataset[want[0]][1])}" in first


def test_negative_self_influence_is_flagged_with_the_curvature_that_made_it(run_dir, tmp_path, capsys):
    from lightning_influence.report import collect_report, write_html_report
    from lightning_influence.scores import InfluenceScores, save_scores

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    g = torch.Generator().manual_seed(0)
    values = torch.randn(40, generator=g) * 100  # a Hessian LiSSA of an older version: some scores below 0
    ids = torch.arange(40)
    save_scores(InfluenceScores("lissa", ids, self_influence=values, options={"curvature": "hessian", "damping": "auto"},
                                meta={"damping": 0.0123, "negative_curvature": 7}), run / "influence" / "lissa" / "self_influence")
    rep = next(r for r in collect_report(run) if r.method == "lissa")
    n_neg = int((values < 0).sum())
    assert rep.warnings[0].startswith(f"{n_neg} of 40 self-influence scores are negative (lowest {float(values.min()):.4g})")
    assert "curvature='hessian', damping=0.0123" in rep.warnings[0]
    assert rep.warnings[1].startswith("7 of 40 examples met negative curvature")
    assert main(["report", str(run), "--no-plots", "--top-k", "40"]) == 0
    assert "WARNING: 18 of 40" in capsys.readouterr().out.replace(f"WARNING: {n_neg} of 40", "WARNING: 18 of 40")
    page = write_html_report(run, tmp_path / "p.html", top_k=40).read_text()
    lissa = page.split(">LiSSA self-influence</h2>")[1].split("<section")[0]
    assert lissa.count('<div class="warn">') == 2
    cards = re.split(r'<div class="card(?: \w+)*" data-id=', lissa)[1:]
    flagged = [c for c in cards if "negative self-influence" in c]
    assert len(cards) == 40 and len(flagged) == n_neg
    # no other section claims a warning; an image-free page has no token legend
    assert page.count('<div class="warn">') == 2 and "Token colours" not in page
