"""Quickstart: find mislabeled training examples with all three influence methods, and see them.

Trains a small MLP on scikit-learn's bundled digits (no download) with 10% of the training labels
flipped, with ``EKFACInfluence``, ``Z0Influence`` and ``LiSSASelfInfluence`` attached, then
prints how many flipped labels each method puts in its top 10% of self-influence, the report
that ``lightning-influence report RUN_DIR`` prints, and writes the HTML report (the digits
themselves, with the label each was given and the one the model predicts; flipped labels
badged).

    python examples/quickstart.py            # full run (about 20 s of work on 2 CPU cores)
    LI_EXAMPLE_QUICK=1 python examples/quickstart.py   # reduced size, for tests
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, Subset

from lightning_influence import EKFACInfluence, IndexedDataset, LiSSASelfInfluence, Z0Influence
from lightning_influence.demos import MLPClassifier, digits_dataset
from lightning_influence.evaluate import mislabel_detection
from lightning_influence.report import collect_report, render, write_html_report, write_plots

_PIXELS = load_digits().data  # the statistics digits_dataset standardised with (order does not matter)
PIXEL_MEAN, PIXEL_STD = _PIXELS.mean(0), _PIXELS.std(0) + 1e-6


class DigitsClassifier(MLPClassifier):
    """The demo MLP, plus how to show one of its examples: the 64 standardised features are an
    8×8 image of ink levels 0…16. The influence callbacks call ``render_example`` at the end of
    fit to save pictures of the top examples for the HTML report."""

    def render_example(self, example):
        x, _ = example
        ink = x.double().numpy() * PIXEL_STD + PIXEL_MEAN   # undo digits_dataset's standardisation
        return 1.0 - (ink / 16.0).clip(0, 1).reshape(8, 8)  # dark ink on white, values in [0, 1]


def quiet_lightning() -> None:
    """Keep the demo's output to what it is about: Lightning's start-up banners and the hints
    that do not apply to a 1,437-example CPU run."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for pattern in (".*validation_step.*", ".*LeafSpec.*", ".*log_every_n_steps.*", ".*does not have many workers.*"):
        warnings.filterwarnings("ignore", message=pattern)


def main(quick: bool = False, out_dir: str = "runs/quickstart") -> dict[str, int]:
    """Run the example; returns flipped labels found in the top 10% per method."""
    quiet_lightning()
    # tiny matrices: one intra-op thread avoids OpenMP spin-waiting on a small or busy CPU
    torch.set_num_threads(int(os.environ.get("LI_EXAMPLE_THREADS", "1")))
    t_start = time.perf_counter()
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
        LiSSASelfInfluence(probe=train_ids),  # defaults: every example, random sampler, depth 20
    ]
    logger = CSVLogger(out_dir, name="", version=None)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=logger, callbacks=callbacks,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    model = DigitsClassifier(hidden=64, lr=0.1)
    t0 = time.perf_counter()
    trainer.fit(model, loader)
    seconds = time.perf_counter() - t0
    run_dir = Path(trainer.log_dir)

    reports = collect_report(run_dir, top_k=10)
    self_scores = {r.method: r for r in reports if r.self_scores is not None}   # ekfac, z0 and lissa
    n = len(train_ids)
    k = n // 10
    found = {}
    print(f"\nTrained {epochs} epochs on {n} digits ({int(flipped.sum())} labels flipped) in {seconds:.1f}s; run dir: {run_dir}\n")
    print(f"Flipped labels among each method's top 10% of self-influence ({k} examples); random would find "
          f"~{k * float(flipped.float().mean()):.0f}:")
    for key in ("ekfac", "z0", "lissa"):
        ids, scores = self_scores[key].self_scores
        quality = mislabel_detection(scores, flipped[ids], fractions=(0.1,))   # lightning_influence.evaluate
        hits = round(quality.precision[0.1] * k)
        found[self_scores[key].title] = hits
        print(f"  {self_scores[key].title:<24} {hits:>4} / {k}   (precision {hits / k:.0%}; AUROC {quality.auroc:.3f}, "
              f"average precision {quality.average_precision:.3f})")
    print("\nReport (same as `lightning-influence report %s`):\n" % run_dir)
    print(render(reports, "table", scores="all"))
    flipped_ids = torch.nonzero(flipped).flatten().tolist()
    for p in write_plots(reports, run_dir / "influence" / "plots", mark_ids=flipped_ids, mark_label="flipped labels"):
        print(f"wrote {p}")
    page = write_html_report(run_dir, reports=reports, mark_ids=flipped_ids, mark_label="flipped label")
    print(f"wrote {page}  (open it in a browser: the digits, their given and predicted labels)")
    print(f"\ndone in {time.perf_counter() - t_start:.1f}s")
    return found


if __name__ == "__main__":
    main(quick=os.environ.get("LI_EXAMPLE_QUICK") == "1")
    sys.exit(0)
