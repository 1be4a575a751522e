"""An index references the saved factor artifact it was built from (path + checksums) instead of
copying the factors: it is small, loads and scores exactly as a self-contained index and as the
dense float64 reference, and refuses clearly when the factors are gone or changed. Duplicate
training ids are refused with the callbacks' error type."""

from __future__ import annotations

import shutil
import time

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import IndexedDataset, select_layers
from lightning_influence.data import DuplicateIdsError, lm_collate
from lightning_influence.ekfac.factors import EKFACFactors, save_factors
from lightning_influence.index import FactorReferenceError, build_index, load_index
from lightning_influence.storage import read_artifact, read_manifest

from ekfac_reference import dense_preconditioner, per_example_param_grads
from cases import lm_case, mlp_case

FACTOR_KEYS = ("::q_s", "::q_a", "::whiten", "::proj::")


def _transform_tensors(index):
    return read_artifact(index.path / "transform")[0]


def _dense(model, factors, index, train, query, collate=None):
    col = collate or torch.utils.data.default_collate
    gq = per_example_param_grads(model, index.task, [col([query[i]]) for i in range(len(query))], index.tracked, which="measurement")
    gt = per_example_param_grads(model, index.task, [col([train[i]]) for i in range(len(train))], index.tracked)
    d = factors.dampings()
    return sum(gq[n].reshape(len(query), -1) @ dense_preconditioner(factors.layers[n], d[n]) @ gt[n].reshape(len(train), -1).T
               for n in index.layer_names)


@pytest.mark.parametrize("compression", ["exact", "sjlt", "kronecker"])
def test_referencing_index_stores_no_factor_data_and_scores_like_the_copy(tmp_path, compression):
    model, factors, train, query = lm_case(n=9)
    save_factors(factors, tmp_path / "factors")
    loader = DataLoader(train, batch_size=4, collate_fn=lm_collate)
    qloader = DataLoader(query, batch_size=3, collate_fn=lm_collate)
    kw = dict(compression=compression, dim=10, dtype="float64", shard_size=4)
    ref = build_index(model, tmp_path / "factors", loader, tmp_path / "ref", **kw)   # the folder: referenced
    copy = build_index(model, factors, loader, tmp_path / "copy", **kw)              # in memory, no artifact: copied
    # the referencing index holds no eigenbasis, whitening or projection; the copy does
    assert not [k for k in _transform_tensors(ref) if any(s in k for s in FACTOR_KEYS)]
    assert [k for k in _transform_tensors(copy) if "::q_s" in k]
    m = read_manifest(ref.path / "transform")
    assert m["factors"]["path"] == str((tmp_path / "factors").resolve())
    assert m["factors"]["tensor_sha256"] == read_manifest(tmp_path / "factors")["tensor_sha256"]
    assert {k.split("::")[-1] for k in _transform_tensors(ref)} <= {"u", "v"}  # the Kronecker split only (d_out + a_dim numbers)
    assert (ref.path / "transform" / "tensors.safetensors").stat().st_size < (copy.path / "transform" / "tensors.safetensors").stat().st_size / 2
    # same shard vectors (to rounding), same scores, also after reopening (factors read back, projections drawn again)
    for a, b in zip(ref.blocks(), copy.blocks()):
        for n in ref.layer_names:
            torch.testing.assert_close(a.vectors[n], b.vectors[n], rtol=1e-9, atol=1e-12)
    reopened = load_index(tmp_path / "ref", model=model)
    got, want = reopened.scores(qloader).pairwise, copy.scores(qloader).pairwise
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    if compression == "exact":  # and the independent float64 reference
        torch.testing.assert_close(got, _dense(model, factors, reopened, train, query, lm_collate), rtol=1e-8, atol=1e-10)


def test_in_memory_factors_are_referenced_when_their_folder_is_given(tmp_path):
    model, factors, train, query = mlp_case(n=12)
    save_factors(factors, tmp_path / "f")
    loader, qloader = DataLoader(train, batch_size=5), DataLoader(query, batch_size=5)
    idx = build_index(model, factors, loader, tmp_path / "i", compression="exact", dtype="float64", factors_path=tmp_path / "f")
    assert read_manifest(idx.path / "transform")["factors"]["path"] == str((tmp_path / "f").resolve())
    torch.testing.assert_close(load_index(idx.path, model=model).scores(qloader).pairwise,
                               _dense(model, factors, idx, train, query), rtol=1e-8, atol=1e-10)
    # a folder holding other factors is refused at build time
    other = EKFACFactors({n: f for n, f in factors.layers.items()})
    other.layers["net.0"] = type(factors.layers["net.0"])(**{**factors.layers["net.0"].__dict__, "lambdas": factors.layers["net.0"].lambdas * 3})
    with pytest.raises(FactorReferenceError, match="does not hold these factors"):
        build_index(model, other, loader, tmp_path / "j", factors_path=tmp_path / "f")


def test_index_and_factors_moved_together_still_open(tmp_path):
    model, factors, train, query = mlp_case(n=10)
    save_factors(factors, tmp_path / "run" / "factors")
    loader, qloader = DataLoader(train, batch_size=5), DataLoader(query, batch_size=5)
    before = build_index(model, tmp_path / "run" / "factors", loader, tmp_path / "run" / "index", compression="exact",
                         dtype="float64").scores(qloader).pairwise
    shutil.move(tmp_path / "run", tmp_path / "moved")  # the absolute path is gone; the relative one holds them
    after = load_index(tmp_path / "moved" / "index", model=model).scores(qloader).pairwise
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_opening_fails_clearly_when_the_factors_are_gone_or_changed(tmp_path):
    model, factors, train, _ = mlp_case(n=10)
    folder = tmp_path / "f"
    save_factors(factors, folder)
    built = read_manifest(folder)
    idx = build_index(model, folder, DataLoader(train, batch_size=5), tmp_path / "i", compression="sjlt", dim=8)
    expected = built["tensor_sha256"][:16]

    # a factor tensor changed (saved again with other eigenvalues): both checksums are named
    changed = EKFACFactors({n: f for n, f in factors.layers.items()}, factors.fisher, factors.n_examples)
    changed.layers["net.2"] = type(factors.layers["net.2"])(**{**factors.layers["net.2"].__dict__, "lambdas": factors.layers["net.2"].lambdas * 2})
    save_factors(changed, folder)
    found = read_manifest(folder)["tensor_sha256"][:16]
    assert found != expected
    with pytest.raises(FactorReferenceError) as e:
        load_index(idx.path, model=model)
    msg = str(e.value)
    assert str(folder.resolve()) in msg and "changed" in msg and expected in msg and found in msg

    # the same factors saved again (a new manifest, the same numbers): opens
    time.sleep(1.1)  # another creation time in the manifest
    save_factors(factors, folder)
    assert read_manifest(folder)["tensor_sha256"] == built["tensor_sha256"] != None  # noqa: E711
    assert read_manifest(folder)["manifest_sha256"] != built["manifest_sha256"]
    load_index(idx.path, model=model)
    # the tensor file edited behind the manifest's back: the found file checksum is named
    tf = folder / "tensors.safetensors"
    raw = bytearray(tf.read_bytes())
    raw[-3] ^= 0xFF
    tf.write_bytes(bytes(raw))
    with pytest.raises(FactorReferenceError, match=r"whose files have changed.*found a tensor file with sha256 [0-9a-f]{16}") as e:
        load_index(idx.path)
    assert built["tensor_sha256"][:16] in str(e.value)

    # the folder gone
    shutil.rmtree(folder)
    with pytest.raises(FactorReferenceError, match="which are gone") as e:
        load_index(idx.path)
    assert str(folder.resolve()) in str(e.value) and expected in str(e.value)


def test_gpt2_index_fixed_size_is_kilobytes(tmp_path):
    """On a GPT-2 (Conv1D, fused QKV) the referencing index's fixed part (catalog, transform,
    rank markers) is a few KB whatever the factors' size; only the shards grow with examples."""
    from lightning_influence.demos import CausalLMModule, synthetic_token_dataset, tiny_causal_lm
    from lightning_influence.ekfac.fit import fit_factors
    from lightning_influence.task import CausalLMTask

    model = CausalLMModule(tiny_causal_lm("gpt2", vocab_size=50, hidden=32, layers=2, heads=2)).double()
    data = IndexedDataset(synthetic_token_dataset(8, vocab_size=50, min_len=4, max_len=9, seed=1))
    loader = DataLoader(data, batch_size=4, collate_fn=lm_collate)
    layers = select_layers(model, "*.h.*")
    save_factors(fit_factors(model, loader, layers, CausalLMTask()), tmp_path / "f")
    idx = build_index(model, tmp_path / "f", loader, tmp_path / "i", dim=64)
    fixed = sum(p.stat().st_size for p in idx.path.rglob("*") if p.is_file() and "shards" not in p.parts)
    factor_bytes = (tmp_path / "f" / "tensors.safetensors").stat().st_size
    assert fixed < 64 * 1024 < factor_bytes, (fixed, factor_bytes)


def test_build_index_refuses_duplicate_ids(tmp_path):
    model, factors, _, _ = mlp_case(n=4)
    x, y = torch.randn(3, 5, dtype=torch.float64), torch.tensor([0, 1, 2])
    ids = torch.tensor([0, 0, 1])
    dup = DataLoader(TensorDataset(ids, x, y), batch_size=3, collate_fn=lambda b: (torch.stack([i for i, _, _ in b]),
                                                                                  (torch.stack([a for _, a, _ in b]), torch.stack([c for _, _, c in b]))))
    with pytest.raises(DuplicateIdsError, match=r"ids \[0\]"):
        build_index(model, factors, dup, tmp_path / "a")
    # repeated across batches (and shards) too
    across = DataLoader(TensorDataset(torch.tensor([0, 1, 2, 1]), torch.randn(4, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 0])),
                        batch_size=2, collate_fn=dup.collate_fn)
    with pytest.raises(DuplicateIdsError, match=r"ids \[1\]"):
        build_index(model, factors, across, tmp_path / "b", shard_size=1)
    # the callbacks' error type, importable without Lightning from the core
    from lightning_influence.callbacks.base import DuplicateIdsError as FromCallbacks

    assert FromCallbacks is DuplicateIdsError


def test_duplicate_ids_across_ranks_are_refused_when_the_catalog_is_written(tmp_path):
    """Two ranks (run one after the other in this process, with a no-op barrier) each index
    examples whose ids are unique within the rank but shared between ranks."""
    from lightning_influence.index import InfluenceIndexError

    model, factors, _, _ = mlp_case(n=4)
    g = torch.Generator().manual_seed(0)

    def part(ids):
        n = len(ids)
        ds = TensorDataset(torch.tensor(ids), torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))
        return DataLoader(ds, batch_size=2, collate_fn=lambda b: (torch.stack([i for i, _, _ in b]),
                                                                 (torch.stack([a for _, a, _ in b]), torch.stack([c for _, _, c in b]))))

    kw = dict(world_size=2, barrier=lambda: None, compression="sjlt", dim=8)
    with pytest.raises(InfluenceIndexError, match="rank 1 did not finish"):
        build_index(model, factors, part([0, 1, 2]), tmp_path / "i", rank=0, **kw)   # rank 1 has not run yet
    with pytest.raises(InfluenceIndexError, match="no finished influence index"):
        build_index(model, factors, part([3, 2, 4]), tmp_path / "i", rank=1, **kw)   # done; rank 0 writes the catalog
    with pytest.raises(DuplicateIdsError, match=r"ids \[2\]"):
        build_index(model, factors, part([0, 1, 2]), tmp_path / "i", rank=0, **kw)   # resumes, then checks every rank's ids


def test_factors_that_know_their_artifact_are_referenced(tmp_path):
    """``EKFACFactors`` carrying ``artifact_path`` (where they were loaded from) are referenced
    without ``factors_path=``; when the folder no longer holds them, the index keeps a copy."""
    from lightning_influence.ekfac.factors import load_factors

    model, factors, train, _ = mlp_case(n=8)
    save_factors(factors, tmp_path / "f")
    loaded = load_factors(tmp_path / "f")
    loaded.artifact_path = tmp_path / "f"
    idx = build_index(model, loaded, DataLoader(train, batch_size=4), tmp_path / "i", compression="sjlt", dim=8)
    assert read_manifest(idx.path / "transform")["factors"]["path"] == str((tmp_path / "f").resolve())
    other = EKFACFactors(dict(factors.layers))
    other.layers["net.0"] = type(factors.layers["net.0"])(**{**factors.layers["net.0"].__dict__, "q_a": -factors.layers["net.0"].q_a})
    other.artifact_path = tmp_path / "f"  # stale: the folder holds other factors
    copy = build_index(model, other, DataLoader(train, batch_size=4), tmp_path / "j", compression="sjlt", dim=8)
    assert read_manifest(copy.path / "transform").get("factors") is None
