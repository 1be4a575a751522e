"""The evaluation matrix's tasks (issue 21), shared by the benchmarks that score them
(``bench_matrix.py``, ``bench_index.py``'s rules part, ``bench_factor_precision.py``): no
``bench_*.py`` imports another, so the tasks live here.

Each :class:`Task` has a training recipe (:class:`Recipe`), a model and data builder per seed, and
a cache key (:meth:`Task.key`) under :data:`OUT` that names its recipe, so a retrained ground
truth is reused only by the same task. :func:`build_tasks` gives the six tasks; :func:`prepare`
one (task, seed)'s data, trained model, loaders and factors.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lightning_influence.ekfac.fit import fit_factors  # noqa: E402

__all__ = ["ROOT", "OUT", "FLIP", "Recipe", "Task", "train", "digits_data", "image_data", "lm_data", "textcls_data",
           "build_tasks", "prepare"]

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out" / "matrix"
FLIP = 0.1


# ------------------------------------------------------------------------------------------
# Tasks
# ------------------------------------------------------------------------------------------
@dataclass
class Recipe:
    """How a task's models are trained (its fields name the cache, so a change retrains)."""

    optimizer: str  # "sgd" (common.train_classifier) or "adamw"
    lr: float
    epochs: int
    weight_decay: float = 0.0
    batch: int = 32


@dataclass
class Task:
    name: str
    stratum: str
    note: str
    recipe: Recipe
    make_model: Callable[[int], nn.Module]  # seed -> fresh model
    make_data: Callable[[int], tuple[Any, Any, Optional[torch.Tensor]]]  # seed -> (train, query, flipped)
    collate: Optional[Callable] = None
    loss: str = "classification"  # or "hf" (the model returns .loss)
    config: dict = field(default_factory=dict)

    def key(self, seed: int, n_train: int, n_query: int) -> str:
        blob = json.dumps({"recipe": vars(self.recipe), "config": self.config, "seed": seed, "n": n_train, "q": n_query,
                           "flip": FLIP}, sort_keys=True)
        return f"{self.name}/seed={seed}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def train(task: Task, model: nn.Module, data: Any, seed: int,
          on_step: Optional[Callable[[nn.Module, int, int], None]] = None) -> nn.Module:
    """``model`` trained on ``data`` with the task's recipe, returned in eval mode. SGD:
    ``common.train_classifier``'s recipe (momentum 0.9, batch 32); AdamW: the recipe's batch and
    weight decay; both shuffled with ``seed``. ``on_step(model, step, total)`` is called after
    each optimizer step (1-based; e.g. to take snapshots), with the model in training mode."""
    r = task.recipe
    if r.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=r.lr, momentum=0.9)
        loader = DataLoader(data, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(seed))
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=r.lr, weight_decay=r.weight_decay)
        loader = DataLoader(data, batch_size=r.batch, shuffle=True, collate_fn=task.collate,
                            generator=torch.Generator().manual_seed(seed))
    total, step = r.epochs * len(loader), 0
    model.train()
    for _ in range(r.epochs):
        for b in loader:
            opt.zero_grad()
            loss = model(**b).loss if task.loss == "hf" else F.cross_entropy(model(b[0]), b[1])
            loss.backward()
            opt.step()
            step += 1
            if on_step is not None:
                on_step(model, step, total)
    return model.eval()


def _flip(y: torch.Tensor, n_classes: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    n = y.numel()
    idx = torch.randperm(n, generator=g)[: int(round(FLIP * n))]
    y = y.clone()
    y[idx] = (y[idx] + torch.randint(1, n_classes, (idx.numel(),), generator=g)) % n_classes
    flipped = torch.zeros(n, dtype=torch.bool)
    flipped[idx] = True
    return y, flipped


def digits_data(n_train: int, n_query: int):
    def make(seed: int):
        from lightning_influence.demos import digits_dataset

        tr, te, flipped = digits_dataset(flip_fraction=FLIP, seed=seed)
        x, y = tr.tensors
        return TensorDataset(x[:n_train], y[:n_train]), TensorDataset(*(t[:n_query] for t in te.tensors)), flipped[:n_train]

    return make


def image_data(n_train: int, n_query: int, noise: float = 1.5):
    """Ten random smooth 8×8 class templates (fixed per seed) plus Gaussian noise."""

    def make(seed: int):
        g = torch.Generator().manual_seed(1000 + seed)
        templates = F.avg_pool2d(torch.randn(10, 1, 10, 10, generator=g), 3, stride=1)  # 8x8, smooth
        templates = templates / templates.std()
        n = n_train + n_query
        y = torch.randint(0, 10, (n,), generator=g)
        x = (templates[y] + noise * torch.randn(n, 1, 8, 8, generator=g)).reshape(n, 64)
        ytr, flipped = _flip(y[:n_train], 10, g)
        return TensorDataset(x[:n_train], ytr), TensorDataset(x[n_train:], y[n_train:]), flipped

    return make


def lm_data(n_train: int, n_query: int, vocab: int):
    def make(seed: int):
        from lightning_influence.demos import synthetic_token_dataset

        data = synthetic_token_dataset(n_train + n_query, vocab_size=vocab, min_len=8, max_len=16, seed=seed)
        return data[:n_train], data[n_train:], None

    return make


def textcls_data(n_train: int, n_query: int, vocab: int, n_classes: int = 3):
    def make(seed: int):
        from lightning_influence.demos import synthetic_sequence_classification

        data = synthetic_sequence_classification(n_train + n_query, n_classes=n_classes, vocab_size=vocab, min_len=8, max_len=16,
                                                 seed=seed)
        train, query = data[:n_train], data[n_train:]
        g = torch.Generator().manual_seed(2000 + seed)
        y, flipped = _flip(torch.stack([d["labels"] for d in train]), n_classes, g)
        train = [{"input_ids": d["input_ids"], "labels": y[i]} for i, d in enumerate(train)]
        return train, query, flipped

    return make


def build_tasks(n_train: int, n_query: int) -> dict[str, Task]:
    from lightning_influence.data import classification_collate, lm_collate
    from lightning_influence.demos import CNNClassifier, MLPClassifier, tiny_causal_lm, tiny_sequence_classifier

    def seeded(f):
        def make(seed: int):
            torch.manual_seed(seed)
            return f(seed)
        return make

    mlp = seeded(lambda s: MLPClassifier(d_in=64, hidden=64, n_classes=10))
    cnn = seeded(lambda s: CNNClassifier(channels=(8, 16)))
    vocab = 48  # not the hidden width: a layer as wide as the vocabulary counts as an embedding
    tasks = [
        Task("mlp_digits_sgd_short", "mlp", "MLP 64-64-10 on digits, SGD lr 0.1 momentum 0.9, 2 epochs (under-fitted)",
             Recipe("sgd", 0.1, 2), mlp, digits_data(n_train, n_query), config={"hidden": 64}),
        Task("mlp_digits_adamw_long", "mlp", "MLP 64-64-10 on digits, AdamW lr 3e-3 weight decay 0.1, 150 epochs (training losses ≈ 0)",
             Recipe("adamw", 3e-3, 150, 0.1), mlp, digits_data(n_train, n_query), config={"hidden": 64}),
        Task("cnn_digits_sgd_long", "cnn", "CNN (8, 16 channels) on digits, SGD lr 0.05 momentum 0.9, 60 epochs (training losses ≈ 0)",
             Recipe("sgd", 0.05, 60), cnn, digits_data(n_train, n_query), config={"channels": [8, 16]}),
        Task("cnn_images_adamw", "cnn", "CNN (8, 16 channels) on generated 8×8 template+noise images, AdamW lr 3e-3 weight decay 0.05, 30 epochs",
             Recipe("adamw", 3e-3, 30, 0.05), cnn, image_data(n_train, n_query), config={"channels": [8, 16], "noise": 1.5}),
        Task("gpt_neox_text", "transformer", f"GPT-NeoX 2 layers hidden 32 on generated bigram text (vocab {vocab}, 8-16 tokens), AdamW lr 3e-3, 5 epochs",
             Recipe("adamw", 3e-3, 5, 0.0, 16), seeded(lambda s: tiny_causal_lm("gpt_neox", vocab_size=vocab, hidden=32, layers=2, heads=2,
                                                                              max_len=32, seed=s)),
             lm_data(n_train, n_query, vocab), collate=lm_collate, loss="hf", config={"vocab": vocab}),
        Task("bert_textcls_adamw", "transformer", f"BERT 2 layers hidden 32 classifier on generated 3-class bigram text (vocab {vocab}), AdamW lr 3e-3 weight decay 0.1, 40 epochs (training losses ≈ 0)",
             Recipe("adamw", 3e-3, 40, 0.1, 16), seeded(lambda s: tiny_sequence_classifier("bert", n_classes=3, vocab_size=vocab, hidden=32,
                                                                                          layers=2, heads=2, max_len=32, seed=s)),
             textcls_data(n_train, n_query, vocab), collate=classification_collate, loss="hf", config={"vocab": vocab}),
    ]
    return {t.name: t for t in tasks}


# ------------------------------------------------------------------------------------------
# One (task, seed): train, fit, score every candidate, retrain subsets (cached)
# ------------------------------------------------------------------------------------------


def prepare(task: Task, seed: int, factors: bool = True):
    """Data, the trained model, loaders and factors (``None`` unless ``factors``) of one (task, seed)."""
    train_set, query_set, flipped = task.make_data(seed)
    model = train(task, task.make_model(seed), train_set, seed)
    tl = DataLoader(train_set, batch_size=64, shuffle=False, collate_fn=task.collate)
    ql = DataLoader(query_set, batch_size=64, shuffle=False, collate_fn=task.collate)
    return train_set, query_set, flipped, model, tl, ql, fit_factors(model, tl, progress=False) if factors else None
