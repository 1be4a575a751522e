"""Each report plot is drawn once per process: the images a TensorBoard logger takes at the end of
training are the PNGs the HTML report embeds afterwards, with the pixels ``add_figure`` would have
logged; a report whose content differs is drawn anew."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import lightning_influence.report.plots as plots
from lightning_influence.report import MethodReport, make_figures
from lightning_influence.report.html import html_report


@pytest.fixture()
def plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    yield plt
    plt.close("all")


class _Writer:
    def __init__(self):
        self.images = {}

    def add_image(self, tag, image, global_step=None, dataformats="CHW"):
        assert dataformats == "HWC"
        self.images[tag] = np.array(image)


def _logger():
    return type("TensorBoardLogger", (), {"experiment": _Writer()})()


def _reports(seed: int) -> list[MethodReport]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.arange(300)
    lissa = MethodReport("lissa", Path(f"/run{seed}/lissa/self_influence"), label="lissa",
                         self_scores=(ids, torch.rand(300, generator=g).pow(4) * 30))
    spectra = {"net.0": torch.sort(torch.rand(500, generator=g, dtype=torch.float64), descending=True).values,
               "net.2": torch.sort(torch.rand(200, generator=g, dtype=torch.float64) * 0.1, descending=True).values}
    ekfac = MethodReport("ekfac factors", Path(f"/run{seed}/ekfac/factors"), label="ekfac", spectra=spectra,
                         damping={"net.0": 1e-3, "net.2": 1e-3})
    return [lissa, ekfac]


def _embedded(page: str) -> list[np.ndarray]:
    import base64
    import re

    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(b))).convert("RGBA"))[..., :3]
            for b in re.findall(r'<div class="plots"><img src="data:image/png;base64,([^"]+)"', page)]


def test_logged_images_are_drawn_once_and_embedded_in_the_html(plt, monkeypatch):
    drawn = []
    real = plots.figure_png
    monkeypatch.setattr(plots, "figure_png", lambda fig: drawn.append(fig) or real(fig))
    reports, logger = _reports(0), _logger()
    assert plots.log_figures([logger], reports) == 2
    assert len(drawn) == 2
    # the pixels TensorBoard's add_figure takes: a canvas drawn by matplotlib itself, RGB
    reference = {}
    for name, fig in make_figures(reports):
        fig.canvas.draw()
        reference[f"influence/{name}"] = np.asarray(fig.canvas.buffer_rgba())[..., :3]
    assert set(logger.experiment.images) == set(reference) == {"influence/self_influence_lissa", "influence/ekfac_spectra"}
    for tag, pixels in reference.items():
        assert np.array_equal(logger.experiment.images[tag], pixels)
    page = html_report(_reports(0))  # the same content read again: new objects, no new drawing
    assert len(drawn) == 2
    embedded = _embedded(page)
    assert len(embedded) == 2
    assert np.array_equal(embedded[0], reference["influence/self_influence_lissa"])
    assert np.array_equal(embedded[1], reference["influence/ekfac_spectra"])


def test_other_content_or_marks_are_drawn_anew(plt, monkeypatch):
    drawn = []
    real = plots.figure_png
    monkeypatch.setattr(plots, "figure_png", lambda fig: drawn.append(fig) or real(fig))
    first = plots.report_pngs(_reports(1)[0])
    assert len(drawn) == 1 and plots.report_pngs(_reports(1)[0]) == first and len(drawn) == 1
    changed = _reports(1)[0]
    changed.self_scores = (changed.self_scores[0], changed.self_scores[1] * 2)  # same artifact path, other scores
    assert plots.report_pngs(changed) != first and len(drawn) == 2
    marked = plots.report_pngs(_reports(1)[0], mark_ids=[1, 2, 3])  # marks change the histogram
    assert marked != first and len(drawn) == 3
    relabelled = plots.report_pngs(_reports(1)[0], mark_ids=[1, 2, 3], mark_label="flipped")
    assert relabelled != marked and len(drawn) == 4
