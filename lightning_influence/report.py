"""Turn a run's ``influence/`` artifacts into what a user asks first.

* :func:`collect_report` reads every artifact below a run's ``influence/`` folder into
  :class:`MethodReport` objects, choosing each reader by the manifest's ``kind`` (``"ekfac"``
  factors, ``"scores"``, ``"z0"`` recordings), never by folder name; per-epoch artifacts
  (``epoch=NNNN/...``) are summarised by the latest one;
* :func:`render` prints them as an aligned table, JSON or CSV;
* :func:`write_plots` draws PNGs (self-influence distribution with the flagged tail, EK-FAC
  eigenvalue spectra) with matplotlib's Agg backend.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import torch
from torch import Tensor

from .storage import ArtifactError, list_artifacts, read_manifest

__all__ = [
    "MethodReport",
    "find_influence_dir",
    "collect_report",
    "read_report",
    "READERS",
    "render",
    "make_figures",
    "write_plots",
    "log_figures",
    "PLOT_SIZE",
]

PLOT_SIZE = (800, 500)  # pixels of every PNG (width, height)
_DPI = 100
_EPOCH = re.compile(r"^epoch=(\d+)$")


@dataclass
class MethodReport:
    """What one artifact says.

    Attributes:
        method: ``"ekfac factors"``, ``"z0 recording"``, or the method of saved scores
            (``"ekfac"``, ``"z0"``, ``"lissa"``, ...).
        artifact: path of the artifact directory.
        label: the name of the callback that wrote it (its ``name``), else the method; names
            figures, so two callbacks of one method keep apart.
        summary: small facts (counts, options, epochs).
        self_top: most self-influential ``(id, score)``, highest first.
        pairwise_top: per query, ``{"query_id", "proponents": [(id, score)...], "opponents": [...]}``.
        self_scores: ``(ids, scores)`` for plots, when the artifact has self-influence.
        spectra: layer → sorted corrected eigenvalues (EK-FAC factors only).
        notes: things the user should know (e.g. why pairwise scores are missing).
    """

    method: str
    artifact: Path
    label: str = ""
    summary: dict[str, Any] = field(default_factory=dict)
    self_top: list[tuple[int, float]] = field(default_factory=list)
    pairwise_top: list[dict[str, Any]] = field(default_factory=list)
    self_scores: Optional[tuple[Tensor, Tensor]] = None
    spectra: dict[str, Tensor] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.label = self.label or self.method.split()[0]


def find_influence_dir(run_dir: str | os.PathLike) -> Path:
    """The ``influence/`` directory of a run (``run_dir`` itself, ``run_dir/influence``, or the
    single ``influence`` folder below ``run_dir``).

    Raises:
        FileNotFoundError: nothing found, or several runs found (the message lists them).
    """
    d = Path(run_dir)
    if not d.exists():
        raise FileNotFoundError(f"{d} does not exist")
    if d.name == "influence" and d.is_dir():
        return d
    if (d / "influence").is_dir():
        return d / "influence"
    found = sorted(p for p in d.rglob("influence") if p.is_dir())
    if len(found) == 1:
        return found[0]
    if not found:
        raise FileNotFoundError(
            f"no influence/ folder under {d}: train with an influence callback (EKFACInfluence, Z0Influence, "
            "LiSSASelfInfluence) and point this at the run's log directory"
        )
    listing = "\n  ".join(str(p.parent) for p in found)
    raise FileNotFoundError(f"several runs under {d}; pass one of:\n  {listing}")


def collect_report(run_dir: str | os.PathLike, top_k: int = 10, queries: int = 5) -> list[MethodReport]:
    """Read every artifact under a run's ``influence/`` folder.

    Per-epoch artifacts (``<callback>/epoch=NNNN/<artifact>``) are represented by the end-of-fit
    artifact of the same callback when there is one, else by their latest epoch (the summary
    says how many epochs were recorded).

    Args:
        run_dir: the run's log directory (or its ``influence/`` folder).
        top_k: how many examples to list per ranking.
        queries: at most this many queries get a proponent/opponent list.

    Raises:
        FileNotFoundError: no influence folder, or it holds no complete artifact (the message
            names the incomplete ones).
    """
    root = find_influence_dir(run_dir)
    latest: dict[tuple[str, ...], tuple[int, Path]] = {}
    epochs: dict[tuple[str, ...], int] = {}
    incomplete: list[str] = []
    for info in list_artifacts(root):
        rel = info.path.relative_to(root)
        if info.kind not in READERS:
            incomplete.append(f"{rel} ({'no readable manifest.json' if info.kind is None else f'unknown kind {info.kind!r}'})")
            continue
        epoch_part = next((p for p in rel.parts if _EPOCH.match(p)), None)
        key = tuple(p for p in rel.parts if p != epoch_part)
        order = 1 << 30 if epoch_part is None else int(_EPOCH.match(epoch_part).group(1))
        epochs[key] = epochs.get(key, 0) + int(epoch_part is not None)
        if key not in latest or order > latest[key][0]:
            latest[key] = (order, info.path)
    reports: list[MethodReport] = []
    for key in sorted(latest):
        path = latest[key][1]
        try:
            rep = read_report(path, top_k, queries)
        except ArtifactError as e:
            incomplete.append(f"{path.relative_to(root)} ({e})")
            continue
        if epochs.get(key):
            rep.summary["epochs_recorded"] = epochs[key]
        reports.append(rep)
    if not reports:
        detail = "; incomplete: " + "; ".join(incomplete) if incomplete else ""
        raise FileNotFoundError(f"{root} holds no complete influence artifact{detail}")
    reports[0].notes += [f"skipped incomplete artifact {i}" for i in incomplete]
    return reports


def read_report(path: str | os.PathLike, top_k: int = 10, queries: int = 5) -> MethodReport:
    """The :class:`MethodReport` of one artifact, read by its manifest's ``kind``.

    Raises:
        ArtifactError: not a readable artifact of a kind the report knows.
    """
    p = Path(path)
    manifest = read_manifest(p)
    kind = None if manifest is None else manifest.get("kind")
    if kind not in READERS:
        raise ArtifactError(f"{p} is not an artifact the report can read (kind {kind!r}; known: {sorted(READERS)})")
    return READERS[kind](p, top_k, queries)


def _ekfac_report(path: Path, top_k: int, queries: int) -> MethodReport:
    from .ekfac.factors import load_factors

    f = load_factors(path)
    rep = MethodReport("ekfac factors", path, label=str(f.meta.get("callback", "")))
    rep.summary = {
        "layers": len(f.layers),
        "fisher": f.fisher,
        "examples": f.n_examples,
        "correction_examples": f.n_lambda_examples,
        "epochs_completed": f.meta.get("epochs_completed"),
    }
    rep.spectra = {n: torch.sort(l.lambdas.reshape(-1), descending=True).values for n, l in f.layers.items()}
    return rep


def _scores_report(path: Path, top_k: int, queries: int) -> MethodReport:
    from .scores import load_scores

    s = load_scores(path)
    rep = MethodReport(s.method, path, label=str(s.meta.get("callback", "")))
    rep.summary = {"train_examples": s.n_train}
    if s.epoch is not None:
        rep.summary["epoch"] = s.epoch
    if s.self_influence is not None:
        rep.self_top = s.top_self(top_k)
        rep.self_scores = (s.train_ids, s.self_influence)
        rep.summary.update(_distribution(s.self_influence))
    if s.pairwise is not None:
        rep.summary["queries"] = int(s.query_ids.shape[0])
        rep.pairwise_top = s.top_pairwise(top_k).as_rows()[:queries]
    return rep


def _z0_report(path: Path, top_k: int, queries: int) -> MethodReport:
    """A Z0 recording: checkpoints and, with queries, train-test influence (its self-influence
    is the ``"scores"`` artifact the callback writes beside it)."""
    from .scores import InfluenceScores
    from .z0 import load_z0

    z = load_z0(path)
    rep = MethodReport("z0 recording", path)
    rep.summary = {"checkpoints": z.num_checkpoints, "train_examples": int(z.probe_ids.shape[0])}
    if z.num_checkpoints < 2:
        rep.notes.append("fewer than 2 recorded checkpoints: no Z0 estimate yet")
        return rep
    if z.query_losses is not None:
        try:
            qs = InfluenceScores("z0", z.probe_ids, query_ids=z.query_ids, pairwise=z.pairwise())
            rep.summary["queries"] = int(z.query_ids.shape[0])
            rep.pairwise_top = qs.top_pairwise(top_k).as_rows()[:queries]
        except (ValueError, RuntimeError) as e:
            rep.notes.append(f"no Z0 train-test influence: {e}")
    return rep


READERS: dict[str, Callable[[Path, int, int], MethodReport]] = {
    "ekfac": _ekfac_report,
    "scores": _scores_report,
    "z0": _z0_report,
}
"""Artifact ``kind`` → reader ``(path, top_k, queries) -> MethodReport``."""


def _distribution(x: Tensor) -> dict[str, float]:
    x = x.double()
    x = x[torch.isfinite(x)]
    if not x.numel():
        return {}
    q = torch.quantile(x, torch.tensor([0.5, 0.9], dtype=torch.float64))
    return {"mean": float(x.mean()), "median": float(q[0]), "p90": float(q[1]), "max": float(x.max())}


# -- rendering ---------------------------------------------------------------------------------
def render(reports: list[MethodReport], fmt: Literal["table", "json", "csv"] = "table") -> str:
    """Render reports as ``"table"`` (for people), ``"json"`` or ``"csv"`` (for programs)."""
    if fmt == "json":
        return json.dumps([_as_dict(r) for r in reports], indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["method", "ranking", "query_id", "rank", "id", "score"])
        for r in reports:
            for rank, (i, s) in enumerate(r.self_top, 1):
                w.writerow([r.method, "self_influence", "", rank, i, f"{s:.6g}"])
            for item in r.pairwise_top:
                for direction in ("proponents", "opponents"):
                    for rank, (i, s) in enumerate(item[direction], 1):
                        w.writerow([r.method, direction, item["query_id"], rank, i, f"{s:.6g}"])
        return buf.getvalue()
    if fmt != "table":
        raise ValueError(f"format must be 'table', 'json' or 'csv', got {fmt!r}")
    return "\n".join(_table(r) for r in reports)


def _as_dict(r: MethodReport) -> dict[str, Any]:
    return {
        "method": r.method,
        "artifact": str(r.artifact),
        "summary": r.summary,
        "self_influence_top": [{"id": i, "score": s} for i, s in r.self_top],
        "pairwise_top": [
            {"query_id": p["query_id"],
             "proponents": [{"id": i, "score": s} for i, s in p["proponents"]],
             "opponents": [{"id": i, "score": s} for i, s in p["opponents"]]}
            for p in r.pairwise_top
        ],
        "notes": r.notes,
    }


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _table(r: MethodReport) -> str:
    lines = [f"== {r.method}  ({r.artifact})", "   " + ", ".join(f"{k}={_fmt(v)}" for k, v in r.summary.items())]
    if r.self_top:
        lines.append("   most self-influential (atypical / possibly mislabeled):")
        lines.append(f"   {'rank':>4}  {'id':>8}  {'score':>12}")
        lines += [f"   {k:>4}  {i:>8}  {s:>12.5g}" for k, (i, s) in enumerate(r.self_top, 1)]
    for item in r.pairwise_top:
        lines.append(f"   query {item['query_id']}: proponents (help)         | opponents (hurt)")
        for (i, s), (j, t) in zip(item["proponents"], item["opponents"]):
            lines.append(f"      {i:>8} {s:>+12.5g}            | {j:>8} {t:>+12.5g}")
    if r.spectra:
        lines.append(f"   {'layer':<48} {'lambda max':>12} {'lambda mean':>12}")
        for n, lam in r.spectra.items():
            lines.append(f"   {n[-48:]:<48} {float(lam[0]):>12.4g} {float(lam.mean()):>12.4g}")
    lines += [f"   note: {n}" for n in r.notes]
    return "\n".join(lines) + "\n"


# -- plots -------------------------------------------------------------------------------------
def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - matplotlib is in the dev/report extras
        raise ImportError("plots need matplotlib: pip install 'lightning-influence[report]'") from e
    return plt


def make_figures(reports: list[MethodReport], flag_fraction: float = 0.1) -> list[tuple[str, Any]]:
    """Matplotlib figures ``(name, figure)`` for the reports (``PLOT_SIZE`` pixels each).

    * ``self_influence_<label>``: histogram of self-influence with the top ``flag_fraction``
      (the flagged tail) shaded;
    * ``<label>_spectra``: sorted corrected eigenvalues per layer (log scale), for factors.

    ``<label>`` is :attr:`MethodReport.label` (the callback's name).

    The caller closes them (``matplotlib.pyplot.close(fig)``).

    Raises:
        ImportError: matplotlib is not installed (``pip install lightning-influence[report]``).
    """
    plt = _pyplot()
    size = (PLOT_SIZE[0] / _DPI, PLOT_SIZE[1] / _DPI)
    figures = []
    for r in reports:
        if r.self_scores is not None:
            scores = r.self_scores[1].double()
            scores = scores[torch.isfinite(scores)]
            if not scores.numel():
                continue
            cut = float(torch.quantile(scores, 1 - flag_fraction))
            fig, ax = plt.subplots(figsize=size, dpi=_DPI)
            ax.hist(scores.numpy(), bins=50, color="#4c72b0")
            ax.axvspan(cut, float(scores.max()), color="#dd8452", alpha=0.3, label=f"flagged top {flag_fraction:.0%}")
            ax.set_yscale("log")  # self-influence is heavy-tailed: keep the flagged tail visible
            ax.set_xlabel("self-influence")
            ax.set_ylabel("examples (log scale)")
            ax.set_title(f"{r.method}: self-influence of {len(scores)} examples")
            ax.legend()
            figures.append((f"self_influence_{_slug(r.label)}", fig))
        if r.spectra:
            fig, ax = plt.subplots(figsize=size, dpi=_DPI)
            for n, lam in r.spectra.items():
                ax.semilogy(lam.clamp_min(1e-30).numpy(), label=n[-40:])
            ax.set_xlabel("index (sorted)")
            ax.set_ylabel("corrected eigenvalue Λ")
            ax.set_title("EK-FAC eigenvalue spectra")
            ax.legend(fontsize=7)
            figures.append((f"{_slug(r.label)}_spectra", fig))
    return figures


def write_plots(reports: list[MethodReport], out_dir: str | os.PathLike, flag_fraction: float = 0.1) -> list[Path]:
    """Write :func:`make_figures` as PNGs into ``out_dir``; returns their paths."""
    plt = _pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in make_figures(reports, flag_fraction):
        p = out / f"{name}.png"
        fig.savefig(p, dpi=_DPI)
        plt.close(fig)
        paths.append(p)
    return paths


def log_figures(loggers: list[Any], reports: list[MethodReport], step: int = 0) -> int:
    """Log :func:`make_figures` as images to every TensorBoard logger; returns how many were logged.

    Does nothing (and needs no matplotlib) when no logger is a TensorBoard logger.
    """
    boards = [lg for lg in loggers if type(lg).__name__ == "TensorBoardLogger"]
    if not boards:
        return 0
    try:
        figures = make_figures(reports)
    except ImportError:
        return 0
    plt = _pyplot()
    for name, fig in figures:
        for lg in boards:
            lg.experiment.add_figure(f"influence/{name}", fig, global_step=step, close=False)
        plt.close(fig)
    return len(figures) * len(boards)


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in s).strip("_")
