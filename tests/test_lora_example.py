"""The LoRA fine-tuning example runs end to end in quick mode: pre-training, a peft LoRA
fine-tune, multi-stage tracing of held-out facts to pre-training sentences."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_lora_finetune_example_quick(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(EXAMPLES))
    mods = {}
    for name in ("multistage_fact_tracing", "lora_finetune"):  # the example imports the world from the other one
        spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
        mods[name] = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, name, mods[name])  # dataclasses need it
        spec.loader.exec_module(mods[name])
    threads = torch.get_num_threads()
    try:
        result = mods["lora_finetune"].main(quick=True)
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert re.search(r"LoRA fine-tuning .*\((\d+) of (\d+) parameters trained, rank 4\)", out), out
    n_adapter, n_total = map(int, re.search(r"\((\d+) of (\d+) parameters trained", out).groups())
    assert n_adapter < n_total / 5  # only the adapters were trained
    assert re.search(r"multi-stage \(4 layers\): MRR \d\.\d{3}  recall@10 \d\.\d{3}", out), out
    rows = re.search(r"example: Q: .+\n((?:   [* ] [+-]\d\.\d{3}e[+-]\d+  .+\n){3})", out)
    assert rows, out
    values = [float(v) for v in re.findall(r"^   [* ] ([+-]\S+)  ", rows.group(1), re.M)]
    assert values == sorted(values, reverse=True), values
    # above chance: 2 sources among 128 sentences, a random ranking's expected MRR is
    # (2/127)·H_127 − 2/128 ≈ 0.070 (quick mode, seed 0: 0.155 multi-stage, 0.154 identity)
    for label in ("multi-stage", "identity fine-tuning preconditioner"):
        assert 0.1 < result[label]["mrr"] <= 1.0 and 0.0 <= result[label]["recall@10"] <= 1.0
