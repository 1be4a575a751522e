"""Quickstart: find mislabeled training examples with all three influence methods.

Trains a small MLP on scikit-learn's bundled digits (no download) with 10% of the training labels
flipped, with ``EKFACInfluence``, ``Z0Influence`` and ``LiSSASelfInfluence`` attached, then
prints how many flipped labels each method puts in its top 10% of self-influence, followed by
the same report that ``lightning-influence report RUN_DIR`` prints.

    python examples/quickstart.py            # full run (about a minute on 2 CPU cores)
    LI_EXAMPLE_QUICK=1 python examples/quickstart.py   # reduced size, for tests
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, Subset

from lightning_influence import EKFACInfluence, IndexedDataset, LiSSAOptions, LiSSASelfInfluence, Z0Influence
from lightning_influence.report import collect_report, render, write_plots
from lightning_influence.demos import MLPClassifier, digits_dataset


def main(quick: bool = False, out_dir: str = "runs/quickstart") -> dict[str, int]:
    """Run the example; returns flipped labels found in the top 10% per method."""
    L.seed_everything(0, verbose=False)
    train, test, flipped = digits_dataset(flip_fraction=0.1, seed=0)
    if quick:
        train, flipped = Subset(train, range(400)), flipped[:400]
        test = Subset(test, range(50))
    epochs = 4 if quick else 12
    train_ids = IndexedDataset(train)
    test_ids = IndexedDataset(test)
    loader = DataLoader(train_ids, batch_size=64, shuffle=True)

    callbacks = [
        EKFACInfluence(probe=train_ids, epochs=max(1, epochs // 3)),
        Z0Influence(probe=train_ids, queries=test_ids, every_n_epochs=1),
        LiSSASelfInfluence(probe=train_ids, options=LiSSAOptions(sampler="logit", sample_size=100, damping=0.01,
                                                                 scale=20.0, depth=40 if quick else 100)),
    ]
    logger = CSVLogger(out_dir, name="", version=None)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=logger, callbacks=callbacks,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    model = MLPClassifier(hidden=64, lr=0.1)
    t0 = time.perf_counter()
    trainer.fit(model, loader)
    seconds = time.perf_counter() - t0
    run_dir = Path(trainer.log_dir)

    reports = {r.method: r for r in collect_report(run_dir, top_k=10)}   # ekfac, z0 and lissa scores
    n = len(train_ids)
    k = n // 10
    found = {}
    for name, key in (("EK-FAC self-influence", "ekfac"), ("Z0-Inf loss variance", "z0"), ("LiSSA (logit sampler)", "lissa")):
        ids, scores = reports[key].self_scores
        top = ids[torch.argsort(scores.double(), descending=True)[:k]]
        found[name] = int(flipped[top].sum())

    print(f"\nTrained {epochs} epochs on {n} digits ({int(flipped.sum())} labels flipped) in {seconds:.1f}s; run dir: {run_dir}\n")
    print(f"Flipped labels among each method's top 10% ({k} examples); random would find ~{k * float(flipped.float().mean()):.0f}:")
    for name, hits in found.items():
        print(f"  {name:<24} {hits:>4} / {k}   (precision {hits / k:.0%})")
    print("\nReport (same as `lightning-influence report %s`):\n" % run_dir)
    all_reports = list(reports.values())
    print(render(all_reports, "table"))
    for p in write_plots(all_reports, run_dir / "influence" / "plots"):
        print(f"wrote {p}")
    return found


if __name__ == "__main__":
    main(quick=os.environ.get("LI_EXAMPLE_QUICK") == "1")
    sys.exit(0)
