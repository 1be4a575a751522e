"""Factor storage precision (issue 20): ``save_factors(..., storage=...)`` rounds the stored
eigenvectors (and Λ) to 16-bit floats, ``load_factors`` upcasts them to float32, the manifest says
which, and scores from such factors stay within a stated bound of a float64 brute-force inverse."""

from __future__ import annotations

import dataclasses
import struct

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_influence import EKFACInfluence
from lightning_influence.demos import MLPClassifier, digits_dataset
from lightning_influence.errors import InfluenceError
from lightning_influence.ekfac.factors import (
    FACTOR_STORAGE,
    STORAGE_CHOICES,
    load_factors,
    resolve_storage,
    save_factors,
    stored_itemsizes,
)
from lightning_influence.ekfac.fit import fit_factors
from lightning_influence.ekfac.scorer import InfluenceScorer
from lightning_influence.storage import ArtifactError, read_artifact, read_manifest, write_artifact
from lightning_influence.task import ClassificationTask

from ekfac_reference import dense_preconditioner, per_example_param_grads
from scaffold import exact, indexed, trainer

EXPECTED = {  # (eigenvector dtype, Λ dtype) on disk for float32 factors, written out independently of FACTOR_STORAGE
    "exact": (torch.float32, torch.float32),
    "float16": (torch.float16, torch.float32),
    "float16+bfloat16": (torch.float16, torch.bfloat16),
    "bfloat16": (torch.bfloat16, torch.bfloat16),
}


def digits_model(hidden=24, n=128, dtype=torch.float32):
    """A digits MLP trained a few full-batch SGD steps, its loader and its factors."""
    torch.manual_seed(0)
    train, _, _ = digits_dataset(dtype=dtype)
    model = MLPClassifier(hidden=hidden).to(dtype)
    x, y = train.tensors[0][:n], train.tensors[1][:n]
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    for _ in range(40):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    loader = DataLoader(indexed(train, n), batch_size=32)
    return model.eval(), loader, fit_factors(model, loader)


def as_float32(factors):
    """A copy of ``factors`` with float32 eigenvectors and Λ (what the callback computes)."""
    return dataclasses.replace(factors, layers={n: dataclasses.replace(f, q_a=f.q_a.float(), q_s=f.q_s.float(), lambdas=f.lambdas.float())
                                                for n, f in factors.layers.items()})


def data_bytes(path) -> int:
    """Bytes of the tensors in a safetensors file (its size less the 8-byte length and the header)."""
    raw = (path / "tensors.safetensors").read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    return len(raw) - 8 - header_len


def test_every_storage_is_tested():
    assert set(EXPECTED) == set(FACTOR_STORAGE) and set(STORAGE_CHOICES) == {"auto", *EXPECTED}


def test_auto_is_float16_bfloat16_for_float32_factors_and_exact_for_float64(tmp_path):
    f64 = digits_model(hidden=8, n=32, dtype=torch.float64)[2]
    f32 = as_float32(f64)
    assert resolve_storage("auto", f32) == "float16+bfloat16" and resolve_storage("auto", f64) == "exact"
    save_factors(f32, tmp_path / "a32", storage="auto")
    save_factors(f64, tmp_path / "a64", storage="auto")
    assert read_manifest(tmp_path / "a32")["storage"] == "float16+bfloat16" and read_manifest(tmp_path / "a64")["storage"] == "exact"
    for n, f in load_factors(tmp_path / "a64").layers.items():
        assert f.q_a.dtype == torch.float64 and torch.equal(f.q_a, f64.layers[n].q_a)
    # save_factors keeps exact unless asked; the callback's default is "auto"
    save_factors(f32, tmp_path / "default")
    assert read_manifest(tmp_path / "default")["storage"] == "exact"
    assert EKFACInfluence().factor_storage == "auto"


def test_as_stored_in_place_replaces_each_layer_and_leaves_the_old_objects_alone():
    factors = as_float32(digits_model(hidden=8, n=32)[2])
    before = dict(factors.layers)
    copy = factors.as_stored("float16")
    assert copy is not factors and factors.layers == before  # not in place: untouched
    same = factors.as_stored("float16", inplace=True)
    assert same is factors
    for n, f in factors.layers.items():
        assert f is not before[n] and torch.equal(f.q_a, copy.layers[n].q_a) and torch.equal(f.q_a, before[n].q_a.half().float())
        assert before[n].q_a.dtype == torch.float32 and not torch.equal(before[n].q_a, f.q_a)


@pytest.mark.parametrize("storage", list(EXPECTED))
def test_round_trip_gives_the_rounded_tensors_upcast_to_float32(tmp_path, storage):
    factors = as_float32(digits_model()[2])
    f32 = {n: {k: getattr(f, k).clone() for k in ("q_a", "q_s", "lambdas")} for n, f in factors.layers.items()}
    save_factors(factors, tmp_path / "f", storage=storage)
    assert read_manifest(tmp_path / "f")["storage"] == storage
    raw, _ = read_artifact(tmp_path / "f")
    loaded = load_factors(tmp_path / "f")
    stored = factors.as_stored(storage)
    q_dtype, lam_dtype = EXPECTED[storage]
    for n, f in loaded.layers.items():
        assert raw[f"{n}::q_a"].dtype == raw[f"{n}::q_s"].dtype == q_dtype and raw[f"{n}::lambdas"].dtype == lam_dtype
        for k in ("q_a", "q_s", "lambdas"):
            want = f32[n][k].to(q_dtype if k != "lambdas" else lam_dtype).float()  # the independent rounding
            got = getattr(f, k)
            assert got.dtype == torch.float32 and torch.equal(got, want), (n, k)
            assert torch.equal(getattr(stored.layers[n], k), want)  # as_stored gives what loading gives
        for k in ("eig_a", "eig_s"):  # kept as computed
            assert torch.equal(getattr(f, k), getattr(factors.layers[n], k))
        if storage != "exact":  # and the rounding happened
            assert not torch.equal(f.q_s, f32[n]["q_s"])


@pytest.mark.parametrize("fail", [False, True])
def test_in_place_save_leaves_the_files_numbers_in_memory(tmp_path, fail):
    factors = as_float32(digits_model(hidden=16, n=64)[2])
    want = factors.as_stored("float16+bfloat16")
    objects = dict(factors.layers)
    target = tmp_path / "f"
    if fail:  # the write is refused (a plain file is in the way): the factors are still float32, rounded
        target.write_text("not an artifact")
        with pytest.raises(ArtifactError):
            save_factors(factors, target, storage="float16+bfloat16", in_place=True)
    else:
        save_factors(factors, target, storage="float16+bfloat16", in_place=True)
        loaded = load_factors(target)
    for n, f in factors.layers.items():
        assert f is objects[n]  # the same objects, modified
        for k in ("q_a", "q_s", "lambdas", "eig_a", "eig_s"):
            assert getattr(f, k).dtype == getattr(want.layers[n], k).dtype and torch.equal(getattr(f, k), getattr(want.layers[n], k))
            if not fail:
                assert torch.equal(getattr(loaded.layers[n], k), getattr(f, k))


def test_file_shrinks_by_the_ratio_the_shapes_give(tmp_path):
    factors = as_float32(digits_model(hidden=48)[2])
    sizes = {}
    for storage in EXPECTED:
        save_factors(factors, tmp_path / storage, storage=storage)
        sizes[storage] = data_bytes(tmp_path / storage)
    for storage, (qd, ld) in EXPECTED.items():
        q_bytes = ld_bytes = 0
        eig = 0
        for f in factors.layers.values():
            a, o = f.q_a.shape[0], f.q_s.shape[0]
            q_bytes += (a * a + o * o) * qd.itemsize
            ld_bytes += a * o * ld.itemsize
            eig += (a + o) * f.eig_a.element_size()
        assert sizes[storage] == q_bytes + ld_bytes + eig, storage
    for itemsize, auto in ((4, "float16+bfloat16"), (8, "exact")):  # the estimate the memory check uses
        assert stored_itemsizes("auto", itemsize) == stored_itemsizes(auto, itemsize)
    assert stored_itemsizes("float16", 4) == (2, 4) and stored_itemsizes("exact", 8) == (8, 8)
    # eigenvectors are most of the bytes (here 0.65 of exact with float16)
    assert sizes["float16"] / sizes["exact"] < 0.7 and sizes["float16+bfloat16"] < sizes["float16"]


def test_bad_storage_values_are_refused(tmp_path):
    _, _, factors = digits_model(hidden=8, n=32)
    for bad in ("fp16", "float8", None, 16, "FLOAT16", "float32"):
        with pytest.raises(InfluenceError, match="storage"):
            save_factors(factors, tmp_path / "x", storage=bad)
        with pytest.raises(InfluenceError, match="storage"):
            factors.as_stored(bad)
        with pytest.raises(InfluenceError, match="factor_storage"):
            EKFACInfluence(factor_storage=bad)
    assert not (tmp_path / "x").exists()


def test_loading_refuses_a_storage_the_tensors_do_not_match(tmp_path):
    _, _, factors = digits_model(hidden=8, n=32)
    save_factors(factors, tmp_path / "f16", storage="float16")
    tensors, manifest = read_artifact(tmp_path / "f16")
    body = {k: v for k, v in manifest.items() if k in ("layers", "fisher", "n_examples", "n_lambda_examples", "meta")}
    write_artifact(tmp_path / "claims_exact", "ekfac", tensors, {**body, "storage": "exact"})
    with pytest.raises(ArtifactError, match="dtype torch.float16"):
        load_factors(tmp_path / "claims_exact")
    write_artifact(tmp_path / "unknown", "ekfac", tensors, {**body, "storage": "float8"})
    with pytest.raises(ArtifactError, match="'storage' is 'float8'"):
        load_factors(tmp_path / "unknown")
    bad = dict(tensors)
    name = next(k for k in bad if k.endswith("::q_a"))
    bad[name] = bad[name].clone()
    bad[name][0, 0] = float("inf")
    write_artifact(tmp_path / "inf", "ekfac", bad, {**body, "storage": "float16"})
    with pytest.raises(ArtifactError, match="non-finite"):
        load_factors(tmp_path / "inf")
    # an artifact written before the option existed (no "storage") loads as exact
    save_factors(factors, tmp_path / "old")
    tensors, manifest = read_artifact(tmp_path / "old")
    body = {k: v for k, v in manifest.items() if k in ("layers", "fisher", "n_examples", "n_lambda_examples", "meta")}
    write_artifact(tmp_path / "old2", "ekfac", tensors, body)
    assert "storage" not in read_manifest(tmp_path / "old2")
    old = load_factors(tmp_path / "old2")
    assert all(torch.equal(old.layers[n].q_a, f.q_a) for n, f in factors.layers.items())


def test_float16_scores_stay_within_the_bound_of_a_float64_inverse(tmp_path):
    """Pairwise scores from float16-stored factors against the dense float64 preconditioner of
    the float64 factors, with one damping per layer for both: relative error ≤ 2e-3 (float16's
    unit roundoff is 4.9e-4; measured 6.3e-4 here), where float32 storage gives ≤ 1e-5
    (measured 7e-8)."""
    model, loader, factors = digits_model(hidden=24, n=96, dtype=torch.float64)  # float64 model: float64 factors
    assert next(iter(factors.layers.values())).q_a.dtype == torch.float64
    damping = {n: 0.1 * float(f.lambdas.mean()) for n, f in factors.layers.items()}
    train, _, _ = digits_dataset(dtype=torch.float64)
    examples = [(torch.tensor([i]), (train.tensors[0][i : i + 1], train.tensors[1][i : i + 1])) for i in range(96)]
    queries, trains = examples[:6], examples[6:40]
    tracked = factors.check_model(model)
    gq = per_example_param_grads(model, ClassificationTask(), [b for b in queries], tracked)
    gt = per_example_param_grads(model, ClassificationTask(), [b for b in trains], tracked)
    ref = sum(gq[n].reshape(len(queries), -1) @ dense_preconditioner(factors.layers[n], damping[n]) @ gt[n].reshape(len(trains), -1).T
              for n in factors.layer_names)
    qloader = DataLoader(indexed(train, range(6)), batch_size=6)
    tloader = DataLoader(indexed(train, range(6, 40)), batch_size=34)
    errors = {}
    for storage in ("exact", "float16"):
        save_factors(as_float32(factors), tmp_path / storage, storage=storage)
        got = InfluenceScorer(model, load_factors(tmp_path / storage, model=model), damping=damping).pairwise(qloader, tloader).pairwise
        errors[storage] = float((got.double() - ref).norm() / ref.norm())
    assert errors["exact"] <= 1e-5
    assert errors["float16"] <= 2e-3
    assert errors["float16"] > 10 * errors["exact"]  # the rounding is there, and is what the bound is about


def test_callback_writes_its_storage_and_keeps_the_same_numbers(tmp_path):
    for precision, storage, q_dtype in (("32-true", "auto", torch.float16), ("64-true", "auto", torch.float64),
                                        ("32-true", "bfloat16", torch.bfloat16), ("32-true", "exact", torch.float32)):
        train, _, _ = digits_dataset(dtype=torch.float64 if precision == "64-true" else torch.float32)
        loader = DataLoader(indexed(train, 64), batch_size=16)
        torch.manual_seed(0)
        model = MLPClassifier(hidden=8)
        folder = tmp_path / f"{precision}-{storage}"
        cb = exact(dirpath=str(folder), factor_storage=storage)
        trainer(tmp_path, cb, precision=precision).fit(model, loader)
        manifest = read_manifest(folder / "factors")
        assert manifest["storage"] == {"auto": "float16+bfloat16" if precision == "32-true" else "exact"}.get(storage, storage)
        raw, _ = read_artifact(folder / "factors")
        assert {t.dtype for k, t in raw.items() if k.endswith(("::q_a", "::q_s"))} == {q_dtype}
        loaded = load_factors(folder / "factors", model=model)
        for n, f in loaded.layers.items():  # the callback's factors (probe, report, index) are the file's numbers
            for k in ("q_a", "q_s", "lambdas"):
                assert torch.equal(getattr(f, k), getattr(cb.factors.layers[n], k)), (precision, storage, n, k)
