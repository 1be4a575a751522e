"""Quickstart: find mislabeled training examples with all three influence methods, and see them.

Trains a small MLP on scikit-learn's bundled digits (no download) with 10% of the training labels
flipped, with ``EKFACInfluence``, ``Z0Influence`` and ``LiSSASelfInfluence`` attached, then
prints how many flipped labels each method puts in its top 10% of self-influence, the report
that ``lightning-influence report RUN_DIR`` prints, and writes the HTML report (the digits
themselves, with the label each was given and the one the model predicts; flipped labels
badged). It saves the trained weights (``RUN_DIR/checkpoints/final.ckpt``) and its data split
(``RUN_DIR/data/``), and ends with the commands that ask questions after training: index the
training gradients, find the training digits behind each misclassified test digit, and add the
answers to the report.

    python examples/quickstart.py            # full run (13 s of CPU time on 2 cores; 50 s wall on a busy machine)
    LI_EXAMPLE_QUICK=1 python examples/quickstart.py   # reduced size, for tests
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, Subset

from lightning_influence import EKFACInfluence, IndexedDataset, LiSSASelfInfluence, Z0Influence
from lightning_influence.demos import DigitsClassifier, digits_dataset  # DigitsClassifier draws its digits (render_example)
from lightning_influence.evaluate import mislabel_detection
from lightning_influence.report import collect_report, collect_views, render, write_html_report, write_plots

MODEL_SPEC = "lightning_influence.demos:DigitsClassifier"  # how the command line names the model class


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
                        enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False)  # the final weights are saved below (save_for_later)
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
    print(render(reports, "table", scores="all", views=collect_views(run_dir)))
    flipped_ids = torch.nonzero(flipped).flatten().tolist()
    for p in write_plots(reports, run_dir / "influence" / "plots", mark_ids=flipped_ids, mark_label="flipped labels"):
        print(f"wrote {p}")
    page = write_html_report(run_dir, reports=reports, mark_ids=flipped_ids, mark_label="flipped label")
    print(f"wrote {page}  (open it in a browser: the digits, their given and predicted labels)")
    print_posthoc_commands(save_for_later(trainer, run_dir, model, train_ids, test, flipped_ids))
    print(f"\ndone in {time.perf_counter() - t_start:.1f}s")
    return found


def save_for_later(trainer, run_dir: Path, model, train_ids, test, flipped_ids: list[int]) -> dict[str, Path]:
    """The trained weights and the data split, so that questions can be asked after training: the
    training set (ids as in training), the misclassified test digits as queries (ids = their test
    positions), and the flipped ids (to mark them in the report)."""
    ckpt = run_dir / "checkpoints" / "final.ckpt"
    trainer.save_checkpoint(ckpt)  # hyper-parameters included: the command line rebuilds the class from them
    data = run_dir / "data"
    data.mkdir(parents=True, exist_ok=True)
    torch.save(train_ids, data / "train.pt")
    x, y = zip(*(test[i] for i in range(len(test))))
    with torch.no_grad():
        wrong = (model(torch.stack(x)).argmax(-1) != torch.stack(y)).nonzero().flatten().tolist()
    torch.save(Subset(IndexedDataset(test), wrong), data / "misclassified.pt")  # ids stay the test positions
    (data / "flipped_ids.txt").write_text("\n".join(map(str, flipped_ids)) + "\n")
    print(f"\nsaved {ckpt} and the data split in {data}/ ({len(wrong)} misclassified test digits as queries)")
    return {"run": run_dir, "ckpt": ckpt, "train": data / "train.pt", "queries": data / "misclassified.pt"}


def posthoc_commands(paths: dict[str, Path]) -> list[list[str]]:
    """The commands that answer a question after training, from the saved checkpoint and split."""
    exe = Path(sys.executable).parent / "lightning-influence"
    exe = _shown(exe) if exe.exists() else "lightning-influence"
    run, ckpt, train, queries = (_shown(paths[k]) for k in ("run", "ckpt", "train", "queries"))
    model = ["--model", MODEL_SPEC, "--checkpoint", ckpt]
    return [
        [exe, "build-index", f"{run}/influence/ekfac/factors", *model, "--train", train, "--out", f"{run}/index"],
        [exe, "query", f"{run}/index", *model, "--queries", queries, "--train", train, "-k", "5", "--opponents",
         "--out", f"{run}/influence/misclassified"],
        [exe, "report", run, "--html"],
    ]


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when it is below it (shorter to read), else absolute."""
    path = Path(path).absolute()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def print_posthoc_commands(paths: dict[str, Path]) -> None:
    print("\nAfter training: which training digits made the model misclassify these test digits? Run:")
    notes = ["index the training gradients (weights and factors must match: a wrong checkpoint is refused)",
             "per misclassified test digit, the 5 training digits that help its true label most (proponents) and "
             "that push it most towards another (opponents)",
             "the report again, with those answers (it keeps the flipped-label marks of the page above)"]
    for note, cmd in zip(notes, posthoc_commands(paths)):
        print(f"  # {note}\n  {shlex.join(cmd)}")


if __name__ == "__main__":
    main(quick=os.environ.get("LI_EXAMPLE_QUICK") == "1")
    sys.exit(0)
