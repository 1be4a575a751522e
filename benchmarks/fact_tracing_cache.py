"""Trained fact-tracing worlds cached on disk (benchmarks only): one pre-training + fine-tuning
run per seed (``examples/multistage_fact_tracing.train_stages``), reused by every variant of
``bench_fact_tracing.py`` and across its reruns."""

from __future__ import annotations

import dataclasses
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import multistage_fact_tracing as ex  # noqa: E402


def trained(seed: int, base: "ex.Config", cache: Path) -> "ex.Trained":
    """The run for ``seed`` from ``cache`` (trained and stored on first use)."""
    config = dataclasses.replace(base, seed=seed)
    key = f"s{seed}_n{config.n_subjects}_h{config.hidden}_l{config.layers}_pt{config.pt_epochs}_ft{config.ft_epochs}"
    folder = cache / key
    blob = folder / "trained.pt"
    if blob.exists():
        tr = torch.load(blob, weights_only=False)
        tr.pt_factors_dir, tr.ft_factors_dir = folder / "pt_factors", folder / "ft_factors"
        return tr
    work = cache / (key + ".tmp")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    tr = ex.train_stages(config, work)
    tr.seconds["total"] = time.perf_counter() - t0
    shutil.copytree(tr.pt_factors_dir, work / "pt_factors")
    shutil.copytree(tr.ft_factors_dir, work / "ft_factors")
    torch.save(tr, work / "trained.pt")
    for p in work.iterdir():
        if p.name not in ("pt_factors", "ft_factors", "trained.pt"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
    shutil.rmtree(folder, ignore_errors=True)
    work.rename(folder)
    return trained(seed, base, cache)
