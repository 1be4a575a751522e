"""``lightning-influence query``: answers from an index, printed and saved as a scores artifact that
``lightning-influence report`` reads."""

from __future__ import annotations

import json
import textwrap

import torch
from torch.utils.data import DataLoader

from lightning_influence.cli import main
from lightning_influence.commands._objects import load_object
from lightning_influence.ekfac.fit import fit_factors
from lightning_influence.index import build_index
from lightning_influence.report import collect_report
from lightning_influence.scores import load_scores
from scaffold import quiet_trainer

SPEC = textwrap.dedent('''
    import torch
    from torch.utils.data import TensorDataset
    from lightning_influence import IndexedDataset
    from lightning_influence.demos import MLPClassifier

    def model():
        torch.manual_seed(0)
        return MLPClassifier(d_in=5, hidden=6, n_classes=3)

    def _data(n, seed):
        g = torch.Generator().manual_seed(seed)
        return TensorDataset(torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g))

    def train():
        return IndexedDataset(_data(50, 0))

    def queries():
        return IndexedDataset(_data(4, 1), offset=900)
''')


def test_query_prints_and_saves_the_index_top_k(tmp_path, capsys):
    spec = tmp_path / "spec.py"
    spec.write_text(SPEC)
    model = load_object(f"{spec}:model")()
    torch.save({"state_dict": model.state_dict()}, tmp_path / "w.ckpt")
    train, queries = load_object(f"{spec}:train")(), load_object(f"{spec}:queries")()
    factors = fit_factors(model, DataLoader(train, batch_size=10))
    index = build_index(model, factors, DataLoader(train, batch_size=10), tmp_path / "idx", compression="sjlt", dim=8)
    want = index.search(DataLoader(queries, batch_size=4), k=3, opponents=True)
    out_dir = tmp_path / "run" / "influence" / "query"
    args = ["query", str(tmp_path / "idx"), "--model", f"{spec}:model", "--checkpoint", str(tmp_path / "w.ckpt"),
            "--queries", f"{spec}:queries", "-k", "3", "--opponents"]
    assert main(args + ["--out", str(out_dir)]) == 0
    out = capsys.readouterr().out
    for r, q in enumerate(want.query_ids.tolist()):
        block = out.split(f"query {q}:")[1].split("query ")[0]
        helps, hurts = block.split("proponents (help)")[1].split("opponents (hurt)")
        listed = lambda text: [int(line.split()[1]) for line in text.splitlines() if line.strip()[:1].isdigit()]  # noqa: E731
        assert listed(helps) == want.ids[r].tolist() and listed(hurts) == want.opponent_ids[r].tolist()
    saved = load_scores(out_dir)
    top = saved.top_pairwise(3)
    assert top.ids.tolist() == want.ids.tolist() and top.opponent_ids.tolist() == want.opponent_ids.tolist()
    torch.testing.assert_close(top.scores, want.scores.float())
    # the report reads the saved answer
    reports = collect_report(tmp_path / "run", top_k=3)
    assert [p["proponents"] for p in reports[0].pairwise_top] == [
        [(int(i), float(s)) for i, s in zip(want.ids[r].tolist(), want.scores[r].float().tolist())] for r in range(4)]
    assert main(args + ["--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)[0]["pairwise_top"]
    assert [[p["id"] for p in r["proponents"]] for r in rows] == want.ids.tolist()


def test_query_reports_bad_input(tmp_path, capsys):
    assert main(["query", str(tmp_path / "none"), "--model", "torch.nn:Linear", "--queries", "x:y"]) == 2
    assert "error" in capsys.readouterr().err
    assert main(["query", str(tmp_path), "--model", "nocolon", "--queries", "a:b"]) == 2
    assert "module.path:name" in capsys.readouterr().err


def _trained_index(tmp_path):
    """An index of the SPEC's model and a Lightning checkpoint of it (hyper-parameters saved)."""
    spec = tmp_path / "spec.py"
    spec.write_text(SPEC)
    model = load_object(f"{spec}:model")()
    train = load_object(f"{spec}:train")()
    trainer = quiet_trainer(None, max_epochs=1)
    trainer.fit(model, DataLoader(train, batch_size=10))
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    factors = fit_factors(model, DataLoader(train, batch_size=10))
    build_index(model, factors, DataLoader(train, batch_size=10), tmp_path / "idx", compression="exact")
    return spec, model


def test_query_builds_a_class_from_its_checkpoint_and_shows_the_examples(tmp_path, capsys):
    spec, model = _trained_index(tmp_path)
    base = ["query", str(tmp_path / "idx"), "--model", "lightning_influence.demos:MLPClassifier",
            "--queries", f"{spec}:queries", "-k", "2"]
    # the command: a class that needs arguments, a Lightning checkpoint (its hyper-parameters build it)
    assert main(base + ["--checkpoint", str(tmp_path / "run.ckpt"), "--train", f"{spec}:train"]) == 0
    out = capsys.readouterr().out
    train = load_object(f"{spec}:train")()
    queries = load_object(f"{spec}:queries")()
    with torch.no_grad():
        for q in range(900, 904):
            x, y = queries[q - 900][1]
            pred = int(model(x[None]).argmax())
            assert f"query {q}:  label {int(y)} · predicted {pred}" in out
    first = next(line for line in out.splitlines() if line.strip().startswith("1."))
    i = int(first.split()[1])
    assert f"label {int(train[i][1][1])} · predicted" in first and "[0]=" in first  # the training row, shown
    # a plain state dict: the class is built with defaults and does not fit -> what to pass, not a traceback
    assert main(base + ["--checkpoint", str(tmp_path / "plain.pt")]) == 2
    err = capsys.readouterr().err
    assert "does not fit the model built as lightning_influence.demos:MLPClassifier()" in err
    assert "net.0.weight: checkpoint (6, 5), model (32, 64)" in err and "--model-kwargs" in err
    kwargs = '{"d_in": 5, "hidden": 6, "n_classes": 3}'
    assert main(base + ["--checkpoint", str(tmp_path / "plain.pt"), "--model-kwargs", kwargs]) == 0
    assert main(base + ["--checkpoint", str(tmp_path / "plain.pt"), "--model-kwargs", "{hidden: 6}"]) == 2
    assert "is not JSON" in capsys.readouterr().err


def test_query_refuses_weights_the_index_was_not_built_with(tmp_path, capsys):
    spec, model = _trained_index(tmp_path)
    base = ["query", str(tmp_path / "idx"), "--model", "lightning_influence.demos:MLPClassifier", "--model-kwargs",
            '{"d_in": 5, "hidden": 6, "n_classes": 3}', "--queries", f"{spec}:queries"]
    assert main(base) == 2  # untrained weights of the same shape
    err = capsys.readouterr().err
    err = err[err.index("error: "):]  # (Lightning's loggers may have written before)
    assert "not the ones the index at" in err and "--allow-other-weights" in err and "Traceback" not in err
    assert main(base + ["--allow-other-weights"]) == 0
