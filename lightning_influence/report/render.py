"""Print :class:`~lightning_influence.report.MethodReport` objects as a table (for people), JSON
or CSV (for programs), with raw, normalised and rank-based scores (see
:mod:`lightning_influence.report.methods`)."""

from __future__ import annotations

import csv
import io
import json
import textwrap
from typing import Any, Literal, Optional

from ..validation import choice
from .views import ExampleView, ExampleViews
from .collect import MethodReport
from .methods import SCORE_FORMS, ScoreForm, method_info, normalised, rank_text

__all__ = ["render", "readable_entries"]


def readable_entries(pairs: list[tuple[int, float]], n: int, scale: Optional[float], bottom: bool = False) -> list[dict[str, Any]]:
    """``[(id, score), ...]`` (best first) as dicts with ``id``, ``score``, ``rank`` (1-based),
    ``normalised`` (score / ``scale``, or ``None``) and ``top_fraction`` (``rank / n``; from the
    bottom for opponents)."""
    return [{"id": int(i), "score": float(s), "rank": k, "normalised": normalised(float(s), scale),
             "top_fraction": k / max(n, 1), "rank_text": rank_text(k, n, bottom)}
            for k, (i, s) in enumerate(pairs, 1)]


def render(reports: list[MethodReport], fmt: Literal["table", "json", "csv"] = "table", scores: ScoreForm = "raw",
           views: Optional[ExampleViews] = None) -> str:
    """Render reports for people or programs.

    Args:
        reports: from :func:`~lightning_influence.report.collect_report`.
        fmt: ``"table"`` (aligned text), ``"json"`` or ``"csv"``.
        scores: which forms of each score the table shows beside the raw one: ``"raw"``,
            ``"normalised"`` (÷ the median absolute score of the ranking), ``"rank"`` (top p%) or
            ``"all"``. JSON and CSV always carry every form.
        views: rendered examples (:func:`~lightning_influence.report.collect_views`): the table
            shows each example's label (and the predicted one where it differs) beside its id.

    Returns:
        The text.

    Raises:
        ValueError: unknown ``fmt`` or ``scores``.
    """
    choice("render", "scores", scores, SCORE_FORMS)
    if fmt == "json":
        return json.dumps([_as_dict(r) for r in reports], indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["method", "ranking", "query_id", "rank", "id", "score", "normalised", "top_fraction"])
        for r in reports:
            for e in readable_entries(r.self_top, r.n_ranked, r.self_scale):
                w.writerow([r.method, "self_influence", "", e["rank"], e["id"], f"{e['score']:.6g}", _g(e["normalised"]), f"{e['top_fraction']:.6g}"])
            for item in r.pairwise_top:
                for direction in ("proponents", "opponents"):
                    for e in readable_entries(item[direction], item.get("n", 0), item.get("scale"), direction == "opponents"):
                        w.writerow([r.method, direction, item["query_id"], e["rank"], e["id"], f"{e['score']:.6g}",
                                    _g(e["normalised"]), f"{e['top_fraction']:.6g}"])
        return buf.getvalue()
    if fmt != "table":
        raise ValueError(f"format must be 'table', 'json' or 'csv', got {fmt!r}")
    return "\n".join(_table(r, scores, views or ExampleViews()) for r in reports)


def _g(v: Optional[float]) -> str:
    return "" if v is None else f"{v:.6g}"


def _as_dict(r: MethodReport) -> dict[str, Any]:
    info = method_info(r.method_key, r.estimator)
    return {
        "method": r.method,
        "title": r.title,
        "artifact": str(r.artifact),
        "summary": r.summary,
        "meaning": {"self_influence": info.self_influence, "train_test": info.train_test},
        "explanations": r.explanations,
        "self_influence_top": readable_entries(r.self_top, r.n_ranked, r.self_scale),
        "pairwise_top": [
            {"query_id": p["query_id"],
             "proponents": readable_entries(p["proponents"], p.get("n", 0), p.get("scale")),
             "opponents": readable_entries(p["opponents"], p.get("n", 0), p.get("scale"), bottom=True)}
            for p in r.pairwise_top
        ],
        "notes": r.notes,
        "warnings": r.warnings,
    }


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _wrapped(label: str, text: str) -> list[str]:
    return textwrap.wrap(f"{label}{text}", width=100, initial_indent="   ", subsequent_indent="     ")


_WIDTHS = {"id": 8, "label": 7, "score": 12, "normalised": 8, "rank": 13}
_HEADER = {"id": "id", "label": "label", "score": "score", "normalised": "×median", "rank": "top %"}


def _fields(scores: str, labels: bool = False) -> list[str]:
    return (["id"] + (["label"] if labels else []) + ["score"] + (["normalised"] if scores in ("normalised", "all") else [])
            + (["rank"] if scores in ("rank", "all") else []))


def _line(cells: dict[str, str], scores: str, labels: bool = False) -> str:
    return " ".join(f"{cells[f]:>{_WIDTHS[f]}}" for f in _fields(scores, labels))


def label_text(view: Optional[ExampleView]) -> str:
    """``"3"`` (the given label), ``"3≠5"`` when the model predicts 5, ``""`` when unknown."""
    if view is None or view.label is None:
        return ""
    return f"{view.label}≠{view.predicted}" if view.mislabeled else str(view.label)


def _cells(e: dict[str, Any], scores: str, signed: bool, views: Optional[dict[int, ExampleView]] = None) -> str:
    norm = e["normalised"]
    return _line({"id": str(e["id"]), "label": label_text((views or {}).get(e["id"])),
                  "score": format(e["score"], "+.5g" if signed else ".5g"),
                  "normalised": "" if norm is None else format(norm, "+.3g" if signed else ".3g") + "×",
                  "rank": e["rank_text"]}, scores, views is not None)


def _header(scores: str, labels: bool = False) -> str:
    return _line(_HEADER, scores, labels)


def _has_labels(views: dict[int, ExampleView], ids: list[int]) -> bool:
    return any(views.get(i) is not None and views[i].label is not None for i in ids)


def _table(r: MethodReport, scores: str, views: ExampleViews) -> str:
    info = method_info(r.method_key, r.estimator)
    lines = [f"== {r.title}  [{r.method}]  ({r.artifact})", "   " + ", ".join(f"{k}={_fmt(v)}" for k, v in r.summary.items())]
    for e in r.explanations:
        lines += _wrapped("· ", e)
    lines += [w for text in r.warnings for w in _wrapped("WARNING: ", text)]
    train_ids = [i for i, _ in r.self_top] + [i for item in r.pairwise_top for d in ("proponents", "opponents") for i, _ in item[d]]
    tv = views.train if _has_labels(views.train, train_ids) else None
    if tv is not None:
        lines.append("   label: the label each example was given; 3≠5: the model predicts 5")
    if r.self_top:
        lines += _wrapped("self-influence: ", info.self_influence or "")
        lines.append("   most self-influential (atypical / possibly mislabeled):")
        lines.append(f"   {'rank':>4}  {_header(scores, tv is not None)}")
        lines += [f"   {e['rank']:>4}  {_cells(e, scores, False, tv)}" for e in readable_entries(r.self_top, r.n_ranked, r.self_scale)]
    if r.pairwise_top:
        lines += _wrapped("train-test influence: ", info.train_test or "")
    for item in r.pairwise_top:
        n, scale = item.get("n", 0), item.get("scale")
        up = readable_entries(item["proponents"], n, scale)
        down = readable_entries(item["opponents"], n, scale, bottom=True)
        width = len(_header(scores, tv is not None))
        q = item["query_id"]
        qlabel = label_text(views.queries.get(int(q)))
        about = ([f"label {qlabel}"] if qlabel else []) + ([f"final loss {item['final_loss']:.4g}"] if "final_loss" in item else [])
        lines.append(f"   query {q}" + (f" ({', '.join(about)})" if about else "") + ":")
        lines.append(f"      {'proponents (help)':<{width}} | opponents (hurt)")
        lines.append(f"      {_header(scores, tv is not None):<{width}} | {_header(scores, tv is not None)}")
        for a, b in zip(up, down):
            lines.append(f"      {_cells(a, scores, True, tv):<{width}} | {_cells(b, scores, True, tv)}")
    if r.spectra:
        lines.append(f"   {'layer':<48} {'lambda max':>12} {'lambda mean':>12} {'damping':>12}")
        for n, lam in r.spectra.items():
            d = r.damping.get(n)
            lines.append(f"   {n[-48:]:<48} {float(lam[0]):>12.4g} {float(lam.mean()):>12.4g} {'' if d is None else format(d, '.4g'):>12}")
        if r.damping:
            lines.append("   damping: the default rule's λ (the 75% quantile of the pooled eigenvalues), used when a scorer is given damping=None")
    lines += [f"   note: {n}" for n in r.notes]
    return "\n".join(lines) + "\n"
