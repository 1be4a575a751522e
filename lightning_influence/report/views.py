"""Show training examples as what they are: images, text, highlighted tokens or table rows.

An influence report that lists "example 812" says nothing until the reader sees example 812.
This module turns a dataset item into an :class:`ExampleView` (a small, JSON-serialisable
description that the HTML report draws), with the model's predicted label when asked, and saves
the views of a run's top examples as an artifact (kind ``"examples"``) so that the report can
show them later without the data. Items are found by example id with
:func:`lightning_influence.data.find_examples`.

How an item is shown (first match wins):

1. a ``render(example)`` hook, given by the user or defined by the LightningModule as
   ``render_example(self, example)``, returning a ``str`` (text), an image (``Tensor`` /
   ``ndarray`` ``[H, W]``, ``[C, H, W]`` or ``[H, W, C]``, or a PIL image), a ``list[str]``
   (tokens), a ``dict`` with any of the keys ``image``, ``text``, ``tokens``, ``table``,
   ``label``, ``predicted``, or an :class:`ExampleView`;
2. dict items with ``input_ids`` (Hugging Face style): tokens, decoded one at a time with a
   ``tokenizer`` (anything with ``decode(list[int]) -> str``), or the ids themselves without one;
   ``prompt_ids`` + ``answer_ids`` items (``qa_collate``) likewise, prompt then answer; dicts
   with ``pixel_values``: that image; a scalar ``label``/``labels`` entry is the given label;
3. ``(x, y)`` items: ``x`` is shown (an image when it has an image's shape, else a table row of
   its values) and ``y`` is the given label;
4. strings: text; other dicts: a table of their entries.

Without a hook, a flat feature vector (such as scikit-learn's 8×8 digits as 64 numbers) is a
table row: pass ``render=lambda ex: ex[0].reshape(8, 8)`` to see the digit.

Images are encoded as PNG by :mod:`lightning_influence.report.png` (no imaging library needed).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, default_collate

from ..batches import move_to_device
from ..data import find_examples
from ..model_mode import eval_mode
from ..storage import ArtifactError, read_artifact, write_artifact
from ..task import resolve_task
from .png import as_array, b64_png, image_layout, png_size, shape_text

__all__ = [
    "ExampleView",
    "RenderHook",
    "view_example",
    "view_line",
    "align_token_scores",
    "predicted_labels",
    "example_views",
    "ExampleViews",
    "save_views",
    "load_views",
    "EXAMPLES_KIND",
]

EXAMPLES_KIND = "examples"
MAX_TABLE_ROWS = 12
MAX_TOKENS = 512
MAX_TEXT = 2000

RenderHook = Callable[[Any], Any]
"""``render(example) -> str | image | list[str] | dict | ExampleView`` (see the module docstring)."""


@dataclass
class ExampleView:
    """What one example looks like in a report (JSON-serialisable).

    Attributes:
        id: the example's id (its ``IndexedDataset`` index, or its position).
        image: base64 PNG, or ``None``.
        text: text to show, or ``None``.
        tokens: the sequence's tokens as strings (for per-token highlighting), or ``None``.
        token_scores: one score per token of ``tokens`` (``None`` where a token has none), or
            ``None``; positive = the token's loss term helps the query (same sign as the
            example's score).
        targets: per token of ``tokens``, whether its loss term counts (``labels != -100``, e.g.
            the answer of a question), or ``None`` when every token counts.
        table: ``[(name, value), ...]`` rows for tabular data, or ``None``.
        label: the label the example was given (as text), or ``None``.
        predicted: the label the model predicts for it (as text), or ``None``.
        note: anything else worth a line (e.g. "not found in the dataset").
    """

    id: int
    image: Optional[str] = None
    text: Optional[str] = None
    tokens: Optional[list[str]] = None
    token_scores: Optional[list[Optional[float]]] = None
    targets: Optional[list[bool]] = None
    table: Optional[list[tuple[str, str]]] = None
    label: Optional[str] = None
    predicted: Optional[str] = None
    note: Optional[str] = None

    def has_content(self) -> bool:
        """Whether it shows the example itself (an image, text, tokens or a table row)."""
        return self.image is not None or self.text is not None or self.tokens is not None or self.table is not None

    @property
    def mislabeled(self) -> bool:
        """Whether the model predicts another label than the given one (both known)."""
        return self.label is not None and self.predicted is not None and self.label != self.predicted

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ExampleView":
        d = dict(d)
        if d.get("table") is not None:
            d["table"] = [tuple(r) for r in d["table"]]
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


# -- views -------------------------------------------------------------------------------------
def _scalar(x: Any) -> Optional[int | float]:
    """``x`` as a Python number when it is one number (not a bool), else ``None``."""
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return x
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    if isinstance(x, Tensor) and x.numel() == 1 and x.dtype != torch.bool:
        return x.item()
    if isinstance(x, np.ndarray) and x.size == 1 and x.dtype != np.bool_:
        return x.item()
    return None


def _label_text(y: Any, label_names: Optional[Sequence[str]]) -> Optional[str]:
    v = _scalar(y)
    if v is None:
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if label_names is not None and isinstance(v, int) and 0 <= v < len(label_names):
        return str(label_names[v])
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _table(x: Any) -> list[tuple[str, str]]:
    if isinstance(x, Mapping):
        items = [(str(k), v) for k, v in x.items()]
    else:
        a = as_array(x)
        flat = a.reshape(-1) if a is not None else np.asarray(list(x) if isinstance(x, (list, tuple)) else [x], dtype=object)
        items = [(f"[{i}]", v) for i, v in enumerate(flat.tolist())]
    rows = [(k, _value_text(v)) for k, v in items[:MAX_TABLE_ROWS]]
    if len(items) > MAX_TABLE_ROWS:
        rows.append(("…", f"{len(items) - MAX_TABLE_ROWS} more of {len(items)}"))
    return rows


def _value_text(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (Tensor, np.ndarray)):
        s = _scalar(v)
        return _value_text(s) if s is not None else shape_text(v)
    text = str(v)
    return text if len(text) <= 80 else text[:77] + "..."


def _token_texts(ids: Sequence[int], tokenizer: Any) -> list[str]:
    if tokenizer is None:
        return [str(i) for i in ids]
    return [str(tokenizer.decode([int(i)])) for i in ids]


def _tokens_of(example: Mapping[str, Any]) -> Optional[tuple[list[int], Optional[list[bool]]]]:
    """``(token ids, targets)`` of a sequence item without padding; ``targets`` marks the tokens
    whose loss counts (``labels`` not ``-100``; the answer of a ``prompt_ids``/``answer_ids`` item),
    ``None`` when all do."""
    if "input_ids" in example:
        ids = torch.as_tensor(example["input_ids"]).reshape(-1)
        keep = torch.ones_like(ids, dtype=torch.bool)
        if example.get("attention_mask") is not None:
            keep = torch.as_tensor(example["attention_mask"]).reshape(-1).bool()
        targets = None
        if example.get("labels") is not None:
            labels = torch.as_tensor(example["labels"]).reshape(-1)
            if labels.shape == ids.shape and bool((labels[keep] == -100).any()):
                targets = (labels[keep] != -100).tolist()
        return ids[keep].tolist(), targets
    if "prompt_ids" in example and "answer_ids" in example:
        prompt = torch.as_tensor(example["prompt_ids"]).reshape(-1).tolist()
        answer = torch.as_tensor(example["answer_ids"]).reshape(-1).tolist()
        return prompt + answer, [False] * len(prompt) + [True] * len(answer)
    return None


def _content(view: ExampleView, x: Any, tokenizer: Any) -> None:
    """Fill ``view`` from ``x`` (anything a hook may return, or an example's input)."""
    if isinstance(x, ExampleView):
        for k, v in x.to_dict().items():
            if k != "id":
                setattr(view, k, v)
        return
    if isinstance(x, str):
        view.text = x if len(x) <= MAX_TEXT else x[:MAX_TEXT] + "…"
        return
    if isinstance(x, Mapping):
        keys = {"image", "text", "tokens", "table", "label", "predicted", "note"}
        if keys & set(x):
            if x.get("image") is not None:
                view.image = b64_png(x["image"])
            if x.get("text") is not None:
                _content(view, str(x["text"]), tokenizer)
            if x.get("tokens") is not None:
                view.tokens = [str(t) for t in x["tokens"]][:MAX_TOKENS]
            if x.get("table") is not None:
                view.table = _table(x["table"])
            for k in ("label", "predicted", "note"):
                if x.get(k) is not None:
                    setattr(view, k, str(x[k]))
            return
        if x.get("pixel_values") is not None:  # Hugging Face image models
            _content(view, x["pixel_values"], tokenizer)
            return
        seq = _tokens_of(x)
        if seq is not None:
            view.tokens = _token_texts(seq[0][:MAX_TOKENS], tokenizer)
            view.targets = None if seq[1] is None else seq[1][:MAX_TOKENS]
            return
        view.table = _table(x)
        return
    if isinstance(x, (list, tuple)) and x and all(isinstance(t, str) for t in x):
        view.tokens = list(x)[:MAX_TOKENS]
        return
    a = as_array(x)
    if a is not None:
        if image_layout(a) is not None and a.dtype != np.int64:
            view.image = b64_png(a)
            return
        if a.ndim == 1 and np.issubdtype(a.dtype, np.integer) and tokenizer is not None:
            view.tokens = _token_texts(a.tolist()[:MAX_TOKENS], tokenizer)
            return
        view.table = _table(a)
        return
    view.text = _value_text(x)


def _split_label(example: Any) -> tuple[Any, Any]:
    """``(content, label)`` of an item: ``(x, y)`` pairs with a scalar ``y``, dicts with a scalar
    ``label``/``labels``; ``(example, None)`` otherwise."""
    if isinstance(example, (tuple, list)) and len(example) == 2 and _scalar(example[1]) is not None:
        return example[0], example[1]
    if isinstance(example, Mapping):
        for key in ("label", "labels"):
            if key in example and _scalar(example[key]) is not None:
                return {k: v for k, v in example.items() if k != key}, example[key]
    return example, None


def align_token_scores(scores: Any, n_tokens: int) -> list[Optional[float]]:
    """Per-token scores as a list aligned to ``n_tokens`` shown tokens.

    Args:
        scores: ``Tensor[T]`` (one per token) or ``Tensor[T-1]`` (one per predicted token of a
            causal LM: token ``t`` predicted from tokens ``< t``, so the first token gets none).
        n_tokens: ``T``.

    Returns:
        ``T`` floats (``None`` for a token without a score).

    Raises:
        ValueError: the length is neither ``T`` nor ``T-1``.
    """
    s = torch.as_tensor(scores).detach().double().reshape(-1).tolist()
    if len(s) == n_tokens:
        return [float(v) for v in s]
    if len(s) == n_tokens - 1:  # causal LM: one score per predicted token 1..T-1
        return [None] + [float(v) for v in s]
    raise ValueError(f"token_scores has {len(s)} entries for {n_tokens} tokens; give Tensor[T] (one per token) "
                     f"or Tensor[T-1] (one per predicted token, causal-LM alignment)")


def view_example(
    example: Any,
    example_id: int,
    render: Optional[RenderHook] = None,
    tokenizer: Any = None,
    token_scores: Optional[Tensor] = None,
    label_names: Optional[Sequence[str]] = None,
) -> ExampleView:
    """The :class:`ExampleView` of one dataset item (without its ``IndexedDataset`` id).

    Args:
        example: the item, e.g. ``(x, y)`` or ``{"input_ids": ...}``.
        example_id: its id.
        render: optional hook ``render(example)`` (see the module docstring); the label is still
            read from ``example`` unless the hook returns one.
        tokenizer: decodes token ids (``decode(list[int]) -> str``), one token at a time.
        token_scores: ``Tensor[T]`` (one per shown token) or ``Tensor[T-1]`` (one per predicted
            token of a causal LM, aligned to tokens ``1..T-1``), for highlighting.
        label_names: class names, indexed by integer label.

    Returns:
        The view (never raises for odd content: it falls back to text).

    Raises:
        ValueError: ``token_scores`` does not match the number of tokens.
    """
    view = ExampleView(id=int(example_id))
    content, label = _split_label(example)
    view.label = _label_text(label, label_names) if label is not None else None
    _content(view, render(example) if render is not None else content, tokenizer)
    if token_scores is not None:
        if view.tokens is None:
            raise ValueError(f"token_scores given for example {example_id}, which is not shown as tokens")
        view.token_scores = align_token_scores(token_scores, len(view.tokens))
    return view


def view_line(view: ExampleView, width: int = 60) -> str:
    """One line that describes a view in a terminal: its labels and its content in short (text or
    tokens cut to ``width`` characters, the first table cells, an image's size)."""
    parts = []
    if view.label is not None:
        parts.append(f"label {view.label}")
    if view.predicted is not None:
        parts.append(f"predicted {view.predicted}" + (" (≠ label)" if view.mislabeled else ""))
    if view.text is not None or view.tokens is not None:
        text = view.text if view.text is not None else "".join(view.tokens or [])
        text = " ".join(text.split())
        parts.append(repr(text if len(text) <= width else text[: width - 1] + "…"))
    elif view.table is not None:
        cells = ", ".join(f"{k}={v}" for k, v in view.table[:4])
        parts.append(cells + (", …" if len(view.table) > 4 else ""))
    elif view.image is not None:
        size = png_size(view.image)
        parts.append("image" if size is None else f"image {size[0]}×{size[1]}")
    if view.note and not parts:
        parts.append(view.note)
    return " · ".join(parts)


def predicted_labels(
    model: Any,
    examples: Sequence[Any],
    task: Any = None,
    collate_fn: Optional[Callable[[list], Any]] = None,
    label_names: Optional[Sequence[str]] = None,
    batch_size: int = 64,
) -> list[Optional[str]]:
    """The model's predicted class of each example (``argmax`` of ``task.logits``), as text.

    Only for models whose outputs are ``[B, C]`` (classification); other outputs (a causal LM's
    ``[B, T, V]``) give ``None`` for every example. The model runs in eval mode without gradients
    on its own device.

    Args:
        model: the model (or LightningModule).
        examples: items as the dataset yields them, without ids.
        task: how to read batches (default: the module's task; see :func:`~lightning_influence.task.resolve_task`).
        collate_fn: how to batch the items (default: PyTorch's ``default_collate``).
        label_names: class names, indexed by class.
        batch_size: examples per forward pass.

    Returns:
        One label text (or ``None``) per example.
    """
    if not examples:
        return []
    task = resolve_task(model, task, needs=("logits",))
    collate = collate_fn or default_collate
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    out: list[Optional[str]] = []
    with eval_mode(model), torch.no_grad():
        for s in range(0, len(examples), batch_size):
            batch = move_to_device(collate(list(examples[s : s + batch_size])), device)
            logits = task.logits(model, batch)
            if logits.dim() != 2:
                return [None] * len(examples)
            out += [_label_text(int(c), label_names) for c in logits.argmax(-1).tolist()]
    return out


def example_views(
    source: Any,
    ids: Sequence[int],
    model: Any = None,
    task: Any = None,
    render: Optional[RenderHook] = None,
    tokenizer: Any = None,
    label_names: Optional[Sequence[str]] = None,
    token_scores: Optional[Mapping[int, Tensor]] = None,
    max_scan: Optional[int] = 200_000,
) -> dict[int, ExampleView]:
    """Views of the examples ``ids`` of ``source``, with predicted labels when ``model`` is given.

    Args:
        source: where the examples are (see :func:`~lightning_influence.data.find_examples`); a ``DataLoader``'s
            ``collate_fn`` batches them for the model.
        ids: which examples.
        model: optional classifier for predicted labels (see :func:`predicted_labels`).
        task: how the model reads batches.
        render: optional hook (see :func:`view_example`).
        tokenizer: optional tokenizer for token ids.
        label_names: class names.
        token_scores: optional per-token scores by example id (see :func:`view_example`).
        max_scan: see :func:`~lightning_influence.data.find_examples`.

    Returns:
        ``{id: view}``; an id not found gets a view that says so.
    """
    found = find_examples(source, ids, max_scan=max_scan)
    views: dict[int, ExampleView] = {}
    for i in ids:
        i = int(i)
        if i in found:
            ts = None if token_scores is None else token_scores.get(i)
            views[i] = view_example(found[i], i, render, tokenizer, ts, label_names)
        else:
            views[i] = ExampleView(id=i, note="not found in the given data")
    if model is not None and found:
        order = [i for i in views if i in found]
        collate = source.collate_fn if isinstance(source, DataLoader) else None
        try:
            preds = predicted_labels(model, [found[i] for i in order], task, collate, label_names)
        except (TypeError, ValueError, RuntimeError, KeyError, IndexError) as e:
            for i in order:
                views[i].note = f"no prediction: {type(e).__name__}: {e}"[:200]
        else:
            for i, p in zip(order, preds):
                if views[i].predicted is None:
                    views[i].predicted = p
    return views


# -- on disk ------------------------------------------------------------------------------------------
@dataclass
class ExampleViews:
    """Rendered examples of a run: training examples and queries by id.

    Attributes:
        train: training example id → view.
        queries: query id → view.
        meta: what made them (callback name, artifacts they illustrate).
    """

    train: dict[int, ExampleView] = field(default_factory=dict)
    queries: dict[int, ExampleView] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def update(self, other: "ExampleViews") -> None:
        """Add the views of ``other`` (its views win where both have an id)."""
        self.train.update(other.train)
        self.queries.update(other.queries)


def save_views(views: ExampleViews, directory: str | os.PathLike) -> Path:
    """Write views as an artifact of kind ``"examples"`` (``views.json`` beside the ids)."""
    body = {"train": [v.to_dict() for v in views.train.values()], "queries": [v.to_dict() for v in views.queries.values()]}
    tensors = {"train_ids": torch.tensor(sorted(views.train), dtype=torch.long),
               "query_ids": torch.tensor(sorted(views.queries), dtype=torch.long)}
    manifest = {"n_train": len(views.train), "n_queries": len(views.queries), "meta": views.meta}
    return write_artifact(directory, EXAMPLES_KIND, tensors, manifest, extra_files={"views.json": json.dumps(body)})


def load_views(directory: str | os.PathLike) -> ExampleViews:
    """Read views written by :func:`save_views`.

    Raises:
        ArtifactError: missing, corrupt or not an ``"examples"`` artifact.
    """
    _, manifest = read_artifact(directory, kind=EXAMPLES_KIND)
    try:
        body = json.loads((Path(directory) / "views.json").read_text())
        return ExampleViews(
            train={int(d["id"]): ExampleView.from_dict(d) for d in body.get("train", [])},
            queries={int(d["id"]): ExampleView.from_dict(d) for d in body.get("queries", [])},
            meta=dict(manifest.get("meta") or {}),
        )
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"{directory}: unreadable views.json ({e})") from e
