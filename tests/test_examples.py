"""Every example runs to completion in its reduced-size mode."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str, tmp_path, *args: str) -> str:
    env = dict(os.environ, LI_EXAMPLE_QUICK="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_quickstart(tmp_path):
    out = run_example("quickstart.py", tmp_path)
    assert "Flipped labels among each method's top 10%" in out
    for name in ("EK-FAC self-influence", "Z0-Inf self-influence", "LiSSA self-influence"):
        assert name in out
    assert "most self-influential" in out
    assert len(list((tmp_path / "runs" / "quickstart").rglob("*.png"))) == 4
    page_path = next((tmp_path / "runs" / "quickstart").rglob("plots/report.html"))
    page = page_path.read_text()
    assert page.count('src="data:image/png;base64,') >= 3 * 10 and "flipped label" in page  # the digits themselves
    # the post-hoc commands it prints, run verbatim from where it ran
    commands = [line.strip() for line in out.split("After training:")[1].splitlines()
                if "lightning-influence " in line and not line.strip().startswith("#")]
    assert [shlex.split(c)[1] for c in commands] == ["build-index", "query", "report"]
    outputs = []
    for c in commands:
        proc = subprocess.run(shlex.split(c), cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, c + "\n" + proc.stderr[-3000:]
        outputs.append(proc.stdout + proc.stderr)
    n_wrong = int(out.split(" misclassified test digits as queries")[0].split("(")[-1])
    queries = [line for line in outputs[1].splitlines() if line.startswith("   query ")]
    assert len(queries) == n_wrong > 0 and all("(≠ label) · image 8×8" in q for q in queries)  # shown, not ids alone
    after = page_path.read_text()
    assert ">EK-FAC index train-test influence</h2>" in after and "kept the" in outputs[2]
    badge = '<span class="badge mark">flipped label</span>'
    assert after.count(badge) >= page.count(badge) > 0  # the training run's marks are kept


def test_shipped_lightningcli_config_runs_one_epoch(tmp_path):
    import yaml

    from lightning_influence.cli import main as report_main
    from lightning_influence.ekfac.factors import load_factors
    from lightning_influence.scores import load_scores

    cfg = yaml.safe_load((ROOT / "examples" / "configs" / "digits_all_methods.yaml").read_text())
    cfg["trainer"]["max_epochs"] = 1
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "runs")
    cbs = cfg["trainer"]["callbacks"]
    cbs[0]["init_args"]["probe"]["init_args"]["limit"] = 100
    cbs[1]["init_args"]["probe"]["init_args"]["limit"] = 100
    cbs[2]["init_args"]["options"]["depth"] = 10
    cbs[2]["init_args"]["probe"]["init_args"]["limit"] = 50
    cfg["data"]["init_args"]["limit"] = 200
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "cli_train.py"), "fit", "--config", str(path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "digits" / "version_0"
    factors = load_factors(run / "influence" / "ekfac" / "factors")
    # 200 examples in batches of 64, one epoch: 4 training steps, fewer than the 8 updates update_every_n_steps="auto"
    # gives any run at least, so it updates at every step and the factors count every example
    assert factors.layer_names == ["net.0", "net.2"] and factors.n_examples == 200
    assert load_scores(run / "influence" / "ekfac" / "self_influence").train_ids.tolist() == list(range(100))
    assert load_scores(run / "influence" / "lissa" / "self_influence").train_ids.tolist() == list(range(50))
    assert report_main(["report", str(run), "--no-plots"]) == 0


def test_huggingface_lm_example(tmp_path):
    out = run_example("huggingface_lm.py", tmp_path)
    assert "generated answer" in out and "most helpful training sequences (proponents)" in out
    lines = out.split("most helpful training sequences (proponents):")[1].splitlines()[1:6]
    assert len(lines) == 5 and all(" = " in line for line in lines)
    gap = float(out.split("largest gap ")[1].split(")")[0])
    assert gap < 1e-3 * max(abs(float(line.split()[0])) for line in lines)  # per-token scores add up to the sequence's
    page = (tmp_path / "runs" / "huggingface_lm" / "influence" / "plots" / "report.html").read_text()
    assert "EK-FAC train-test influence" in page and page.count('title="') >= 5 * 5  # per-token scores on the cards


def test_posthoc_query_example(tmp_path):
    out = run_example("posthoc_query.py", tmp_path)
    assert "misclassified test digits to explain" in out and "proponents:" in out and "opponents:" in out
    from lightning_influence.scores import load_scores

    saved = load_scores(next((tmp_path / "runs").rglob("posthoc/misclassified")))
    assert saved.method == "ekfac" and saved.pairwise.shape == (saved.query_ids.shape[0], 300)
    ids = [int(i) for i in out.split("misclassified test digits to explain: ids ")[1].split("]")[0].strip("[").split(",")]
    assert saved.query_ids.tolist() == ids  # a test digit's id is its position in the test split
    page = next((tmp_path / "runs").rglob("posthoc.html")).read_text()
    assert "no rendered example" not in page and page.count('src="data:image/png;base64,') >= len(ids) * 11
