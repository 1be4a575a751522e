"""Turn a run's ``influence/`` artifacts into what a user asks first.

* :func:`collect_report` reads every artifact below a run's ``influence/`` folder into
  :class:`MethodReport` objects, choosing each reader by the manifest's ``kind`` (``"ekfac"``
  factors, ``"scores"``, ``"z0"`` recordings), never by folder name; per-epoch artifacts
  (``epoch=NNNN/...``) are summarised by the latest one (:mod:`.collect`);
* :func:`render` prints them as an aligned table, JSON or CSV, with raw, normalised and
  rank-based scores (:mod:`.render`; what each method's number means: :mod:`.methods`);
* :func:`write_plots` draws PNGs (self-influence distribution with the flagged tail and marked
  ids, EK-FAC eigenvalue spectra with the damping) with matplotlib's Agg backend (:mod:`.plots`);
* :func:`write_html_report` writes a self-contained HTML page showing the examples themselves
  (:mod:`.html`).
"""

from .collect import READERS, MethodReport, collect_report, collect_views, find_influence_dir, read_report
from .html import HTML_NAME, html_report, write_html_report
from .methods import METHODS, SCORE_FORMS, MethodInfo, method_info
from .plots import PLOT_SIZE, log_figures, make_figures, report_figures, write_plots
from .render import readable_entries, render

__all__ = [
    "MethodReport",
    "find_influence_dir",
    "collect_report",
    "collect_views",
    "read_report",
    "READERS",
    "render",
    "readable_entries",
    "make_figures",
    "report_figures",
    "write_plots",
    "log_figures",
    "PLOT_SIZE",
    "write_html_report",
    "html_report",
    "HTML_NAME",
    "METHODS",
    "MethodInfo",
    "method_info",
    "SCORE_FORMS",
]
