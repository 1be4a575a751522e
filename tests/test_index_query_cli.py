"""``lightning-influence query``: answers from an index, printed and saved as a scores artifact that
``lightning-influence report`` reads."""

from __future__ import annotations

import json
import textwrap

import torch
from torch.utils.data import DataLoader

from lightning_influence.cli import main
from lightning_influence.commands.query import load_object
from lightning_influence.ekfac.fit import fit_factors
from lightning_influence.index import build_index
from lightning_influence.report import collect_report
from lightning_influence.scores import load_scores

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
        listed = [int(line.split()[1]) for line in block.splitlines()[1:] if line.strip()[:1].isdigit()]
        assert listed == want.ids[r].tolist()
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
