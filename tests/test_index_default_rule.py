"""The index's default compression rule (issue 21): ``compression="auto"`` spends a budget of
numbers per example, storing small layers exactly first and sketching the rest to an equal share
(at least ``dim``). Its per-layer decisions against explicit shapes worked by hand, the stored
vectors of an exact layer against the whitened autograd gradients (float64, independent of the
index code), the resolved choice saved with the index and read back by a referencing index, and
the documented defaults against the code's."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_influence import IndexOptions
from lightning_influence.data import lm_collate
from lightning_influence.ekfac.factors import save_factors
from lightning_influence.index import build_index, load_index
from lightning_influence.index.builder import DEFAULT_BUDGET, DEFAULT_COMPRESSION, DEFAULT_DIM, DEFAULT_STORAGE_DTYPE
from lightning_influence.index.projection import layer_dims
from lightning_influence.storage import read_manifest
from lightning_influence.validation import InvalidArgumentError

from cases import lm_case, mlp_case
from ekfac_reference import per_example_param_grads

ROOT = Path(__file__).resolve().parents[1]

GPT2_SMALL = [(f"h.{i}.{n}", s) for i in range(12) for n, s in (
    ("attn.c_attn", (2304, 769)), ("attn.c_proj", (768, 769)), ("mlp.c_fc", (3072, 769)), ("mlp.c_proj", (768, 3073)))]


def test_gpt2_small_keeps_1024_numbers_per_layer():
    d = layer_dims(GPT2_SMALL, "auto", 1024)
    assert set(d.values()) == {1024}                      # every layer sketched, 1,024 each
    assert sum(d.values()) * 2 == 98_304                  # bytes per example in float16 (the old default's size)
    assert layer_dims(GPT2_SMALL, "sjlt", 1024) == d      # same as the old default there


def test_small_models_are_stored_exactly():
    digits = [("net.0", (32, 65)), ("net.2", (10, 33))]  # the digits MLP 64-32-10: 2,410 entries
    assert layer_dims(digits, "auto", 1024) == {"net.0": None, "net.2": None}
    # the old default sketched the 2,080-entry layer and kept the 330-entry one
    assert layer_dims(digits, "sjlt", 1024) == {"net.0": 1024, "net.2": None}
    # exactly the budget: still exact; one entry more: sketched
    assert layer_dims([("a", (10, 10))], "auto", 1, budget=100) == {"a": None}
    assert layer_dims([("a", (10, 10))], "auto", 1, budget=99) == {"a": 99}


def test_water_filling_worked_by_hand():
    shapes = [("big", (100, 300)), ("tiny", (10, 10)), ("mid", (50, 100)), ("large", (100, 200))]  # 30,000 / 100 / 5,000 / 20,000
    # budget 20,000: tiny fits 20,000/4, mid fits 19,900/3, large does not fit 14,900/2 -> both big ones get 7,450
    assert layer_dims(shapes, "auto", 1024, budget=20_000) == {"big": 7450, "tiny": None, "mid": None, "large": 7450}
    # a floor above the share: every sketched layer gets dim
    assert layer_dims(shapes, "auto", 8000, budget=20_000) == {"big": 8000, "tiny": None, "mid": None, "large": 8000}
    # the floor never stores more than a layer's entries (then it is exact)
    assert layer_dims(shapes, "auto", 25_000, budget=20_000) == {"big": 25_000, "tiny": None, "mid": None, "large": None}
    # a budget that holds everything: all exact
    assert set(layer_dims(shapes, "auto", 1024, budget=55_100).values()) == {None}
    # a tight budget: the share falls below the smallest layer, the floor decides
    assert layer_dims(shapes, "auto", None, budget=400) == {"big": 100, "tiny": None, "mid": 100, "large": 100}
    assert layer_dims(shapes, "auto", 1024, budget=400) == {"big": 1024, "tiny": None, "mid": 1024, "large": 1024}
    # the fixed rules
    assert layer_dims(shapes, "sjlt", 5000) == {"big": 5000, "tiny": None, "mid": None, "large": 5000}
    assert set(layer_dims(shapes, "exact", 5).values()) == {None}
    with pytest.raises(ValueError, match="budget"):
        layer_dims(shapes, "auto", 1024, budget=None)


def _whitened_reference(model, factors, idx, train, collate):
    """``√W ⊙ Q_Sᵀ G Q_A`` per layer from autograd per-example gradients, in float64."""
    g = per_example_param_grads(model, idx.task, [collate([train[i]]) for i in range(len(train))], idx.tracked)
    d = factors.dampings()
    out = {}
    for n in idx.layer_names:
        f = factors.layers[n]
        lam = f.lambdas.double().reshape(f.q_s.shape[0], f.q_a.shape[0])
        out[n] = (f.q_s.double().T @ g[n].double() @ f.q_a.double()) / (lam + d[n]).sqrt()
    return out


def test_default_index_of_a_small_model_stores_the_exact_whitened_gradients(tmp_path):
    model, factors, train, _ = mlp_case(n=12)
    idx = build_index(model, factors, DataLoader(train, batch_size=5), tmp_path / "i", dtype="float64")  # every other option default
    assert idx.compression == "auto"
    assert idx.catalog["settings"]["layer_dims"] == {"net.0": None, "net.2": None}
    ref = _whitened_reference(model, factors, idx, train, torch.utils.data.default_collate)
    block = next(idx.blocks())
    for n in idx.layer_names:
        assert idx.transform.layers[n].projection.kind == "exact"
        torch.testing.assert_close(block.vectors[n], ref[n].reshape(len(train), -1), rtol=1e-9, atol=1e-12)


def test_mixed_choice_is_saved_and_read_back_by_a_referencing_index(tmp_path):
    model, factors, train, query = lm_case(n=9)
    save_factors(factors, tmp_path / "f")
    shapes = {n: tuple(factors.layers[n].grad_shape) for n in factors.layer_names}
    short = {n.rsplit(".", 1)[-1]: n for n in shapes}
    assert {k: shapes[n] for k, n in short.items()} == {"query_key_value": (24, 9), "dense": (8, 9), "dense_h_to_4h": (32, 9),
                                                        "dense_4h_to_h": (8, 33)}  # 216, 72, 288, 264 entries
    # budget 760: 72 fits 760/4, 216 fits 688/3, 264 does not fit 472/2 -> the two largest get 236 each
    budget = 760
    want = {short["query_key_value"]: None, short["dense"]: None, short["dense_h_to_4h"]: 236, short["dense_4h_to_h"]: 236}
    assert layer_dims(list(shapes.items()), "auto", 2, budget) == want
    loader = DataLoader(train, batch_size=4, collate_fn=lm_collate)
    idx = build_index(model, tmp_path / "f", loader, tmp_path / "i", dim=2, budget=budget, dtype="float64")
    assert idx.catalog["settings"]["layer_dims"] == want
    m = read_manifest(idx.path / "transform")
    assert m["layer_dims"] == want and m["budget"] == budget and m["compression"] == "auto"
    ref = _whitened_reference(model, factors, idx, train, lm_collate)
    block = next(idx.blocks())
    for n, d in want.items():
        lt = idx.transform.layers[n]
        expect = ref[n].reshape(len(train), -1) if d is None else lt.projection.apply(ref[n])
        assert lt.projection.kind == ("exact" if d is None else "sjlt")
        torch.testing.assert_close(block.vectors[n], expect, rtol=1e-8, atol=1e-10)
    # reopened: factors read back, the same layers exact, the same sketches drawn again, the same scores
    qloader = DataLoader(query, batch_size=3, collate_fn=lm_collate)
    again = load_index(tmp_path / "i", model=model)
    assert again.transform.layer_choice == want
    torch.testing.assert_close(again.scores(qloader).pairwise, idx.scores(qloader).pairwise, rtol=1e-12, atol=1e-14)


def test_old_fixed_rule_indexes_still_open(tmp_path):
    """An index of the old default (``"sjlt"``, 1,024 per layer) records no budget; it opens with
    the fixed rule."""
    model, factors, train, query = lm_case(n=6)
    save_factors(factors, tmp_path / "f")
    idx = build_index(model, tmp_path / "f", DataLoader(train, batch_size=3, collate_fn=lm_collate), tmp_path / "i",
                      compression="sjlt", dim=10, dtype="float64")
    m = read_manifest(idx.path / "transform")
    assert "layer_dims" not in m and "budget" not in m
    again = load_index(tmp_path / "i", model=model)
    shapes = [(n, tuple(factors.layers[n].grad_shape)) for n in factors.layer_names]
    assert again.transform.layer_choice == layer_dims(shapes, "sjlt", 10)
    q = DataLoader(query, batch_size=3, collate_fn=lm_collate)
    torch.testing.assert_close(again.scores(q).pairwise, idx.scores(q).pairwise, rtol=1e-12, atol=1e-14)


def test_options_validate_the_budget():
    assert IndexOptions().budget == DEFAULT_BUDGET == 49_152
    assert IndexOptions(dim=None).dim is None  # "auto" without a floor
    for bad in (dict(budget=0), dict(budget=None), dict(budget=1.5)):
        with pytest.raises(InvalidArgumentError, match=r"IndexOptions\(budget=\.\.\.\)"):
            IndexOptions(**bad)
    assert IndexOptions(compression="sjlt", budget=None).budget is None  # ignored by the fixed rules
    with pytest.raises(InvalidArgumentError, match=r"IndexOptions\(dim=\.\.\.\)"):
        IndexOptions(compression="sjlt", dim=None)


def test_documented_defaults_equal_the_code():
    opts = IndexOptions()
    assert (opts.compression, opts.dim, opts.dtype, opts.budget) == (DEFAULT_COMPRESSION, DEFAULT_DIM, DEFAULT_STORAGE_DTYPE,
                                                                      DEFAULT_BUDGET) == ("auto", 1024, "float16", 49_152)
    sig = inspect.signature(build_index).parameters
    assert (sig["compression"].default, sig["dim"].default, sig["budget"].default) == ("auto", 1024, 49_152)
    doc = (ROOT / "docs" / "search.md").read_text()
    assert '| `"auto"` (default) |' in doc
    m = re.search(r"`budget=` is the numbers per example \(default ([\d,]+)\)", doc)
    assert m and int(m.group(1).replace(",", "")) == DEFAULT_BUDGET
    m = re.search(r"`dim` is per layer \(default ([\d,]+)\)", doc)
    assert m and int(m.group(1).replace(",", "")) == DEFAULT_DIM
