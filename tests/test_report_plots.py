"""Plots: spectra clipped where eigenvalues stop mattering, with each layer's damping drawn;
histograms that mark known examples; readable score forms (normalised, rank)."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch

from lightning_influence.report import MethodReport, make_figures
from lightning_influence.report.methods import normalised, rank_text, robust_scale


@pytest.fixture()
def plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    yield plt
    plt.close("all")


def test_spectra_drop_eigenvalues_below_one_percent_of_the_damping_and_draw_the_damping(plt):
    spectra = {"model.block.0.fc": torch.tensor([2.0, 0.5, 1e-3, 2e-4, 1e-20, 0.0], dtype=torch.float64),
               "model.block.1.fc": torch.tensor([1.0, 1e-2, 1e-5, 1e-30], dtype=torch.float64)}
    damping = {"model.block.0.fc": 0.05, "model.block.1.fc": 0.01}
    r = MethodReport("ekfac factors", Path("f"), label="ekfac", spectra=spectra, damping=damping)
    (name, fig), = make_figures([r])
    ax = fig.axes[0]
    assert name == "ekfac_spectra"
    floor = 0.01 * 0.01  # 1% of the smallest damping
    curves = [line for line in ax.lines if len(line.get_xdata()) > 2 or line.get_linestyle() == "-"]
    drawn = {line.get_label(): line.get_ydata() for line in curves if line.get_label() in ("0.fc", "1.fc")}
    assert np.allclose(drawn["0.fc"], [2.0, 0.5, 1e-3, 2e-4]) and np.allclose(drawn["1.fc"], [1.0, 1e-2])
    flat = sorted(float(line.get_ydata()[0]) for line in ax.lines if line.get_linestyle() == "--" and len(line.get_ydata()))
    assert flat == pytest.approx([0.01, 0.05])  # one dashed line per layer, at its damping
    assert ax.get_ylim()[0] == pytest.approx(floor)
    assert "not drawn: 4 of 10 eigenvalues" in " ".join(t.get_text() for t in ax.texts)


def test_histogram_marks_the_given_ids_and_counts_them_in_the_flagged_tail(plt):
    g = torch.Generator().manual_seed(0)
    ids = torch.arange(100, 300)
    scores = torch.rand(200, generator=g).pow(3) * 50
    marks = [100, 105, int(ids[torch.argmax(scores)]), 9999]
    r = MethodReport("lissa", Path("s"), label="lissa", self_scores=(ids, scores))
    (name, fig), = make_figures([r], flag_fraction=0.1, mark_ids=marks, mark_label="flipped")
    flagged = ids.numpy()[np.argsort(-scores.numpy(), kind="stable")[:20]]  # the top 10% of 200
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert name == "self_influence_lissa"
    assert f"flipped (3; {int(np.isin(flagged, marks).sum())} in the flagged tail)" in legend
    assert legend[:2] == ["all 200 examples", "flagged: top 10% (20), right of this line"]
    # every colour drawn is one the legend names: opaque fills only, so nothing blends where they overlap
    ax = fig.axes[0]
    assert all(p.get_alpha() in (None, 1.0) for p in ax.patches)
    drawn = {matplotlib.colors.to_hex(p.get_facecolor() if p.get_fill() else p.get_edgecolor()) for p in ax.patches}
    drawn |= {matplotlib.colors.to_hex(l.get_color()) for l in ax.lines}
    named = {matplotlib.colors.to_hex(h.get_facecolor() if getattr(h, "get_fill", lambda: False)() else
                                      (h.get_edgecolor() if hasattr(h, "get_edgecolor") and not hasattr(h, "get_color") else h.get_color()))
             for h in ax.get_legend().legend_handles}
    assert drawn <= named, (drawn, named)


def test_normalised_and_rank_forms():
    s = torch.tensor([4.0, -1.0, 2.0, 3.0, float("nan")])
    assert robust_scale(s) == pytest.approx(np.median([4.0, 1.0, 2.0, 3.0]))  # middle two averaged; nan left out
    assert robust_scale(torch.zeros(5)) is None and robust_scale(torch.tensor([0.0, 0.0, 0.0, 2.0])) == pytest.approx(0.5)
    assert normalised(5.0, 2.5) == 2.0 and normalised(float("inf"), 2.5) is None and normalised(1.0, None) is None
    assert rank_text(1, 1437) == "top 0.07%" and rank_text(3, 20, bottom=True) == "bottom 15%" and rank_text(5, 200) == "top 2.5%"
