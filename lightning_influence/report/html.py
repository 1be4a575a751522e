"""A self-contained HTML influence report: the examples as what they are, and the plots.

:func:`write_html_report` turns a run's ``influence/`` folder into one HTML file with no
external reference (images inline as ``data:`` URIs, no scripts, no fonts to fetch):

* per self-influence ranking, the top examples as cards: the image, text or table row, the label
  it was given, the label the model predicts (flagged when they differ), and the score (raw,
  normalised and/or rank, see :mod:`lightning_influence.report.methods`);
* per query of a pairwise result (saved scores or a Z0 recording with queries), the query and
  its top proponents (help) and opponents (hurt);
* per-token highlighting of sequences where per-token scores are given;
* the plots, and what each number means.

Examples come from the views the callbacks saved at the end of fit (artifacts of kind
``"examples"``), or are rendered now from ``datasets`` (with ``model`` for predicted labels).
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

from torch import Tensor

from .png import png_size
from .views import ExampleView, ExampleViews, RenderHook, align_token_scores, example_views
from ..storage import library_version
from ..validation import choice
from .collect import MethodReport, collect_report, collect_views, find_influence_dir
from .methods import SCORE_FORMS, ScoreForm, method_info
from .render import readable_entries

__all__ = ["write_html_report", "html_report", "page_record", "HTML_NAME"]

HTML_NAME = "report.html"
_RECORD_META = "lightning-influence-report"

TokenScores = Mapping[Any, Tensor]

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0 auto;max-width:1280px;padding:16px 24px;color:#1d2330;background:#fafbfc}
h1{font-size:24px;margin:8px 0}h2{font-size:20px;margin:32px 0 4px;border-bottom:2px solid #d8dde6;padding-bottom:4px}
h3{font-size:15px;margin:16px 0 6px}
.muted{color:#687085;font-size:13px}.meaning{background:#eef3fb;border-left:4px solid #4c72b0;padding:6px 10px;font-size:14px;margin:8px 0}
.summary{font-size:13px;color:#39404f}.summary code{background:#eceff4;padding:1px 4px;border-radius:3px}
ul.expl{font-size:13px;color:#39404f;margin:4px 0 8px 0}
.cards{display:flex;flex-wrap:wrap;gap:10px;align-items:flex-start}
.card{background:#fff;border:1px solid #d8dde6;border-radius:6px;padding:8px;width:190px;font-size:12px;box-shadow:0 1px 2px rgba(0,0,0,.05)}
.card.query{border:2px solid #4c72b0;background:#f4f7fd}
.card.flag{border-color:#c44e52}
.card img{display:block;margin:0 auto 6px;image-rendering:pixelated;max-width:174px}
.card .text{white-space:pre-wrap;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;max-height:160px;overflow:auto;margin-bottom:6px}
.card table{font-size:11px;border-collapse:collapse;margin-bottom:6px;width:100%}.card td{border-bottom:1px solid #eef0f4;padding:1px 3px}
.card .head{font-weight:600;margin-bottom:2px}.card .labels{margin:2px 0}.card .score{font-family:ui-monospace,Menlo,Consolas,monospace;overflow-wrap:anywhere}
.card .score span{white-space:nowrap}
.warn{background:#fdecea;border-left:4px solid #c44e52;padding:6px 10px;font-size:14px;margin:8px 0;color:#7a1c1f}
.badge{display:inline-block;border-radius:3px;padding:0 4px;font-size:11px;margin:1px 2px 1px 0}
.badge.bad{background:#fbe3e4;color:#9c1c22}.badge.mark{background:#fff1d6;color:#8a5a00}.badge.ok{background:#e3f4e8;color:#1d6b35}
.row{display:flex;gap:16px;align-items:flex-start;margin:8px 0 20px;flex-wrap:wrap}.row .col h4{margin:0 0 4px;font-size:13px}
.tok{border-radius:2px}.tok.tgt{font-weight:700;text-decoration:underline}
.plots img{max-width:100%;border:1px solid #d8dde6;background:#fff;margin:6px 0}
.notes{font-size:13px;color:#8a5a00}
nav a{margin-right:12px;font-size:13px}
"""


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _png_width(b64: str) -> int:
    size = png_size(b64)
    return 0 if size is None else size[0]  # a malformed image still renders, just unscaled


def _tokens_html(view: ExampleView) -> str:
    scores = view.token_scores or []
    finite = [abs(s) for s in scores if s is not None]
    top = max(finite) if finite else 0.0
    parts = []
    for k, tok in enumerate(view.tokens or []):
        s = scores[k] if k < len(scores) else None
        cls = "tok tgt" if view.targets is not None and k < len(view.targets) and view.targets[k] else "tok"
        if s is None or top == 0:
            parts.append(f'<span class="{cls}">{_esc(tok)}</span>')
            continue
        alpha = 0.15 + 0.7 * abs(s) / top
        rgb = "46,160,67" if s > 0 else "214,39,40"
        parts.append(f'<span class="{cls}" style="background:rgba({rgb},{alpha:.2f})" title="{s:+.4g}">{_esc(tok)}</span>')
    sep = "" if any(t[:1].isspace() for t in (view.tokens or [])) else " "
    return f'<div class="text tokens">{sep.join(parts)}</div>'


def _content_html(view: ExampleView) -> str:
    out = []
    if view.image:
        w = _png_width(view.image)
        scale = max(1, 96 // w) if 0 < w < 96 else 1
        style = f' style="width:{min(w * scale, 174)}px"' if w else ""
        out.append(f'<img src="data:image/png;base64,{view.image}" alt="example {view.id}"{style}>')
    if view.tokens is not None:
        out.append(_tokens_html(view))
    if view.text is not None:
        out.append(f'<div class="text">{_esc(view.text)}</div>')
    if view.table is not None:
        rows = "".join(f"<tr><td>{_esc(k)}</td><td>{_esc(v)}</td></tr>" for k, v in view.table)
        out.append(f"<table>{rows}</table>")
    if view.note:
        out.append(f'<div class="muted">{_esc(view.note)}</div>')
    return "".join(out)


def _card(view: Optional[ExampleView], head: str, entry: Optional[dict[str, Any]], scores: str, marked: set[int],
          mark_label: str, query: bool = False, signed: bool = False) -> str:
    view = view or ExampleView(id=-1, note="no rendered example: pass datasets= (see docs/report.md)")
    ident = entry["id"] if entry is not None else view.id
    badges = []
    if view.label is not None or view.predicted is not None:
        lab = f"label <b>{_esc(view.label)}</b>" if view.label is not None else ""
        pred = f"predicted <b>{_esc(view.predicted)}</b>" if view.predicted is not None else ""
        badges.append(f'<div class="labels">{lab}{" · " if lab and pred else ""}{pred}</div>')
    if view.mislabeled:
        badges.append('<span class="badge bad">label ≠ prediction</span>')
    if not query and ident in marked:
        badges.append(f'<span class="badge mark">{_esc(mark_label)}</span>')
    if entry is not None and not signed and entry["score"] < 0:  # a self-influence below 0: see the section's warning
        badges.append('<span class="badge bad">negative self-influence: see the warning above</span>')
    lines = []
    if entry is not None:
        raw = f"{entry['score']:+.4g}" if signed else f"{entry['score']:.4g}"
        lines.append(f"score {raw}")
        if scores in ("normalised", "all") and entry["normalised"] is not None:
            lines.append(_esc(_times_median(entry["normalised"], signed)))
        if scores in ("rank", "all"):
            lines.append(_esc(entry["rank_text"]))
    score = f'<div class="score">{" · ".join(f"<span>{x}</span>" for x in lines)}</div>' if lines else ""
    cls = "card" + (" query" if query else "") + (" flag" if view.mislabeled or (not query and ident in marked) else "")
    return (f'<div class="{cls}" data-id="{_esc(ident)}"><div class="head">{_esc(head)}</div>{_content_html(view)}'
            f'{"".join(badges)}{score}</div>')


def _times_median(v: float, signed: bool) -> str:
    return f"{v:+.3g}× median" if signed else f"{v:.3g}× median"


def _with_tokens(view: Optional[ExampleView], scores: Optional[Tensor]) -> Optional[ExampleView]:
    if view is None or scores is None or view.tokens is None:
        return view
    return replace(view, token_scores=align_token_scores(scores, len(view.tokens)))


def _lookup(token_scores: Optional[TokenScores], key: Any) -> Optional[Tensor]:
    return None if token_scores is None else token_scores.get(key)


def _section(r: MethodReport, views: ExampleViews, scores: str, marked: set[int], mark_label: str,
             token_scores: Optional[TokenScores], figures: list[tuple[str, bytes]], anchor: str) -> str:
    info = method_info(r.method_key, r.estimator)
    out = [f'<section id="{anchor}"><h2>{_esc(r.title)}</h2>',
           f'<div class="muted">artifact <code>{_esc(r.artifact)}</code> · method <code>{_esc(r.method)}</code> · '
           f'callback <code>{_esc(r.label)}</code></div>']
    if r.summary:
        out.append('<p class="summary">' + " · ".join(f"<code>{_esc(k)}={_esc(_fmt(v))}</code>" for k, v in r.summary.items()) + "</p>")
    if r.explanations:
        out.append('<ul class="expl">' + "".join(f"<li>{_esc(e)}</li>" for e in r.explanations) + "</ul>")
    if r.self_top:
        out.append(f'<div class="meaning"><b>Self-influence</b> = {_esc(info.self_influence)}</div>')
        out += [f'<div class="warn"><b>Warning:</b> {_esc(w)}</div>' for w in r.warnings]
        out.append(f"<h3>Most self-influential training examples (atypical, memorised or possibly mislabeled), of {r.n_ranked}</h3>")
        cards = []
        for e in readable_entries(r.self_top, r.n_ranked, r.self_scale):
            view = _with_tokens(views.train.get(e["id"]), _lookup(token_scores, e["id"]))
            cards.append(_card(view, f"#{e['rank']} · id {e['id']}", e, scores, marked, mark_label))
        out.append('<div class="cards">' + "".join(cards) + "</div>")
    if r.pairwise_top:
        out.append(f'<div class="meaning"><b>Train-test influence</b> = {_esc(info.train_test)}</div>')
        for item in r.pairwise_top:
            q = item["query_id"]
            n, scale = item.get("n", 0), item.get("scale")
            qcard = _card(views.queries.get(q), f"query id {q}", None, scores, marked, mark_label, query=True)
            cols = []
            for direction, title, bottom in (("proponents", "helps most (proponents)", False), ("opponents", "hurts most (opponents)", True)):
                cards = []
                for e in readable_entries(item[direction], n, scale, bottom):
                    view = _with_tokens(views.train.get(e["id"]), _lookup(token_scores, (q, e["id"])))
                    cards.append(_card(view, f"#{e['rank']} · id {e['id']}", e, scores, marked, mark_label, signed=True))
                cols.append(f'<div class="col"><h4>{title}</h4><div class="cards">{"".join(cards)}</div></div>')
            why = f" · loss {item['final_loss']:.4g} at the last checkpoint" if "final_loss" in item else ""
            out.append(f'<h3>Query {q}{_esc(why)}</h3><div class="row"><div class="col"><h4>query</h4>{qcard}</div>{"".join(cols)}</div>')
    if r.spectra:
        out.append('<div class="meaning">Corrected eigenvalues Λ of each layer\'s curvature, largest first, with the damping λ '
                   "(dashed) that every score adds to them: directions with Λ well below λ barely count.</div>")
    if figures:
        out.append('<div class="plots">' + "".join(
            f'<img src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}" alt="{_esc(name)}" title="{_esc(name)}">'
            for name, png in figures) + "</div>")
    if r.notes:
        out.append('<ul class="notes">' + "".join(f"<li>{_esc(n)}</li>" for n in r.notes) + "</ul>")
    out.append("</section>")
    return "".join(out)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _sources(datasets: Any) -> tuple[Any, Any]:
    if datasets is None:
        return None, None
    if isinstance(datasets, Mapping):
        unknown = set(datasets) - {"train", "queries"}
        if unknown:
            raise ValueError(f"datasets= takes the keys 'train' and 'queries', got {sorted(unknown)}")
        return datasets.get("train"), datasets.get("queries")
    return datasets, None


def _needed(reports: list[MethodReport]) -> tuple[list[int], list[int]]:
    train: list[int] = []
    queries: list[int] = []
    for r in reports:
        train += [i for i, _ in r.self_top]
        for item in r.pairwise_top:
            queries.append(int(item["query_id"]))
            train += [i for i, _ in item["proponents"]] + [i for i, _ in item["opponents"]]
    return sorted(set(train)), sorted(set(queries))


def _figures(reports: list[MethodReport], mark_ids: Optional[set[int]], mark_label: str, plots: bool) -> tuple[dict[int, list], list[str]]:
    if not plots:
        return {}, []
    try:
        from .plots import _pyplot, report_pngs

        _pyplot()
    except ImportError as e:
        return {}, [f"no plots: {e}"]
    # drawn once per process for the same content: a logger's images at the end of training are reused
    return {k: report_pngs(r, mark_ids=mark_ids, mark_label=mark_label) for k, r in enumerate(reports)}, []


def html_report(
    reports: list[MethodReport],
    views: Optional[ExampleViews] = None,
    *,
    title: str = "Influence report",
    scores: ScoreForm = "all",
    mark_ids: Optional[Iterable[int]] = None,
    mark_label: str = "marked",
    token_scores: Optional[TokenScores] = None,
    plots: bool = True,
    record: Optional[Mapping[str, Any]] = None,
) -> str:
    """The HTML text of a report (see :func:`write_html_report`, which also finds the views).

    Args:
        reports: from :func:`~lightning_influence.report.collect_report`.
        views: rendered examples (training examples and queries by id).
        title: the page's heading.
        scores: which score forms the cards show beside the raw one (``"raw"``, ``"normalised"``,
            ``"rank"``, ``"all"``).
        mark_ids: training ids to badge and to draw in the histograms (e.g. known flipped labels).
        mark_label: the badge's text.
        token_scores: per-token scores: ``{train_id: Tensor[T]}`` for self-influence cards,
            ``{(query_id, train_id): Tensor[T]}`` for proponent/opponent cards (``T`` tokens, or
            ``T-1`` predicted tokens of a causal LM).
        plots: embed the plots (needs matplotlib; without it the page says so).
        record: what the page knew (marked ids, how its examples were rendered), embedded as a
            ``<meta name="lightning-influence-report">`` JSON record that :func:`page_record` reads.

    Returns:
        A complete HTML document.
    """
    choice("html_report", "scores", scores, SCORE_FORMS)
    views = views or ExampleViews()
    marked = set() if mark_ids is None else {int(i) for i in mark_ids}
    figures, notes = _figures(reports, marked or None, mark_label, plots)
    anchors = [f"r{k}" for k in range(len(reports))]
    nav = "".join(f'<a href="#{a}">{_esc(r.title)} ({_esc(r.label)})</a>' for a, r in zip(anchors, reports))
    body = "".join(_section(r, views, scores, marked, mark_label, token_scores, figures.get(k, []), anchors[k])
                   for k, r in enumerate(reports))
    missing = not views.train and not views.queries
    hint = ('<p class="notes">No rendered examples were saved for this run: the cards show ids only. Pass '
            "<code>datasets=</code> (and <code>model=</code>) to <code>write_html_report</code>, or define "
            "<code>render_example</code> on your LightningModule (docs/report.md).</p>") if missing else ""
    when = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    forms = {"raw": "raw scores", "normalised": "raw and normalised scores (× the median |score| of the ranking)",
             "rank": "raw scores and ranks (top p% of the ranking)", "all": "raw scores, × the median |score| of the "
             "ranking, and the rank as top p%"}[scores]
    legend = "Cards show " + forms + "."
    if '<span class="tok' in body:  # only where a card shows tokens
        legend += (" Token colours: green = the token's loss term raises the score (helps the query), red = lowers it; "
                   "hover a token for its value; underlined tokens are the ones the loss or measurement scores.")
    meta = ("" if record is None else
            f'<meta name="{_RECORD_META}" content="{_esc(json.dumps(dict(record), sort_keys=True))}">')
    extra = "".join(f'<p class="notes">{_esc(n)}</p>' for n in notes)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">{meta}<style>{_CSS}</style></head><body>'
            f'<h1>{_esc(title)}</h1><div class="muted">lightning-influence {_esc(library_version())} · {_esc(when)}</div>'
            f'<p class="muted">{_esc(legend)}</p><nav>{nav}</nav>{hint}{extra}{body}</body></html>')


def write_html_report(
    run_dir: str | os.PathLike,
    out: Optional[str | os.PathLike] = None,
    *,
    datasets: Any = None,
    model: Any = None,
    task: Any = None,
    render: Optional[RenderHook] = None,
    tokenizer: Any = None,
    label_names: Optional[Sequence[str]] = None,
    token_scores: Optional[TokenScores] = None,
    top_k: int = 10,
    queries: int = 5,
    scores: ScoreForm = "all",
    mark_ids: Optional[Iterable[int]] = None,
    mark_label: str = "marked",
    plots: bool = True,
    reports: Optional[list[MethodReport]] = None,
    keep_richer: bool = False,
    notes: Optional[list[str]] = None,
) -> Path:
    """Write a run's self-contained HTML report.

    Examples are the views saved by the callbacks at the end of fit; with ``datasets`` they are
    rendered now instead (``render``, ``tokenizer`` and ``label_names`` as in
    :func:`~lightning_influence.report.views.view_example`; ``model`` adds predicted labels).

    Args:
        run_dir: the run's log directory (or its ``influence/`` folder).
        out: the HTML file (default ``<influence>/plots/report.html``).
        datasets: the training data (``Dataset`` or ``DataLoader``), or ``{"train": ...,
            "queries": ...}`` for pairwise results whose queries come from another set.
        model: the trained model, for predicted labels (classifiers).
        task: how the model reads batches (default: the module's task).
        render: ``render(example)`` hook (see :mod:`lightning_influence.report.views`).
        tokenizer: decodes token ids one token at a time.
        label_names: class names by integer label.
        token_scores: per-token scores (see :func:`html_report`).
        top_k: examples per ranking.
        queries: queries shown per pairwise result.
        scores: score forms shown beside the raw one (see :func:`html_report`).
        mark_ids: training ids to badge and mark in the histograms.
        mark_label: the badge's text (e.g. ``"flipped label"``).
        plots: embed the plots.
        reports: reports already collected (default: :func:`collect_report` of ``run_dir``).
        keep_richer: never replace a page at ``out`` that knew more than this call (what the
            ``report`` command does): without ``mark_ids``, the page's marked ids and their label
            are kept; when the page shows more rendered examples or predicted labels than this
            call can (the training run rendered them from its datasets or model), it is left as
            it is and this page is written beside it as ``<name>-cli.html``; so is a page rendered
            from ``datasets`` when this call has none.
        notes: a list that receives a sentence for each of those decisions.

    Returns:
        The path written.

    Raises:
        FileNotFoundError: the run has no influence artifacts.
    """
    root = find_influence_dir(run_dir)
    reports = reports if reports is not None else collect_report(root, top_k=top_k, queries=queries)
    views = collect_views(root)
    train_src, query_src = _sources(datasets)
    want_train, want_queries = _needed(reports)
    common = dict(model=model, task=task, render=render, tokenizer=tokenizer, label_names=label_names)
    if train_src is not None:
        views.train.update(example_views(train_src, want_train, **common))
    if query_src is not None:
        views.queries.update(example_views(query_src, want_queries, **common))
    path = Path(out) if out is not None else root / "plots" / HTML_NAME
    notes = notes if notes is not None else []
    shown = [v for v in list(views.train.values()) + list(views.queries.values()) if v.has_content()]
    record = {"rendered": len(shown), "predicted": sum(v.predicted is not None for v in shown),
              "rendered_from": "datasets" if train_src is not None or query_src is not None else "artifacts"}
    old = page_record(path) if keep_richer else None
    if old is not None:
        if mark_ids is None and old.get("mark_ids"):
            mark_ids, mark_label = old["mark_ids"], str(old.get("mark_label") or mark_label)
            notes.append(f"kept the {len(mark_ids)} ids marked '{mark_label}' on {path} (--mark-ids FILE replaces them)")
        richer = [f"{old[k]} {what}" for k, what in (("rendered", "rendered examples"), ("predicted", "predicted labels"))
                  if isinstance(old.get(k), int) and old[k] > record[k]]
        if old.get("rendered_from") == "datasets" and record["rendered_from"] != "datasets":
            richer.insert(0, "examples rendered from the datasets it was given")
        if richer:
            kept = path
            path = path.with_name(f"{path.stem}-cli{path.suffix}")
            notes.append(f"left {kept} as it is: it shows {' and '.join(richer)}, more than this report can find "
                         f"in the artifacts; wrote {path} instead")
    record.update(mark_ids=sorted({int(i) for i in mark_ids}) if mark_ids is not None else [], mark_label=mark_label)
    path.parent.mkdir(parents=True, exist_ok=True)
    run = "/".join(root.resolve().parent.parts[-2:]) if root.name == "influence" else root.name
    text = html_report(reports, views, title=f"Influence report: {run}", scores=scores,
                       mark_ids=mark_ids, mark_label=mark_label, token_scores=token_scores, plots=plots, record=record)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def page_record(path: str | os.PathLike) -> Optional[dict[str, Any]]:
    """The record a page written by :func:`write_html_report` embeds (``rendered``: examples
    shown with their content, ``predicted``: with a predicted label, ``rendered_from``:
    ``"artifacts"`` or ``"datasets"``, ``mark_ids``, ``mark_label``), or ``None`` for a missing
    file or a page without one."""
    try:
        head = Path(path).read_text(encoding="utf-8", errors="replace")[:200_000]
    except OSError:
        return None
    m = re.search(rf'<meta name="{_RECORD_META}" content="([^"]*)">', head)
    if m is None:
        return None
    try:
        record = json.loads(html.unescape(m.group(1)))
    except ValueError:
        return None
    return record if isinstance(record, dict) else None
