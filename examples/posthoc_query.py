"""Ask questions after training: reload a checkpoint and saved EK-FAC factors, then explain the
test digits the model gets wrong.

Phase 1 trains a digits MLP with ``EKFACInfluence`` and ``ModelCheckpoint`` (10% of training
labels flipped). Phase 2, as a later session would, loads the checkpoint and the factors (which
are validated against the model), scores the misclassified test examples against the whole
training set, prints the strongest proponents and opponents in the training set with their labels,
saves the scores so that ``lightning-influence report`` shows them too, and writes an HTML page
with the digits themselves (rendered from the data, with given and predicted labels). A test
digit's id is its position in the test split, as in the quickstart.

    python examples/posthoc_query.py
    LI_EXAMPLE_QUICK=1 python examples/posthoc_query.py
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, Subset

from lightning_influence import EKFACInfluence, IndexedDataset, InfluenceScorer, load_factors
from lightning_influence.report import collect_report, render, write_html_report
from lightning_influence.scores import InfluenceScores, save_scores
from lightning_influence.demos import DigitsClassifier, digits_dataset


def train(run_root: str, quick: bool) -> Path:
    L.seed_everything(0, verbose=False)
    train_set, _, _ = digits_dataset(flip_fraction=0.1)
    if quick:
        train_set = Subset(train_set, range(300))
    ckpt = ModelCheckpoint(save_last=True)
    trainer = L.Trainer(max_epochs=4 if quick else 15, accelerator="cpu", logger=CSVLogger(run_root, name="posthoc"),
                        callbacks=[EKFACInfluence(epochs=3), ckpt], enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(DigitsClassifier(hidden=64, lr=0.1), DataLoader(IndexedDataset(train_set), batch_size=64, shuffle=True))
    return Path(trainer.log_dir)


def explain(run_dir: Path, quick: bool) -> InfluenceScores:
    train_set, test_set, flipped = digits_dataset(flip_fraction=0.1)
    if quick:
        train_set, flipped = Subset(train_set, range(300)), flipped[:300]
    ckpt = next((run_dir / "checkpoints").glob("last*.ckpt"))
    model = DigitsClassifier.load_from_checkpoint(ckpt).eval()
    # raises if the layers do not match, or if the weights are not the ones the factors were made with
    # (WeightsMismatchError; allow_other_weights=True for a deliberate other checkpoint)
    factors = load_factors(run_dir / "influence" / "ekfac" / "factors", model=model)

    x_test = torch.stack([x for x, _ in test_set])
    y_test = torch.stack([y for _, y in test_set])
    with torch.no_grad():
        wrong = (model(x_test).argmax(-1) != y_test).nonzero().squeeze(1)[:5]
    print(f"\n{len(wrong)} misclassified test digits to explain: ids {wrong.tolist()}")
    test_ids = Subset(IndexedDataset(test_set), wrong.tolist())  # ids stay the test positions
    queries = DataLoader(test_ids, batch_size=16)
    scorer = InfluenceScorer(model, factors)
    result = scorer.pairwise(queries, DataLoader(IndexedDataset(train_set), batch_size=256))   # InfluenceScores
    result.meta["callback"] = "posthoc"
    for item in result.top_pairwise(3).as_rows():
        q = item["query_id"]
        pred = int(model(test_set[q][0][None]).argmax())
        print(f"\ntest #{q}: true {int(test_set[q][1])}, predicted {pred}")
        for tag in ("proponents", "opponents"):
            print(f"  {tag}:")
            for i, s in item[tag]:
                note = "  <- flipped label" if flipped[i] else ""
                print(f"    train #{i:<5} label {int(train_set[i][1])}  score {s:+9.3f}{note}")
    path = save_scores(result, run_dir / "influence" / "posthoc" / "misclassified")
    print("\n" + render([r for r in collect_report(run_dir, top_k=3, queries=2) if r.artifact == path]))
    # the examples are rendered from the data (the digits, given and predicted labels): this page knows more
    # than the artifacts, so a later `lightning-influence report --html` leaves it as it is
    page = write_html_report(run_dir, run_dir / "posthoc.html", datasets={"train": IndexedDataset(train_set), "queries": test_ids},
                             model=model, render=model.render_example, mark_ids=flipped.nonzero().flatten().tolist(),
                             mark_label="flipped label", top_k=5)
    print(f"wrote {page}")
    return result


def main(quick: bool = False, run_root: str = "runs") -> InfluenceScores:
    return explain(train(run_root, quick), quick)


if __name__ == "__main__":
    main(quick=os.environ.get("LI_EXAMPLE_QUICK") == "1")
