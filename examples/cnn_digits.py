"""A CNN on digits images with all three influence methods.

Trains ``CNNClassifier`` (two ``nn.Conv2d`` layers and a linear head) on scikit-learn's bundled
8 × 8 digits (no download) seen as ``1 × 8 × 8`` images, with 10% of the training labels
flipped, and with ``EKFACInfluence`` (Kronecker factors of the convolutions over unfolded
patches, and of the head), ``Z0Influence`` and ``LiSSASelfInfluence`` attached. It then prints

1. how many flipped labels each method puts in its top 10% of self-influence;
2. for a few misclassified test images, the most helpful and most harmful training images by
   EK-FAC pairwise influence (``InfluenceScorer.search``), drawn as text;
3. the same report that ``lightning-influence report RUN_DIR`` prints.

    python examples/cnn_digits.py                     # full run (3 min of CPU time on 2 cores; 16 min wall measured on a busy machine)
    LI_EXAMPLE_QUICK=1 python examples/cnn_digits.py  # reduced size, for tests
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

from lightning_influence import (
    EKFACInfluence,
    IndexedDataset,
    InfluenceScorer,
    LiSSAOptions,
    LiSSASelfInfluence,
    Z0Influence,
    load_factors,
)
from lightning_influence.demos import CNNClassifier, digits_dataset
from lightning_influence.report import collect_report, render

SHADES = " .:-=+*#%@"


def ascii_digit(x: torch.Tensor) -> list[str]:
    """An 8 × 8 image of raw intensities ``0 … 16`` as 8 lines of text."""
    idx = (x.reshape(8, 8) / 16 * (len(SHADES) - 1)).round().long().clamp(0, len(SHADES) - 1)
    return ["".join(SHADES[int(v)] * 2 for v in row) for row in idx]


def side_by_side(images: list[list[str]], captions: list[str]) -> str:
    width = 18
    lines = ["".join(c[:width].ljust(width) for c in captions)]
    lines += ["".join(img[r].ljust(width) for img in images) for r in range(8)]
    return "\n".join(lines)


def main(quick: bool = False, out_dir: str = "runs/cnn_digits") -> dict[str, int]:
    """Run the example; returns flipped labels found in the top 10% of self-influence per method."""
    L.seed_everything(0, verbose=False)
    train, test, flipped = digits_dataset(flip_fraction=0.1, seed=0)
    raw_train, raw_test, _ = digits_dataset(flip_fraction=0.1, seed=0, standardize=False)  # for drawing
    if quick:
        train, flipped = Subset(train, range(400)), flipped[:400]
        test = Subset(test, range(60))
    epochs = 4 if quick else 12
    train_ids, test_ids = IndexedDataset(train), IndexedDataset(test)  # a test digit's id is its position in the test split
    loader = DataLoader(train_ids, batch_size=64, shuffle=True)

    # every step of the last third of training (a small data set: cheap, and full-rank factors)
    ekfac = EKFACInfluence(probe=train_ids, epochs=max(1, epochs // 3), update_every_n_steps=1)
    callbacks = [
        ekfac,
        Z0Influence(probe=train_ids, queries=test_ids, every_n_epochs=1),
        # LiSSA on the head only: convolutions would work too, at more cost per step
        LiSSASelfInfluence(probe=train_ids, options=LiSSAOptions(sampler="logit", sample_size=100, params="last_layer",
                                                                 damping=0.01, scale=20.0, depth=40 if quick else 100)),
    ]
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=CSVLogger(out_dir, name="", version=None),
                        callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False)
    model = CNNClassifier(channels=(8, 16), lr=0.2)
    t0 = time.perf_counter()
    trainer.fit(model, loader)
    seconds = time.perf_counter() - t0
    run_dir = Path(trainer.log_dir)

    factors = load_factors(ekfac.factors_path, model=model)
    print(f"\nTrained {epochs} epochs on {len(train_ids)} digit images ({int(flipped.sum())} labels flipped) in "
          f"{seconds:.1f}s; run dir: {run_dir}")
    print("EK-FAC layers (gradient shape d_out × (patch size + bias)):",
          ", ".join(f"{n} {f.grad_shape[0]}×{f.grad_shape[1]}" for n, f in factors.layers.items()))

    # 1. mislabelled examples by self-influence
    reports = {r.method: r for r in collect_report(run_dir, top_k=10)}
    k = len(train_ids) // 10
    found = {}
    for name, key in (("EK-FAC self-influence", "ekfac"), ("Z0-Inf mean loss", "z0"), ("LiSSA (logit sampler)", "lissa")):
        ids, scores = reports[key].self_scores
        top = ids[torch.argsort(scores.double(), descending=True)[:k]]
        found[name] = int(flipped[top].sum())
    print(f"\nFlipped labels among each method's top 10% ({k} examples); random would find "
          f"~{k * float(flipped.float().mean()):.0f}:")
    for name, hits in found.items():
        print(f"  {name:<24} {hits:>4} / {k}   (precision {hits / k:.0%})")

    # 2. proponents and opponents of misclassified test images (EK-FAC pairwise influence)
    model.eval()
    with torch.no_grad():
        x_test = torch.stack([test_ids[i][1][0] for i in range(len(test_ids))])
        y_test = torch.tensor([int(test_ids[i][1][1]) for i in range(len(test_ids))])
        pred = model(x_test).argmax(-1)
    wrong = (pred != y_test).nonzero().flatten()[:3].tolist() or [0]
    print(f"\nmisclassified test images to explain: {len(wrong)} (test accuracy {float((pred == y_test).float().mean()):.3f})")
    scorer = InfluenceScorer(model, factors)
    top = scorer.search(DataLoader(Subset(test_ids, wrong), batch_size=len(wrong)),
                        DataLoader(train_ids, batch_size=256), k=3, opponents=True)
    for row, i in enumerate(wrong):
        images = [ascii_digit(raw_test.tensors[0][i])]
        captions = [f"test y={int(y_test[i])} p={int(pred[i])}"]
        for kind, ids, scores in (("+", top.ids[row], top.scores[row]), ("-", top.opponent_ids[row], top.opponent_scores[row])):
            for tid, s in zip(ids.tolist(), scores.tolist()):
                y = train_ids[tid][1][1]
                images.append(ascii_digit(raw_train.tensors[0][tid]))
                captions.append(f"{kind}#{tid} y={int(y)}{'*' if flipped[tid] else ''} {s:+.1g}")
        print(f"\nproponents (+) and opponents (-) of test image {i} (* = flipped training label):")
        print(side_by_side(images, captions))

    print(f"\nReport (same as `lightning-influence report {run_dir}`):\n")
    print(render(list(reports.values()), "table"))
    return found


if __name__ == "__main__":
    main(quick=os.environ.get("LI_EXAMPLE_QUICK") == "1")
    sys.exit(0)
