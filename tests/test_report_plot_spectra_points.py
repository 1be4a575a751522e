"""A spectrum with millions of eigenvalues (a GPT-2 MLP has 2.4 million) is drawn through at most
SPECTRUM_POINTS evenly spaced ones: the same axes and the same picture as every eigenvalue drawn,
up to anti-aliasing, and the counts in the note are of all of them."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import lightning_influence.report.plots as plots
from lightning_influence.report import MethodReport, make_figures


@pytest.fixture()
def plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    yield plt
    plt.close("all")


def _report() -> MethodReport:
    g = torch.Generator().manual_seed(0)
    spectra = {f"model.h.{i}.mlp.c_fc": torch.sort(torch.rand(300_000, generator=g, dtype=torch.float64).pow(6 + i) * 10.0 ** -i,
                                                  descending=True).values for i in range(3)}
    return MethodReport("ekfac factors", Path("f"), label="ekfac", spectra=spectra, damping={n: 1e-7 for n in spectra})


def _curves(fig) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {l.get_label(): (np.asarray(l.get_xdata()), np.asarray(l.get_ydata())) for l in fig.axes[0].lines
            if l.get_linestyle() == "-"}


def test_large_spectra_are_drawn_through_evenly_spaced_eigenvalues(plt, monkeypatch):
    r = _report()
    (_, thin), = make_figures([r])
    monkeypatch.setattr(plots, "SPECTRUM_POINTS", 10**9)
    (_, full), = make_figures([r])
    short_names = plots._short_names(list(r.spectra))
    for name, lam in r.spectra.items():
        short = short_names[name]
        (x, y), (fx, fy) = _curves(thin)[short], _curves(full)[short]
        kept = lam[lam > 0.01 * 1e-7].numpy()
        assert len(fx) == len(kept) > 100_000 and 7_000 < len(x) <= 8_000  # every kept eigenvalue vs at most SPECTRUM_POINTS
        assert x[0] == 1 and x[-1] == len(kept) and np.all(np.diff(x) > 0)
        assert np.array_equal(y, kept[x - 1])  # the eigenvalues at those indices, not an average
    assert thin.axes[0].get_xlim() == full.axes[0].get_xlim() and thin.axes[0].get_ylim() == full.axes[0].get_ylim()
    note = lambda f: " ".join(t.get_text() for t in f.axes[0].texts)  # noqa: E731
    assert note(thin) == note(full) and "of 900000 eigenvalues" in note(full)
    a = np.asarray(Image.open(io.BytesIO(plots.figure_png(thin)))).astype(int)
    b = np.asarray(Image.open(io.BytesIO(plots.figure_png(full)))).astype(int)
    differ = np.abs(a - b).max(-1)
    assert (differ > 0).mean() < 0.02 and (differ > 64).sum() < 50, ((differ > 0).mean(), (differ > 64).sum(), differ.max())
