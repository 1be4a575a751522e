"""The report's plots with fixed margins (no ``tight_layout`` pass): on the widest labels a run can
produce (log ticks down to 10⁻³⁰, minor tick labels such as 3×10⁰, offset texts, long legends and
layer names), everything drawn stays inside the PNG, the legend inside the axes, and sharing the
mathtext parser between figures draws the same pixels as a figure drawn on its own."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_influence.report import PLOT_SIZE, MethodReport, make_figures
from lightning_influence.report.plots import MARGINS, figure_png


@pytest.fixture()
def plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    yield plt
    plt.close("all")


def _hist(scores: torch.Tensor, title: str = "lissa") -> MethodReport:
    return MethodReport(title, Path("s"), label=title, self_scores=(torch.arange(scores.numel()), scores))


def _cases() -> list[tuple[str, MethodReport, dict]]:
    g = torch.Generator().manual_seed(0)
    long = "a very long label for the marked examples that a user chose"
    spectra_names = [f"model.transformer.h.{i}.attention.query_key_value_projection" for i in range(9)]
    deep = {n: torch.logspace(12, -30, 40, dtype=torch.float64) * (k + 1) for k, n in enumerate(spectra_names)}
    return [
        # counts over five decades on the log y axis, scores of order 1e-7 (an offset or scientific x labels)
        ("tiny scores, many examples", _hist(torch.rand(100_000, generator=g).pow(6) * 1e-7), {"mark_ids": range(0, 5000, 7), "mark_label": long}),
        # every bin between 2 and 9 examples: less than a decade, so matplotlib labels the minor ticks (3×10⁰ ...)
        ("counts within one decade", _hist(torch.cat([torch.full((2 + k % 8,), k + 0.5) for k in range(50)])), {}),
        ("huge negative and positive scores", _hist((torch.randn(500, generator=g) * 1e9)), {"mark_ids": [1, 2, 3]}),
        ("deep spectra, nine long layer names", MethodReport("ekfac factors", Path("f"), label="ekfac", spectra=deep,
                                                             damping={n: 1e-28 for n in spectra_names}), {}),
        ("spectra above 1e12", MethodReport("ekfac factors", Path("f"), label="ekfac",
                                            spectra={"fc": torch.logspace(14, 10, 30, dtype=torch.float64)}, damping={"fc": 1e10}), {}),
    ]


def _outside(fig) -> list[str]:
    """What a drawn figure shows outside its canvas, or outside the axes for the legend and notes."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    w, h = PLOT_SIZE
    ax = fig.axes[0]
    bad = []
    box = ax.get_tightbbox(renderer)  # ticks, tick labels, axis labels, offset texts, title, legend
    if box.x0 < -0.5 or box.y0 < -0.5 or box.x1 > w + 0.5 or box.y1 > h + 0.5:
        bad.append(f"axes content {box.bounds} outside the {w}x{h} figure")
    inner = ax.get_window_extent(renderer)
    legend = ax.get_legend().get_window_extent(renderer)
    if legend.x0 < inner.x0 - 0.5 or legend.x1 > inner.x1 + 0.5 or legend.y0 < inner.y0 - 0.5 or legend.y1 > inner.y1 + 0.5:
        bad.append(f"legend {legend.bounds} outside the axes {inner.bounds}")
    for t in ax.texts:
        e = t.get_window_extent(renderer)
        if e.x0 < inner.x0 - 0.5 or e.x1 > inner.x1 + 0.5:
            bad.append(f"note {t.get_text()[:30]!r} outside the axes")
    ylabel = ax.yaxis.label.get_window_extent(renderer)
    drawn = [t.label1 for t in ax.yaxis._update_ticks() if t.label1.get_visible() and t.label1.get_text()]  # the ticks in view
    if drawn and ylabel.x1 > min(t.get_window_extent(renderer).x0 for t in drawn) + 0.5:
        bad.append("y label overlaps the y tick labels")
    return bad


@pytest.mark.parametrize("case", range(len(_cases())), ids=[c[0] for c in _cases()])
def test_every_label_title_and_legend_is_inside_the_figure(plt, case):
    _, report, kw = _cases()[case]
    (name, fig), = make_figures([report], **kw)
    assert fig.subplotpars.left == pytest.approx(MARGINS["left"])  # the fixed margins, not a layout pass
    assert _outside(fig) == []
    assert Image.open(io.BytesIO(figure_png(fig))).size == PLOT_SIZE


def test_the_check_sees_a_clipped_label(plt):
    """The layout check is not vacuous: with a too narrow left margin it reports the y labels."""
    _, report, kw = _cases()[3]
    (_, fig), = make_figures([report], **kw)
    fig.subplots_adjust(left=0.02)
    assert any("outside the" in b for b in _outside(fig))


def test_shared_mathtext_parser_draws_the_same_pixels(plt):
    """figure_png shares one mathtext parser across figures; a figure saved alone by matplotlib
    (its own parser) has the same pixels."""
    _, spectra, _ = _cases()[3]
    _, hist, kw = _cases()[1]
    for report, kwargs in ((spectra, {}), (hist, kw), (spectra, {})):
        (_, shared), = make_figures([report], **kwargs)
        (_, alone), = make_figures([report], **kwargs)
        buf = io.BytesIO()
        alone.savefig(buf, format="png", dpi=100)
        a = np.asarray(Image.open(io.BytesIO(figure_png(shared))))
        b = np.asarray(Image.open(buf))
        assert a.shape == b.shape == (PLOT_SIZE[1], PLOT_SIZE[0], 4) and np.array_equal(a, b)


def _pixels(fig) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(figure_png(fig))))


@pytest.mark.parametrize("case", range(len(_cases())), ids=[c[0] for c in _cases()])
def test_minor_ticks_drawn_as_one_artist_are_matplotlibs_pixels(plt, monkeypatch, case):
    """The log axis's minor ticks as one marker line give the same PNG as matplotlib's own ticks;
    on an axis within a decade (labelled minor ticks) matplotlib keeps them."""
    import lightning_influence.report.plots as plots

    _, report, kw = _cases()[case]
    (_, fast), = make_figures([report], **kw)
    monkeypatch.setattr(plots, "ONE_ARTIST_MINOR_TICKS", False)
    (_, reference), = make_figures([report], **kw)
    lo, hi = sorted(reference.axes[0].get_ylim())
    minor = reference.axes[0].yaxis.get_minorticklocs()
    shown = minor[(minor >= lo) & (minor <= hi)]
    one_artist = [a for a in fast.axes[0].artists if type(a).__name__ == "MinorTicks"]
    if np.log10(hi / lo) > 1.0 and len(shown):
        assert len(one_artist) == 1 and len(fast.axes[0].yaxis.get_minorticklocs()) == 0
        assert np.allclose(sorted(one_artist[0].line.get_ydata()), sorted(shown))
    else:  # within a decade, or no minor ticks at all (over ten decades): matplotlib's ticks as they were
        assert one_artist == []
    assert np.array_equal(_pixels(fast), _pixels(reference))
    assert [a.get_label() for a in fast.axes[0].lines] == [a.get_label() for a in reference.axes[0].lines]
