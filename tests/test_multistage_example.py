"""The multi-stage fact-tracing example runs end to end in quick mode and prints its metrics."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "multistage_fact_tracing.py"


def test_fact_tracing_example_quick(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = importlib.util.spec_from_file_location("multistage_fact_tracing", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "multistage_fact_tracing", mod)  # dataclasses need it
    spec.loader.exec_module(mod)
    threads = torch.get_num_threads()
    try:
        result = mod.main(quick=True)
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert re.search(r"all \d+ candidates: MRR \d\.\d{3}  recall@10 \d\.\d{3}", out), out
    assert re.search(r"k-NN narrowed .* MRR \d\.\d{3}  recall@10 \d\.\d{3}", out), out
    assert "4 layer(s) used" in out
    # the three strongest proponents of the first traced question (InfluenceScores.top_pairwise), best first
    rows = re.search(r"example: Q: .+\n((?:   [* ] [+-]\d\.\d{3}e[+-]\d+  .+\n){3})", out)
    assert rows, out
    values = [float(v) for v in re.findall(r"^   [* ] ([+-]\S+)  ", rows.group(1), re.M)]
    assert len(values) == 3
    assert values == sorted(values, reverse=True), values
    for key in ("full", "narrowed"):
        assert 0.0 < result[key]["mrr"] <= 1.0 and 0.0 <= result[key]["recall@10"] <= 1.0
    # far better than chance (2 sources among 128 sentences: MRR of a random ranking ≈ 0.03)
    assert result["full"]["mrr"] > 0.15
