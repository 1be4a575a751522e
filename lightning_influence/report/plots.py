"""Plots of a run's reports (matplotlib, Agg backend), as PNG files or logger images.

* ``self_influence_<label>``: histogram of self-influence with the flagged top tail shaded and,
  optionally, a set of ids the user already knows about (e.g. flipped labels) drawn on top;
* ``<label>_spectra``: each layer's sorted corrected eigenvalues Λ with its damping λ dashed,
  clipped below at 1% of the smallest damping: an eigenvalue that small changes ``1/(Λ + λ)``,
  and so every score, by less than 1%, and the float32 zeros below it (1e-16 … 1e-30) would
  otherwise take most of the axis. A layer with more than ``SPECTRUM_POINTS`` eigenvalues left
  (a GPT-2 MLP has 2.4 million) is drawn through that many evenly spaced ones, first and last
  included: the sorted curve is monotone, so the picture is the same to the anti-aliasing.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import torch

from ..ranking import top_k
from .collect import MethodReport

__all__ = ["PLOT_SIZE", "make_figures", "report_figures", "write_plots", "log_figures", "figure_png", "report_pngs", "SPECTRUM_FLOOR", "SPECTRUM_POINTS", "MARGINS"]

PLOT_SIZE = (800, 500)  # pixels of every PNG (width, height)
SPECTRUM_FLOOR = 0.01  # eigenvalues below this fraction of the smallest damping are not drawn
SPECTRUM_POINTS = 8000  # vertices drawn per layer's spectrum at most (10 per pixel column of the axes)
_DPI = 100
# Fixed margins (fractions of PLOT_SIZE) instead of ``tight_layout``, which measured every tick
# label in an extra layout pass: about half the cost of a figure. Room for y tick labels up to
# ``2×10⁻³⁰`` beside the y label, and for x tick labels, the x label and an offset text below;
# tests/test_report_plot_layout.py draws the widest cases and checks nothing leaves the figure.
MARGINS = {"left": 0.105, "right": 0.975, "bottom": 0.115, "top": 0.93}
_MATHTEXT: list[Any] = []  # one mathtext parser shared by every figure (see _share_mathtext)
_PNGS: "OrderedDict[str, list[tuple[str, bytes]]]" = OrderedDict()  # report_pngs' images by _report_key
_PNGS_KEPT = 16
ONE_ARTIST_MINOR_TICKS = True  # see _minor_ticks_as_one_artist (False: matplotlib's own ticks, same pixels)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - matplotlib is in the demo/report extras
        raise ImportError("plots need matplotlib: pip install 'lightning-influence[report]'") from e
    return plt


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in s).strip("_")


def _short_names(names: list[str]) -> dict[str, str]:
    """Layer names without their common dotted prefix, keeping two components at least
    (``model.transformer.h.0.mlp.c_fc`` → ``0.mlp.c_fc``; ``net.0`` stays)."""
    parts = [n.split(".") for n in names]
    common = 0
    while len(names) > 1 and all(len(p) > common + 2 for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1
    return {n: ".".join(p[common:])[-40:] for n, p in zip(names, parts)}


def _minor_ticks_as_one_artist(fig: Any, ax: Any) -> None:
    """Draw the log y axis's unlabelled minor ticks as one marker line instead of matplotlib's
    one ``Tick`` (five artists) per tick, which took a third of a figure's drawing time (8 ticks a
    decade; a spectrum spans 7 decades or more).

    The positions are matplotlib's own (the axis's minor locator at the final limits, less those
    on a major tick, within the view), the marker is copied from one of its minor ticks and it is
    drawn when the axis draws its ticks (same z-order, before the spines), so the pixels are the
    same (tests/test_report_plot_layout.py). It is no ``Line2D`` of the axes: the legend's
    ``"best"`` placement, ``ax.lines`` and the data limits do not see it, as they did not see the
    ticks. Left to matplotlib when the axis spans a decade or less, where it labels minor ticks."""
    if not ONE_ARTIST_MINOR_TICKS:
        return
    from matplotlib.artist import Artist
    from matplotlib.lines import Line2D
    from matplotlib.ticker import NullLocator

    class MinorTicks(Artist):
        def __init__(self, line: Any, zorder: float) -> None:
            super().__init__()
            self.line = line
            self.set_zorder(zorder)

        def draw(self, renderer: Any) -> None:
            if self.get_visible():
                self.line.draw(renderer)

    axis = ax.yaxis
    lo, hi = sorted(axis.get_view_interval())
    if axis.get_scale() != "log" or not lo > 0 or not np.log10(hi / lo) > 1.0 + 1e-6:
        return
    locs = np.asarray(axis.get_minorticklocs(), dtype=float)  # the locator's, less the major ticks
    t_lo, t_hi = np.log10(lo), np.log10(hi)
    tol = (t_hi - t_lo) * 1e-10  # matplotlib's own closeness test for a tick inside the view
    locs = locs[(np.log10(locs) >= t_lo - tol) & (np.log10(locs) <= t_hi + tol)] if locs.size else locs
    template = axis.get_minor_ticks(1)[0].tick1line
    line = Line2D(np.zeros(len(locs)), locs)
    line.update_from(template)  # marker, size, width, colour and the axis's tick transform
    line.set_figure(fig)
    axis.set_minor_locator(NullLocator())
    if len(locs) and template.get_visible():
        ticks = MinorTicks(line, axis.get_zorder())
        ax.add_artist(ticks)
        ticks.set_clip_on(False)  # the ticks lie outside the axes, as the axis's did


def report_figures(
    r: MethodReport,
    flag_fraction: float = 0.1,
    mark_ids: Optional[Iterable[int]] = None,
    mark_label: str = "marked examples",
) -> list[tuple[str, Any]]:
    """The figures ``(name, figure)`` of one report (see :func:`make_figures`)."""
    plt = _pyplot()
    size = (PLOT_SIZE[0] / _DPI, PLOT_SIZE[1] / _DPI)
    figures = []
    if r.self_scores is not None:
        ids, raw = r.self_scores
        raw = raw.double()
        finite = torch.isfinite(raw)
        scores = raw[finite]
        if scores.numel():
            k = max(1, int(flag_fraction * scores.numel()))
            flagged = top_k(raw, k, ids.long()).ids  # the same top ⌊p·n⌋ as evaluate.mislabel_detection
            cut = float(torch.topk(scores, k).values[-1])
            fig, ax = plt.subplots(figsize=size, dpi=_DPI)
            bins = torch.linspace(float(scores.min()), float(scores.max()) + 1e-12, 51).numpy()
            _, _, bars = ax.hist(scores.numpy(), bins=bins, color="#4c72b0", label=f"all {len(scores)} examples")
            # no translucent fills: every colour on the plot is one the legend names (no blends where they overlap)
            line = ax.axvline(cut, color="#dd8452", linestyle="--", linewidth=1.5,
                              label=f"flagged: top {flag_fraction:.0%} ({k}), right of this line")
            handles = [(bars.patches[0], f"all {len(scores)} examples"), (line, line.get_label())]
            if mark_ids is not None:
                wanted = torch.as_tensor(sorted({int(i) for i in mark_ids}), dtype=torch.long)
                marked = torch.isin(ids.long(), wanted) & finite
                hit = int(torch.isin(flagged, wanted).sum())
                _, _, outline = ax.hist(raw[marked].numpy(), bins=bins, color="#c44e52", histtype="step", linewidth=1.8,
                                        label=f"{mark_label} ({int(marked.sum())}; {hit} in the flagged tail)")
                handles.append((outline[0], outline[0].get_label()))
            ax.set_yscale("log")  # self-influence is heavy-tailed: keep the flagged tail visible
            ax.set_xlabel(f"self-influence ({r.method_key})")
            ax.set_ylabel("examples (log scale)")
            ax.set_title(f"{r.title}: {len(scores)} examples")
            ax.legend([h for h, _ in handles], [t for _, t in handles])
            fig.subplots_adjust(**MARGINS)
            _minor_ticks_as_one_artist(fig, ax)
            figures.append((f"self_influence_{_slug(r.label)}", fig))
    if r.spectra:
        fig, ax = plt.subplots(figsize=size, dpi=_DPI)
        floor = SPECTRUM_FLOOR * min(r.damping.values()) if r.damping else None
        hidden, total = 0, 0
        top = max(float(l[0]) for l in r.spectra.values())
        names = _short_names(list(r.spectra))
        for n, lam in r.spectra.items():
            keep = lam[lam > floor] if floor is not None and floor > 0 else lam[lam > 0]
            hidden, total = hidden + lam.numel() - keep.numel(), total + lam.numel()
            index = torch.arange(1, keep.numel() + 1)
            if keep.numel() > SPECTRUM_POINTS:  # evenly spaced, first and last kept: the same curve, fewer vertices
                step = torch.linspace(0, keep.numel() - 1, SPECTRUM_POINTS, dtype=torch.float64).round().long().unique()
                index, keep = index[step], keep[step]
            (line,) = ax.semilogy(index.numpy(), keep.numpy(), label=names[n])
            if n in r.damping:
                ax.axhline(r.damping[n], color=line.get_color(), linestyle="--", linewidth=1)
        if r.damping:
            ax.plot([], [], color="grey", linestyle="--", linewidth=1, label="damping λ (each layer's colour)")
        if floor is not None and floor > 0:
            ax.set_ylim(floor, top * 2)
            ax.text(0.01, 0.01, f"not drawn: {hidden} of {total} eigenvalues below 1% of the damping (none changes a score by 1%)",
                    transform=ax.transAxes, fontsize=7, va="bottom")
        ax.set_xlabel("eigenvalue index (sorted, largest first)")
        ax.set_ylabel("corrected eigenvalue Λ")
        ax.set_title(f"{r.title}: eigenvalue spectra per layer")
        ax.legend(fontsize=7, loc="upper right", ncol=2 if len(names) > 6 else 1)
        fig.subplots_adjust(**MARGINS)
        _minor_ticks_as_one_artist(fig, ax)
        figures.append((f"{_slug(r.label)}_spectra", fig))
    return figures


def make_figures(
    reports: list[MethodReport],
    flag_fraction: float = 0.1,
    mark_ids: Optional[Iterable[int]] = None,
    mark_label: str = "marked examples",
) -> list[tuple[str, Any]]:
    """Matplotlib figures ``(name, figure)`` for the reports (``PLOT_SIZE`` pixels each).

    * ``self_influence_<label>``: histogram of self-influence with the top ``flag_fraction``
      (the flagged tail) shaded and the ``mark_ids`` examples drawn in red on top;
    * ``<label>_spectra``: sorted corrected eigenvalues per layer (log scale), each with its
      damping dashed, clipped at 1% of the smallest damping, drawn through at most
      ``SPECTRUM_POINTS`` evenly spaced eigenvalues per layer (first and last included).

    ``<label>`` is :attr:`MethodReport.label` (the callback's name). The caller closes them
    (``matplotlib.pyplot.close(fig)``).

    Args:
        reports: from :func:`~lightning_influence.report.collect_report`.
        flag_fraction: the share of highest self-influence shaded as flagged.
        mark_ids: ids to draw as their own histogram (e.g. known mislabeled examples).
        mark_label: their legend entry.

    Returns:
        ``[(name, figure), ...]``.

    Raises:
        ImportError: matplotlib is not installed (``pip install lightning-influence[report]``).
    """
    marks = None if mark_ids is None else list(mark_ids)
    return [f for r in reports for f in report_figures(r, flag_fraction, marks, mark_label)]


def _share_mathtext(fig: Any) -> None:
    """Give the figure's Agg renderer the parser every earlier figure used.

    Log-scale tick labels (``10⁻³``) are mathtext; matplotlib caches a parsed label per parser,
    and each new figure's renderer makes a new parser, so every figure parsed its labels again
    (about 10 ms each). The parse only depends on the text, dpi and font, so sharing the parser
    draws the same pixels. Where the backend has no such attribute this does nothing."""
    try:
        renderer = fig.canvas.get_renderer()
    except AttributeError:  # not an Agg canvas
        return
    if not hasattr(renderer, "mathtext_parser"):
        return
    if not _MATHTEXT:
        _MATHTEXT.append(renderer.mathtext_parser)
    renderer.mathtext_parser = _MATHTEXT[0]


def figure_png(fig: Any) -> bytes:
    """A figure's PNG bytes (``PLOT_SIZE`` pixels)."""
    _share_mathtext(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI)
    return buf.getvalue()


def _report_key(r: MethodReport, flag_fraction: float, marks: Optional[list[int]], mark_label: str) -> str:
    """A digest of everything :func:`report_figures` draws from (the report's scores, spectra,
    damping, names and the drawing options)."""
    h = hashlib.blake2b(digest_size=20)

    def add(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            if t.dtype == torch.bfloat16:  # numpy has no bfloat16: hash the same bits as int16
                t = t.view(torch.int16)
            h.update(t.numpy().reshape(-1).view(np.uint8))  # the tensor's bytes, without a copy
        else:
            h.update(repr(x).encode())
            h.update(b"\0")

    add((str(r.artifact), r.label, r.title, r.method_key, float(flag_fraction)))
    add((sorted({int(i) for i in marks}), mark_label) if marks is not None else None)
    for t in r.self_scores or ():
        add(t)
    for name, lam in (r.spectra or {}).items():
        add(name)
        add(lam)
    add(sorted((r.damping or {}).items()))
    return h.hexdigest()


def _remember(key: str, pngs: list[tuple[str, bytes]]) -> None:
    _PNGS[key] = pngs
    _PNGS.move_to_end(key)
    while len(_PNGS) > _PNGS_KEPT:
        _PNGS.popitem(last=False)


def report_pngs(
    r: MethodReport,
    flag_fraction: float = 0.1,
    mark_ids: Optional[Iterable[int]] = None,
    mark_label: str = "marked examples",
) -> list[tuple[str, bytes]]:
    """The PNG bytes ``(name, png)`` of :func:`report_figures`, drawn once per process for the
    same content: the images a logger took at the end of training (:func:`log_figures`) are the
    ones the HTML report embeds afterwards. The last 16 reports' images are kept."""
    marks = None if mark_ids is None else list(mark_ids)
    key = _report_key(r, flag_fraction, marks, mark_label)
    if key in _PNGS:
        _PNGS.move_to_end(key)
        return list(_PNGS[key])
    plt = _pyplot()
    pngs = []
    for name, fig in report_figures(r, flag_fraction, marks, mark_label):
        pngs.append((name, figure_png(fig)))
        plt.close(fig)
    _remember(key, pngs)
    return list(pngs)


def _rgb(png: bytes) -> np.ndarray:
    """``[H, W, 3]`` uint8 pixels of a PNG (what TensorBoard's ``add_figure`` takes from a canvas)."""
    from PIL import Image  # matplotlib's own PNG writer needs Pillow

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGBA"))[..., :3]


def write_plots(
    reports: list[MethodReport],
    out_dir: str | os.PathLike,
    flag_fraction: float = 0.1,
    mark_ids: Optional[Iterable[int]] = None,
    mark_label: str = "marked examples",
) -> list[Path]:
    """Write :func:`make_figures` as PNGs into ``out_dir``; returns their paths."""
    plt = _pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in make_figures(reports, flag_fraction, mark_ids, mark_label):
        p = out / f"{name}.png"
        p.write_bytes(figure_png(fig))
        plt.close(fig)
        paths.append(p)
    return paths


def _kind(logger: Any) -> Optional[str]:
    return {"TensorBoardLogger": "tensorboard", "MLFlowLogger": "mlflow", "WandbLogger": "wandb"}.get(type(logger).__name__)


def log_figures(loggers: list[Any], reports: list[MethodReport], step: int = 0) -> int:
    """Log :func:`make_figures` as images to every TensorBoard, MLflow and Weights & Biases
    logger; returns how many images were logged.

    TensorBoard: ``add_image("influence/<name>")`` of the figure's pixels (what ``add_figure``
    logs; the same PNG is kept for the HTML report, see :func:`report_pngs`); MLflow: ``log_figure`` into the run's
    artifact ``influence/plots/<name>.png``; W&B: ``log({"influence/<name>": wandb.Image, "trainer/global_step": step})`` (the
    step key WandbLogger uses for metrics).
    Does nothing (and needs no matplotlib) when no logger is one of these.

    Args:
        loggers: the trainer's loggers.
        reports: the reports to draw.
        step: the global step to log at.

    Returns:
        Images logged (figures × loggers).
    """
    targets = [(lg, _kind(lg)) for lg in loggers if _kind(lg) is not None]
    if not targets:
        return 0
    try:
        plt = _pyplot()
    except ImportError:
        return 0
    logged = 0
    for r in reports:
        pngs = []
        for name, fig in report_figures(r):
            png = figure_png(fig)  # drawn once: TensorBoard's image, and the HTML report's (report_pngs)
            pngs.append((name, png))
            for lg, kind in targets:
                if kind == "tensorboard":  # the pixels add_figure would take from the canvas
                    lg.experiment.add_image(f"influence/{name}", _rgb(png), global_step=step, dataformats="HWC")
                elif kind == "mlflow":
                    lg.experiment.log_figure(lg.run_id, fig, f"influence/plots/{name}.png")
                else:
                    import wandb

                    lg.experiment.log({f"influence/{name}": wandb.Image(fig), "trainer/global_step": step})
            logged += len(targets)
            plt.close(fig)
        _remember(_report_key(r, 0.1, None, "marked examples"), pngs)
    return logged
