"""Influence scores: the one result type of every method, in memory and on disk.

:class:`InfluenceScores` holds self-influence (``Tensor[n]``), pairwise scores
(``Tensor[q, n]``, positive = the training example lowers the query's loss), or both, with the
ids of the examples they belong to, which method made them and with which options. Every
callback writes it (artifact kind ``"scores"``) and every scorer returns it;
:func:`load_scores` reads any of them back.

On disk (:func:`save_scores`): ``tensors.safetensors`` (``train_ids``, ``self_influence``,
``query_ids``, ``pairwise``, ``per_layer::<layer>``), ``manifest.json`` (method, epoch, step,
options, counts) and a CSV with the same numbers for spreadsheets (self-influence: one row per
example, highest first; pairwise: the top proponents and opponents per query).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from .ranking import TopInfluences, top_examples, top_k
from .storage import ArtifactError, check_tensor, csv_text, manifest_field, read_artifact, write_artifact

__all__ = ["InfluenceScores", "save_scores", "load_scores", "SCORES_KIND"]

SCORES_KIND = "scores"


@dataclass
class InfluenceScores:
    """Scores of one method over a set of training examples.

    Attributes:
        method: what made them: ``"ekfac"``, ``"z0"``, ``"lissa"``, ``"multistage"``, ...
        train_ids: ``LongTensor[n]`` ids of the training examples (column order).
        self_influence: ``Tensor[n]`` (``>= 0``) or ``None``.
        query_ids: ``LongTensor[q]`` or ``None`` (set to ``arange(q)`` when ``pairwise`` is given without).
        pairwise: ``Tensor[q, n]`` (positive = the training example helps the query) or ``None``.
        per_layer: layer name → ``Tensor[n]`` or ``Tensor[q, n]``: the per-layer terms whose sum
            is the total (EK-FAC scorers with ``per_layer=True``); empty otherwise.
        epoch: 0-based epoch after which they were computed during training (``None`` post hoc).
        step: the global step then (``None`` post hoc).
        options: the method's options (JSON-serialisable; saved in the manifest).
        meta: anything else worth keeping (units, timings, the callback's name).

    Raises:
        ValueError: neither kind of score is given, or a shape does not match the ids.
    """

    method: str
    train_ids: Tensor
    self_influence: Optional[Tensor] = None
    query_ids: Optional[Tensor] = None
    pairwise: Optional[Tensor] = None
    per_layer: dict[str, Tensor] = field(default_factory=dict)
    epoch: Optional[int] = None
    step: Optional[int] = None
    options: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.train_ids.dim() != 1:
            raise ValueError(f"train_ids must be LongTensor[n], got shape {tuple(self.train_ids.shape)}")
        n = self.train_ids.shape[0]
        if self.self_influence is None and self.pairwise is None:
            raise ValueError("InfluenceScores needs self_influence or pairwise scores")
        if self.self_influence is not None and tuple(self.self_influence.shape) != (n,):
            raise ValueError(f"self_influence has shape {tuple(self.self_influence.shape)}, expected ({n},) to match train_ids")
        if self.pairwise is not None:
            if self.query_ids is None:
                self.query_ids = torch.arange(self.pairwise.shape[0])
            if tuple(self.pairwise.shape) != (self.query_ids.shape[0], n):
                raise ValueError(f"pairwise has shape {tuple(self.pairwise.shape)}, expected ({self.query_ids.shape[0]}, {n})")
        for name, t in self.per_layer.items():
            if t.shape[-1] != n:
                raise ValueError(f"per_layer[{name!r}] has shape {tuple(t.shape)}, expected its last dimension to be {n}")

    @property
    def n_train(self) -> int:
        return int(self.train_ids.shape[0])

    def top_self(self, k: int = 10) -> list[tuple[int, float]]:
        """The ``k`` most self-influential ``(id, score)`` pairs, highest first (``nan`` left out)."""
        if self.self_influence is None:
            return []
        return top_examples(self.train_ids, self.self_influence, k)

    def top_pairwise(self, k: int = 5) -> TopInfluences:
        """Per query, the ``k`` strongest proponents and opponents."""
        if self.pairwise is None:
            raise ValueError("these scores hold no pairwise matrix")
        up = top_k(self.pairwise, k, self.train_ids, largest=True)
        down = top_k(self.pairwise, k, self.train_ids, largest=False)
        return TopInfluences(self.query_ids, up.ids, up.scores, down.ids, down.scores)


def save_scores(scores: InfluenceScores, directory: str | os.PathLike, top_k: int = 10) -> Path:
    """Write scores atomically as a ``"scores"`` artifact (see the module docstring)."""
    tensors: dict[str, Tensor] = {"train_ids": scores.train_ids.long()}
    extra: dict[str, str] = {}
    if scores.self_influence is not None:
        tensors["self_influence"] = scores.self_influence.float()
        order = torch.argsort(torch.nan_to_num(scores.self_influence.double(), nan=float("-inf")), descending=True)
        rows = [(int(scores.train_ids[i]), f"{float(scores.self_influence[i]):.9g}") for i in order.tolist()]
        extra["self_influence.csv"] = csv_text(["id", "self_influence"], rows)
    if scores.pairwise is not None:
        tensors["pairwise"] = scores.pairwise.float()
        tensors["query_ids"] = scores.query_ids.long()
        rows = []
        for item in scores.top_pairwise(top_k).as_rows():
            for direction in ("proponents", "opponents"):
                for rank, (i, s) in enumerate(item[direction], 1):
                    rows.append([item["query_id"], direction, rank, i, f"{s:.9g}"])
        extra["pairwise_top.csv"] = csv_text(["query_id", "direction", "rank", "train_id", "score"], rows)
    for name, t in scores.per_layer.items():
        tensors[f"per_layer::{name}"] = t.float()
    manifest = {
        "method": scores.method,
        "n_train": scores.n_train,
        "n_query": None if scores.query_ids is None else int(scores.query_ids.shape[0]),
        "epoch": scores.epoch,
        "step": scores.step,
        "options": scores.options,
        "meta": scores.meta,
    }
    return write_artifact(directory, SCORES_KIND, tensors, manifest, extra_files=extra)


def load_scores(directory: str | os.PathLike) -> InfluenceScores:
    """Read scores written by :func:`save_scores` (or any callback), checksums verified.

    Raises:
        ArtifactError: missing, corrupt or edited, not a ``"scores"`` artifact, ids that are not
            ``int64`` vectors, or scores whose lengths differ from the ids' (the message names
            the file and the problem).
    """
    t, m = read_artifact(directory, kind=SCORES_KIND)
    ints, floats = (torch.int64,), (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    train_ids = check_tensor(directory, t, "train_ids", (None,), ints)
    n = train_ids.shape[0]
    self_influence = check_tensor(directory, t, "self_influence", (n,), floats) if "self_influence" in t else None
    query_ids = pairwise = None
    if "pairwise" in t or "query_ids" in t:
        query_ids = check_tensor(directory, t, "query_ids", (None,), ints)
        pairwise = check_tensor(directory, t, "pairwise", (query_ids.shape[0], n), floats)
    per_layer = {}
    for k, v in t.items():
        if k.startswith("per_layer::"):
            per_layer[k.split("::", 1)[1]] = check_tensor(directory, t, k, None, floats)
        elif k not in ("train_ids", "self_influence", "query_ids", "pairwise"):
            raise ArtifactError(f"{directory}: unexpected tensor {k!r} in a scores artifact")
    n_train = manifest_field(directory, m, "n_train", int, n)
    if n_train != n:
        raise ArtifactError(f"{directory}: the manifest says n_train={n_train} but train_ids has {n} entries")
    step, epoch = manifest_field(directory, m, "step", (int, type(None)), None), manifest_field(directory, m, "epoch", (int, type(None)), None)
    try:
        return InfluenceScores(
            method=manifest_field(directory, m, "method", str, "unknown"),
            train_ids=train_ids,
            self_influence=self_influence,
            query_ids=query_ids,
            pairwise=pairwise,
            per_layer=per_layer,
            epoch=epoch,
            step=step,
            options=dict(manifest_field(directory, m, "options", (dict, type(None)), None) or {}),
            meta=dict(manifest_field(directory, m, "meta", (dict, type(None)), None) or {}),
        )
    except (ValueError, TypeError) as e:
        raise ArtifactError(f"{directory}: inconsistent scores artifact: {e}") from e
