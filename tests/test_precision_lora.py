"""Lower-precision training on CPU (``bf16-mixed``, ``bf16-true``, ``16-mixed``) on a LoRA model:
the factors accumulate in float32 and agree with the float32 run within a stated tolerance.

Tolerances (largest relative Frobenius error of any layer's covariance sum ``A`` or ``S``
against the ``32-true`` run of the same weights, lr = 0, 16 sequences): 10% for bfloat16
(measured 3.8e-2 for ``bf16-mixed`` and 5.3e-2 for ``bf16-true``: an 8-bit mantissa in every
activation and gradient) and 1% for float16 autocast (measured 3.3e-3). A missed loss or
grad-scaler scale would be off by a factor of 4 to 65536. Lightning turns ``precision="16-mixed"``
on CPU into ``bf16-mixed``; torch runs float16 autocast with a ``GradScaler`` on CPU, so that case
passes Lightning's ``MixedPrecision("16-mixed", "cpu", scaler=...)`` plugin directly.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_influence.data import lm_collate
from scaffold import exact, quiet_trainer

from lora_cases import lora_module, token_data

peft = pytest.importorskip("peft")

TOLERANCE = {"bf16-mixed": 1e-1, "bf16-true": 1e-1, "16-mixed": 1e-2}


def run(tmp_path, precision):
    module = lora_module().float()
    loader = DataLoader(token_data(16), batch_size=4, collate_fn=lm_collate)
    cb = exact(dirpath=str(tmp_path / precision))
    kw = {"precision": precision}
    if precision == "16-mixed":
        # Lightning turns Trainer(precision="16-mixed") on CPU into bf16-mixed; torch itself runs float16
        # autocast and a grad scaler on CPU, so the plugin is given directly (the scaler's factor is undone)
        from lightning.pytorch.plugins.precision import MixedPrecision

        kw = {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]}
    quiet_trainer(tmp_path, [cb], max_epochs=1, **kw).fit(module, loader)
    return cb


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return run(tmp_path_factory.mktemp("fp32"), "32-true")


@pytest.mark.parametrize("precision", list(TOLERANCE))
def test_low_precision_factors_accumulate_in_float32_and_agree_with_float32(precision, reference, tmp_path):
    try:
        cb = run(tmp_path, precision)
    except (RuntimeError, ValueError) as e:  # pragma: no cover - a torch/Lightning build without this CPU precision
        if "not supported" in str(e).lower() or "cpu" in str(e).lower():
            pytest.skip(f"{precision} on CPU: {e}")
        raise
    ref = reference.state
    tol = TOLERANCE[precision]
    errs = {}
    assert list(cb.state.running) == list(ref.running) and len(ref.running) > 0
    for n, acc in cb.state.running.items():
        r = ref.running[n]
        assert acc.a_sum.dtype == acc.s_sum.dtype == torch.float32  # accumulated in float32, whatever the autocast dtype
        assert (acc.a_tokens, acc.examples) == (r.a_tokens, r.examples)
        errs[f"{n}/A"] = rel(acc.a_sum, r.a_sum)
        errs[f"{n}/S"] = rel(acc.s_sum, r.s_sum)
    worst = max(errs.values())
    print(f"{precision}: max covariance relative error {worst:.2e}")
    assert worst <= tol, {k: v for k, v in errs.items() if v > tol}
