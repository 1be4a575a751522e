"""examples/cnn_digits.py in its reduced-size mode: a CNN on digits images with all three methods."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_cnn_digits_example(tmp_path):
    env = dict(os.environ, LI_EXAMPLE_QUICK="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "cnn_digits.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    # the convolutions are tracked as patches: 1·3·3 + bias and 8·3·3 + bias columns
    assert "net.0 8×10, net.3 16×73, net.6 10×257" in out
    found = {m.group(1): int(m.group(2)) for m in re.finditer(r"  (EK-FAC self-influence|Z0-Inf mean loss|LiSSA \(logit sampler\))\s+(\d+) / 40", out)}
    assert set(found) == {"EK-FAC self-influence", "Z0-Inf mean loss", "LiSSA (logit sampler)"}
    expected_by_chance = 40 * 46 / 400  # top 10% of 400 examples, 46 flipped labels
    for name in ("EK-FAC self-influence", "LiSSA (logit sampler)"):
        assert found[name] >= 2 * expected_by_chance, (name, found)
    assert out.count("proponents (+) and opponents (-) of test image") >= 1

    from lightning_influence import load_factors, load_scores

    run = next((tmp_path / "runs" / "cnn_digits").glob("version_*"))
    factors = load_factors(run / "influence" / "ekfac" / "factors")
    assert {n: f.grad_shape for n, f in factors.layers.items()} == {"net.0": (8, 10), "net.3": (16, 73), "net.6": (10, 257)}
    for method in ("ekfac", "z0", "lissa"):
        scores = load_scores(run / "influence" / method / "self_influence")
        assert scores.train_ids.tolist() == list(range(400))
