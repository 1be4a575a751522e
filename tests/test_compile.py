"""EKFACInfluence with torch.compile: the compiler keeps the layer hooks (factors equal the
uncompiled run's), and a disabled capture leaves the compiled graph whole.

Most tests compile with ``backend="aot_eager"`` (Dynamo tracing and AOTAutograd, the parts
that decide what happens to hooks, without Inductor's C++ code generation, which takes many
seconds per graph on a loaded CPU); one slow test uses the default Inductor backend.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lightning_influence import load_factors, select_layers
from lightning_influence.demos import CNNClassifier, digits_dataset
from lightning_influence.ekfac.capture import LayerCapture
from ekfac_reference import assert_same_factors
from scaffold import exact, indexed, quiet_trainer


class CNN(CNNClassifier):
    """CNNClassifier without ``self.log`` in ``training_step``: Lightning 2.6's ``log`` fails
    inside a Dynamo-compiled ``training_step`` on torch 2.13 (with or without this library)."""

    def training_step(self, batch, batch_idx):
        x, y = self._xy(batch)
        return F.cross_entropy(self(x), y)


def loader(n=64, batch_size=16):
    train, _, _ = digits_dataset(dtype=torch.float64)
    return DataLoader(indexed(train, n), batch_size=batch_size)


def fit(model, cb, tmp_path):
    quiet_trainer(tmp_path, [cb], max_epochs=1, precision="64-true").fit(model, loader())


def test_capture_breaks_the_graph_only_while_enabled_and_records_the_same_tensors():
    torch.manual_seed(0)
    model = CNNClassifier(channels=(4, 6))
    x, y = torch.randn(8, 64), torch.randint(0, 10, (8,))
    seen = []
    cap = LayerCapture(select_layers(model), on_gradient=lambda l, a, ds, m: seen.append((l.name, a.clone(), ds.clone())))
    with cap:
        cap.enabled = False
        off = torch._dynamo.explain(lambda t: F.cross_entropy(model(t), y))(x)
        cap.enabled = True
        on = torch._dynamo.explain(lambda t: F.cross_entropy(model(t), y))(x)
        assert off.graph_count == 1 and off.graph_break_count == 0
        assert on.graph_break_count >= 3  # one per tracked layer: their hooks run eagerly
        seen.clear()
        F.cross_entropy(model(x), y).backward()
        eager = list(seen)
        compiled = torch.compile(model, backend="aot_eager")
        for enabled in (True, False, True):  # recompiles once per state, then reuses both graphs
            cap.enabled = enabled
            seen.clear()
            F.cross_entropy(compiled(x), y).backward()
            assert len(seen) == (3 if enabled else 0)
    assert [n for n, _, _ in seen] == [n for n, _, _ in eager] == ["net.6", "net.3", "net.0"]
    for (_, a, ds), (_, a0, ds0) in zip(seen, eager):
        torch.testing.assert_close(a, a0)
        torch.testing.assert_close(ds, ds0)


@pytest.mark.parametrize("how", ["module", "submodule"])
def test_compiled_lightning_module_gives_the_uncompiled_factors(tmp_path, how):
    torch.manual_seed(0)
    plain = CNN(channels=(4, 6), lr=0.0)
    ref = exact(update_every_n_steps=2, dirpath=str(tmp_path / "plain"))
    fit(plain, ref, tmp_path)
    torch.manual_seed(0)
    model = CNN(channels=(4, 6), lr=0.0)
    if how == "submodule":  # module names gain "_orig_mod."
        model.net = torch.compile(model.net, backend="aot_eager")
    cb = exact(update_every_n_steps=2, dirpath=str(tmp_path / "compiled"))
    torch._dynamo.reset()
    fit(torch.compile(model, backend="aot_eager") if how == "module" else model, cb, tmp_path)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # the training really ran compiled
    a, b = load_factors(tmp_path / "plain" / "factors"), load_factors(tmp_path / "compiled" / "factors")
    if how == "submodule":
        assert b.layer_names == ["net._orig_mod.0", "net._orig_mod.3", "net._orig_mod.6"]
        b.layers = {n.replace("_orig_mod.", ""): f for n, f in b.layers.items()}
    assert b.n_examples == a.n_examples == 32  # batches 0 and 2 of 4 (update_every_n_steps=2)
    assert_same_factors(b, a, rtol=1e-9)


@pytest.mark.slow
def test_inductor_compiled_module_gives_the_uncompiled_factors(tmp_path):
    torch.manual_seed(0)
    plain = CNN(channels=(4, 6), lr=0.0)
    ref = exact(dirpath=str(tmp_path / "plain"))
    fit(plain, ref, tmp_path)
    torch.manual_seed(0)
    model = CNN(channels=(4, 6), lr=0.0)
    cb = exact(dirpath=str(tmp_path / "compiled"))
    fit(torch.compile(model), cb, tmp_path)
    # Inductor reorders float64 reductions: agreement to rounding, not bit for bit
    assert_same_factors(load_factors(tmp_path / "compiled" / "factors"), load_factors(tmp_path / "plain" / "factors"), rtol=1e-8)
