"""The demo's HTML page, as a person sees it in a real headless Chromium: the digits are there and
decoded, no self-influence below 0 appears without its flag, the legend speaks only of what the
page shows, and nothing overflows its card (score lines break between their parts, never inside).

The page is the one ``make demo`` writes (``examples/quickstart.py``, reduced size), then the same
run with an older LiSSA artifact whose Hessian scores go below 0, reported by the CLI."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from browser import chromium, run_chromium

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]

PROBE = """<script>
window.addEventListener('load', () => {
  const inside = (c) => {
    const box = c.getBoundingClientRect();
    return [...c.querySelectorAll('*')].filter(e => {
      const r = e.getBoundingClientRect();
      return r.width > 0 && (r.right > box.right + 0.5 || r.left < box.left - 0.5);
    }).map(e => e.tagName + '.' + e.className + ': ' + e.textContent.slice(0, 60));
  };
  const sections = [...document.querySelectorAll('section')].map(s => {
    const h3 = [...s.querySelectorAll('h3')].find(h => h.textContent.startsWith('Most self-influential'));
    const selfCards = h3 ? [...h3.nextElementSibling.querySelectorAll('.card')] : [];
    return {
      title: s.querySelector('h2').textContent,
      warnings: s.querySelectorAll('.warn').length,
      self: selfCards.map(c => [c.dataset.id, c.querySelector('.score').textContent,
                                c.textContent.includes('negative self-influence')]),
    };
  });
  const r = {
    images: [...document.querySelectorAll('.card img')].map(i => [i.naturalWidth, i.naturalHeight, i.getBoundingClientRect().width]),
    overflow: [...document.querySelectorAll('.card')].flatMap(inside),
    scoreParts: [...document.querySelectorAll('.card .score span')].map(s => s.getClientRects().length),
    cardScrolls: [...document.querySelectorAll('.card')].filter(c => c.scrollWidth > c.clientWidth + 1).length,
    legend: document.querySelector('p.muted').textContent,
    tokens: document.querySelectorAll('.tok').length,
    flipped: document.querySelectorAll('.badge.mark').length,
    sections,
  };
  const pre = document.createElement('pre'); pre.id = 'probe'; pre.textContent = JSON.stringify(r);
  document.body.appendChild(pre);
});
</script></body>"""


def _probe(exe: str, page: Path, tmp_path: Path) -> dict:
    probed = page.with_name(page.stem + ".probe.html")
    probed.write_text(page.read_text().replace("</body>", PROBE))
    dom = run_chromium(exe, probed, tmp_path, "--dump-dom", "--virtual-time-budget=5000", "--window-size=1280,1600")
    return json.loads(html.unescape(re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S).group(1)))


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    env = dict(os.environ, LI_EXAMPLE_QUICK="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py")], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return next((tmp / "runs" / "quickstart").glob("version_*"))


def _check_layout(found: dict) -> None:
    assert found["overflow"] == [], found["overflow"][:5]  # nothing sticks out of its card
    assert found["cardScrolls"] == 0
    assert found["scoreParts"] and all(n == 1 for n in found["scoreParts"])  # "× median", "top 2.5%" never split
    for s in found["sections"]:  # a self-influence below 0 is never shown without its flag and the section's warning
        negative = [(i, text, flag) for i, text, flag in s["self"] if re.search(r"score -\d", text)]
        assert all(flag for _, _, flag in negative), (s["title"], negative)
        assert not negative or s["warnings"] >= 1, s["title"]


def test_the_demo_page_in_chromium(demo_run, tmp_path):
    exe = chromium()
    page = demo_run / "influence" / "plots" / "report.html"
    found = _probe(exe, page, tmp_path)
    titles = [s["title"] for s in found["sections"]]
    assert {"EK-FAC self-influence", "LiSSA self-influence", "Z0-Inf self-influence"} <= set(titles)
    # the digits themselves: every self-influence card and query card shows its decoded 8×8 image, scaled up
    assert len(found["images"]) >= 3 * 10 and all(w == 8 and h == 8 and shown >= 64 for w, h, shown in found["images"])
    assert found["flipped"] > 0  # the flipped labels the demo knows are badged
    assert found["tokens"] == 0 and "Token colours" not in found["legend"]  # no legend for what is not there
    _check_layout(found)


def test_negative_self_influence_is_flagged_in_chromium(demo_run, tmp_path):
    from lightning_influence.cli import main
    from lightning_influence.scores import InfluenceScores, load_scores, save_scores

    exe = chromium()
    run = tmp_path / "run"
    shutil.copytree(demo_run, run)
    lissa = load_scores(run / "influence" / "lissa" / "self_influence")
    values = lissa.self_influence.clone()
    low = torch.argsort(values)[:-10]
    values[low] = -values[low]  # an older Hessian LiSSA: all but 10 scores below 0, so the top 40 shows 30 of them
    save_scores(InfluenceScores("lissa", lissa.train_ids, self_influence=values, options={"curvature": "hessian"},
                                meta={"damping": 0.01}), run / "influence" / "lissa" / "self_influence")
    assert main(["report", str(run), "--html", str(tmp_path / "page.html"), "--no-plots", "--top-k", "40"]) == 0
    found = _probe(exe, tmp_path / "page.html", tmp_path)
    section = next(s for s in found["sections"] if s["title"] == "LiSSA self-influence")
    assert section["warnings"] >= 1 and sum(flag for _, _, flag in section["self"]) == 30
    _check_layout(found)
