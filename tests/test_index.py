"""The training-gradient index against independent references: the scorer's dense scores (itself
checked against explicit float64 matrices in test_ekfac_core), brute-force rankings, closed-form
projection moments, and uninterrupted builds."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

from lightning_influence.data import lm_collate
from lightning_influence.demos import MLPClassifier
from lightning_influence.ekfac.scorer import InfluenceScorer
from lightning_influence.index import (
    CorruptShardError,
    InfluenceIndex,
    InfluenceIndexError,
    Kronecker,
    SparseSign,
    build_index,
    load_index,
)
from lightning_influence.index.shards import read_shard
from lightning_influence.storage import read_artifact
from lightning_influence.validation import InvalidArgumentError

from ekfac_reference import dense_preconditioner, per_example_param_grads
from cases import brute_top, lm_case, mlp_case


# ----------------------------------------------------------------------------------------------
# exact mode = the scorer = explicit float64 matrices
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["mlp", "gpt_neox"])
def test_exact_index_equals_dense_reference_and_scorer(tmp_path, case):
    model, factors, train, query = (mlp_case() if case == "mlp" else lm_case())
    collate = None if case == "mlp" else lm_collate
    loader = DataLoader(train, batch_size=6, collate_fn=collate)
    qloader = DataLoader(query, batch_size=2, collate_fn=collate)
    index = build_index(model, factors, loader, tmp_path / "idx", compression="exact", dtype="float64", shard_size=7, per_layer=True)
    assert index.n_examples == len(train) and len(index.shards) == math.ceil(len(train) / 7)
    # independent reference: autograd per-example gradients and dense Kronecker preconditioners
    task = index.task
    col = collate or torch.utils.data.default_collate
    gq = per_example_param_grads(model, task, [col([query[i]]) for i in range(len(query))], index.tracked, which="measurement")
    gt = per_example_param_grads(model, task, [col([train[i]]) for i in range(len(train))], index.tracked)
    dense = sum(gq[n].reshape(len(query), -1) @ dense_preconditioner(factors.layers[n], factors.dampings()[n])
                @ gt[n].reshape(len(train), -1).T for n in index.layer_names)
    res = index.scores(qloader, per_layer=True)
    torch.testing.assert_close(res.pairwise, dense, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(sum(res.per_layer.values()), res.pairwise, rtol=1e-10, atol=1e-12)
    assert res.train_ids.tolist() == list(range(len(train))) and res.query_ids.tolist() == list(range(500 if collate else 1000, (500 if collate else 1000) + len(query)))
    scorer = InfluenceScorer(model, factors, dtype=torch.float64)
    torch.testing.assert_close(res.pairwise, scorer.pairwise(qloader, loader).pairwise, rtol=1e-9, atol=1e-11)
    # self-influence: stored exactly, equals the diagonal of the dense train×train matrix
    diag = sum((gt[n].reshape(len(train), -1) @ dense_preconditioner(factors.layers[n], factors.dampings()[n]) * gt[n].reshape(len(train), -1)).sum(1)
               for n in index.layer_names)
    si = index.self_influence(per_layer=True)
    torch.testing.assert_close(si.self_influence.double(), diag, rtol=1e-5, atol=1e-7)  # stored as float32
    torch.testing.assert_close(sum(si.per_layer.values()).double(), diag, rtol=1e-5, atol=1e-7)
    # streaming top-k over shards = brute-force ranking of the dense matrix, both directions
    top = index.search(qloader, k=4, opponents=True)
    assert top.ids.tolist() == brute_top(dense, 4).tolist()
    torch.testing.assert_close(top.scores, dense.gather(1, brute_top(dense, 4)), rtol=1e-8, atol=1e-10)
    assert top.opponent_ids.tolist() == brute_top(dense, 4, largest=False).tolist()
    assert index.search(qloader, k=100).ids.shape == (len(query), len(train))


def test_results_do_not_depend_on_shard_size_or_chunking(tmp_path):
    model, factors, train, query = mlp_case(n=50)
    loader, qloader = DataLoader(train, batch_size=8), DataLoader(query, batch_size=5)
    small = build_index(model, factors, loader, tmp_path / "a", compression="sjlt", dim=8, dtype="float32", shard_size=3)
    big = build_index(model, factors, loader, tmp_path / "b", compression="sjlt", dim=8, dtype="float32", shard_size=1000)
    assert len(small.shards) == 17 and len(big.shards) == 1
    big.chunk_rows = 4
    a, b = small.scores(qloader), big.scores(qloader)
    torch.testing.assert_close(a.pairwise, b.pairwise, rtol=1e-6, atol=1e-7)
    assert a.train_ids.tolist() == b.train_ids.tolist() == list(range(50))
    ta, tb = small.search(qloader, k=5, opponents=True), big.search(qloader, k=5, opponents=True)
    assert ta.ids.tolist() == tb.ids.tolist() and ta.opponent_ids.tolist() == tb.opponent_ids.tolist()
    # and the search is the dense top-k of the same (approximate) scores
    assert ta.ids.tolist() == b.train_ids[brute_top(b.pairwise, 5)].tolist()


# ----------------------------------------------------------------------------------------------
# projections: unbiased inner products, error ~ 1/sqrt(dim)
# ----------------------------------------------------------------------------------------------
def _projected_products(make, u, v, seeds):
    out = []
    for s in range(seeds):
        p = make(torch.Generator().manual_seed(s))
        out.append(float((p.apply(u[None]) * p.apply(v[None])).sum()))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("kind", ["sjlt", "kronecker"])
def test_projections_are_unbiased_and_error_shrinks_like_one_over_sqrt_dim(kind):
    g = torch.Generator().manual_seed(123)
    shape = (24, 30)
    u = torch.randn(shape, generator=g, dtype=torch.float64)
    v = 0.6 * u + torch.randn(shape, generator=g, dtype=torch.float64)  # correlated, as gradients are
    truth = float((u * v).sum())
    seeds = 400
    rms = {}
    for dim in (16, 64, 256):
        make = (lambda gen, d=dim: SparseSign.draw(shape, d, gen)) if kind == "sjlt" else (lambda gen, d=dim: Kronecker.draw(shape, d, gen))
        prods = _projected_products(make, u, v, seeds)
        sd = float(prods.std())
        # unbiased: the mean over 400 draws is within 4 standard errors of the exact product
        assert abs(float(prods.mean()) - truth) < 4 * sd / math.sqrt(seeds), (dim, float(prods.mean()), truth, sd)
        rms[dim] = float(((prods - truth) ** 2).mean().sqrt())
        if kind == "sjlt":
            # closed form: Var = (|u|²|v|² + <u,v>² - 2 Σ u_j² v_j²) / dim, within sampling error (±25 %)
            var = (float(u.pow(2).sum() * v.pow(2).sum()) + truth**2 - 2 * float((u.pow(2) * v.pow(2)).sum())) / dim
            assert 0.75 < sd / math.sqrt(var) < 1.25, (dim, sd, math.sqrt(var))
    # 4x the dimension halves the error (±30 % for sampling noise and the Kronecker split's rounding)
    for lo, hi in ((16, 64), (64, 256)):
        dims = (Kronecker.split(shape, lo), Kronecker.split(shape, hi)) if kind == "kronecker" else ((lo,), (hi,))
        ratio = math.sqrt(math.prod(dims[1]) / math.prod(dims[0]))
        assert 0.7 * ratio < rms[lo] / rms[hi] < 1.3 * ratio, (kind, lo, hi, rms)


def test_kronecker_training_side_never_forms_the_gradient_yet_matches_it(tmp_path):
    model, factors, train, query = lm_case()
    loader = DataLoader(train, batch_size=4, collate_fn=lm_collate)
    idx = build_index(model, factors, loader, tmp_path / "k", compression="kronecker", dim=12, dtype="float64")
    fast = build_index(model, factors, loader, tmp_path / "f", compression="kronecker", dim=12, dtype="float64", self_influence=False)
    for a, b in zip(idx.blocks(), fast.blocks()):
        for n in idx.layer_names:
            torch.testing.assert_close(a.vectors[n], b.vectors[n], rtol=1e-9, atol=1e-11)
        assert torch.isnan(b.self_influence).all() and torch.isfinite(a.self_influence).all()
    with pytest.raises(InfluenceIndexError, match="self_influence=False"):
        fast.self_influence()
    # the estimate is unbiased: averaged over projection seeds, it approaches the exact scores
    qloader = DataLoader(query, batch_size=3, collate_fn=lm_collate)
    exact = InfluenceScorer(model, factors, dtype=torch.float64).pairwise(qloader, loader).pairwise
    mean = sum(build_index(model, factors, loader, tmp_path / f"s{s}", compression="kronecker", dim=12, seed=s,
                           dtype="float64", self_influence=False).scores(qloader).pairwise for s in range(30)) / 30
    one = idx.scores(qloader).pairwise
    assert (mean - exact).norm() < 0.5 * (one - exact).norm()


def test_low_precision_storage_stays_close_to_float32(tmp_path):
    model, factors, train, query = mlp_case(n=60, dtype=torch.float32)
    loader, qloader = DataLoader(train, batch_size=16), DataLoader(query, batch_size=5)
    ref = build_index(model, factors, loader, tmp_path / "f32", compression="sjlt", dim=16, dtype="float32").scores(qloader).pairwise
    for dt, tol in (("float16", 2e-3), ("bfloat16", 2e-2)):
        idx = build_index(model, factors, loader, tmp_path / dt, compression="sjlt", dim=16, dtype=dt)
        assert next(idx.blocks()).vectors["net.0"].dtype == getattr(torch, dt)
        got = idx.scores(qloader).pairwise
        assert float((got - ref).norm() / ref.norm()) < tol
    # whitened coordinates have mean square <= 1 over the training set, so float16 cannot overflow
    exact = build_index(model, factors, loader, tmp_path / "ex", compression="exact", dtype="float32")
    for n in exact.layer_names:
        v = torch.cat([b.vectors[n] for b in exact.blocks()])
        assert float(v.pow(2).mean(0).max()) <= 1.0 + 1e-5


# ----------------------------------------------------------------------------------------------
# shards: resumable, checksummed, refused when mixed
# ----------------------------------------------------------------------------------------------
class _Dies:
    """A loader that raises after ``after`` batches (a build killed midway)."""

    def __init__(self, loader, after):
        self.loader, self.after = loader, after

    def __iter__(self):
        for i, b in enumerate(self.loader):
            if i == self.after:
                raise KeyboardInterrupt("killed")
            yield b


def _shard_tensors(index):
    return [read_artifact(index.path / e["path"])[0] for e in index.shards]


@pytest.mark.parametrize("ids", [True, False])
def test_killed_build_resumes_and_ends_identical(tmp_path, ids):
    model, factors, train, query = mlp_case(n=45)
    data = train if ids else TensorDataset(*[torch.stack(t) for t in zip(*[train[i][1] for i in range(len(train))])])
    loader = DataLoader(data, batch_size=3)  # 15 batches; shards of 10 end inside batches
    kw = dict(compression="sjlt", dim=8, dtype="float16", shard_size=10, per_layer=True)
    whole = build_index(model, factors, loader, tmp_path / "whole", **kw)
    with pytest.raises(KeyboardInterrupt):
        build_index(model, factors, _Dies(loader, after=8), tmp_path / "resumed", **kw)  # 24 examples in: 2 shards written
    with pytest.raises(InfluenceIndexError, match="no finished influence index"):
        load_index(tmp_path / "resumed")
    written = sorted(p.name for p in (tmp_path / "resumed" / "shards").iterdir())
    assert written == ["r00000-s000000", "r00000-s000001"]
    forwards = []
    hook = model.net[0].register_forward_hook(lambda *a: forwards.append(1))
    resumed = build_index(model, factors, loader, tmp_path / "resumed", **kw)
    hook.remove()
    assert len(forwards) == 15 - 6  # batches 0-5 (examples 0-17) skipped; batch 6 (18-20) run, its first 2 rows dropped
    assert [e["n"] for e in resumed.shards] == [e["n"] for e in whole.shards] == [10, 10, 10, 10, 5]
    for a, b in zip(_shard_tensors(whole), _shard_tensors(resumed)):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    assert resumed.catalog["fingerprint"] == whole.catalog["fingerprint"]
    assert [e["sha256"] for e in resumed.shards] == [e["sha256"] for e in whole.shards]
    # a finished index is returned as it is
    again = build_index(model, factors, _Dies(loader, after=0), tmp_path / "resumed", **kw)
    assert again.shards == resumed.shards


def test_build_with_other_options_is_refused_unless_overwrite(tmp_path):
    model, factors, train, _ = mlp_case(n=20)
    loader = DataLoader(train, batch_size=4)
    build_index(model, factors, loader, tmp_path / "i", compression="sjlt", dim=8)
    with pytest.raises(InfluenceIndexError, match="other weights, factors or options"):
        build_index(model, factors, loader, tmp_path / "i", compression="sjlt", dim=16)
    with pytest.raises(InfluenceIndexError, match="already holds"):
        build_index(model, factors, loader, tmp_path / "i", compression="sjlt", dim=8, if_exists="error")
    idx = build_index(model, factors, loader, tmp_path / "i", compression="sjlt", dim=16, if_exists="overwrite")
    assert idx.dims == {"net.0": 16, "net.2": 16}
    (tmp_path / "art").mkdir()
    (tmp_path / "art" / "manifest.json").write_text("{}")
    with pytest.raises(InfluenceIndexError, match="not an index folder"):
        build_index(model, factors, loader, tmp_path / "art")
    with pytest.raises(InvalidArgumentError, match="compression"):
        build_index(model, factors, loader, tmp_path / "x", compression="pca")
    with pytest.raises(InvalidArgumentError, match="dtype"):
        build_index(model, factors, loader, tmp_path / "x", dtype="int8")
    with pytest.raises(InvalidArgumentError, match="layers"):
        build_index(model, None, loader, tmp_path / "x")


def test_corrupt_or_replaced_shard_is_named(tmp_path):
    model, factors, train, query = mlp_case(n=30)
    idx = build_index(model, factors, DataLoader(train, batch_size=8), tmp_path / "i", compression="sjlt", dim=8, shard_size=10)
    target = tmp_path / "i" / idx.shards[1]["path"] / "tensors.safetensors"
    raw = bytearray(target.read_bytes())
    raw[-3] ^= 0xFF
    target.write_bytes(bytes(raw))
    with pytest.raises(CorruptShardError, match="r00000-s000001.*SHA-256"):
        idx.search(DataLoader(query, batch_size=5), k=3)
    with pytest.raises(CorruptShardError, match="r00000-s000001"):
        idx.self_influence()
    # as the message says: delete the shard and run the same build again (that rank's shards from it on are recomputed)
    import shutil

    shutil.rmtree(tmp_path / "i" / idx.shards[1]["path"])
    fixed = build_index(model, factors, DataLoader(train, batch_size=8), tmp_path / "i", compression="sjlt", dim=8, shard_size=10)
    assert fixed.shards == idx.shards  # same checksums: the same shard again
    assert fixed.self_influence().n_train == 30
    # a shard replaced by another valid artifact is caught by the catalog's checksum
    other = build_index(model, factors, DataLoader(Subset(train, range(0, 10)), batch_size=8), tmp_path / "o", compression="sjlt", dim=8, shard_size=10)
    shutil.rmtree(tmp_path / "i" / idx.shards[1]["path"])
    shutil.copytree(tmp_path / "o" / other.shards[0]["path"], tmp_path / "i" / idx.shards[1]["path"])
    with pytest.raises(CorruptShardError, match="not the shard its catalog lists"):
        read_shard(idx.path, idx.shards[1])


def test_open_checks_model_and_queries_need_it(tmp_path):
    model, factors, train, query = mlp_case(n=12)
    build_index(model, factors, DataLoader(train, batch_size=4), tmp_path / "i", compression="exact", dtype="float64")
    idx = load_index(tmp_path / "i")
    assert idx.self_influence().n_train == 12  # no model needed
    with pytest.raises(InfluenceIndexError, match="needs the model"):
        idx.search(DataLoader(query, batch_size=5))
    from lightning_influence.ekfac.factors import FactorMismatchError

    with pytest.raises(FactorMismatchError, match="net.0"):
        idx.bind(MLPClassifier(d_in=4, hidden=6, n_classes=3).double())
    assert "n_examples=12" in repr(idx.bind(model))


# ----------------------------------------------------------------------------------------------
# per-token scores and FAISS
# ----------------------------------------------------------------------------------------------
def test_token_scores_sum_to_sequence_scores(tmp_path):
    model, factors, train, query = lm_case(n=8)
    loader = DataLoader(train, batch_size=3, collate_fn=lm_collate)
    qloader = DataLoader(query, batch_size=3, collate_fn=lm_collate)
    idx = build_index(model, factors, loader, tmp_path / "i", compression="sjlt", dim=10)
    exact = InfluenceScorer(model, factors, dtype=torch.float64).pairwise(qloader, loader).pairwise
    top = idx.search(qloader, k=3)
    picked = sorted(set(top.ids.flatten().tolist()))
    ts = idx.token_scores(qloader, DataLoader(Subset(train, picked), batch_size=2, collate_fn=lm_collate))
    assert ts.train_ids.tolist() == picked and ts.query_ids.tolist() == [500, 501, 502]
    torch.testing.assert_close(ts.sequence_scores(), exact[:, picked], rtol=1e-8, atol=1e-10)
    lengths = [len(train[i][1]["input_ids"]) for i in picked]
    assert ts.mask.sum(1).tolist() == lengths
    assert (ts.scores[:, ~ts.mask] == 0).all()
    # not constant across positions: the decomposition says which tokens carry the influence
    assert float(ts.scores[0, 0, : lengths[0]].std()) > 0
    best = ts.top_tokens(0, 0, k=2)
    assert len(best) == 2 and best[0][1] >= best[1][1]


def test_faiss_flat_equals_exact_search_and_ivf_recovers_most(tmp_path):
    pytest.importorskip("faiss")
    from lightning_influence.index.approximate import FaissSearch

    model, factors, train, query = mlp_case(n=200, dtype=torch.float32)
    loader, qloader = DataLoader(train, batch_size=32), DataLoader(query, batch_size=5)
    idx = build_index(model, factors, loader, tmp_path / "i", compression="exact", dtype="float32", shard_size=64)
    exact = idx.search(qloader, k=5, opponents=True)
    flat = FaissSearch.build(idx, method="flat")
    got = idx.search(qloader, k=5, opponents=True, approximate=FaissSearch.load(idx))
    assert got.ids.tolist() == exact.ids.tolist() and got.opponent_ids.tolist() == exact.opponent_ids.tolist()
    torch.testing.assert_close(got.scores, exact.scores.float(), rtol=1e-4, atol=1e-5)
    ivf = FaissSearch.build(idx, method="ivf", nlist=4, nprobe=4, save=False)  # every cluster probed: exact
    assert idx.search(qloader, k=5, approximate=ivf).ids.tolist() == exact.ids.tolist()
    assert flat.method == "flat"


def test_rerank_recovers_the_exact_top_k_from_compressed_candidates(tmp_path):
    model, factors, train, query = lm_case(n=12)
    loader = DataLoader(train, batch_size=5, collate_fn=lm_collate)
    qloader = DataLoader(query, batch_size=3, collate_fn=lm_collate)
    dense = InfluenceScorer(model, factors, dtype=torch.float64).pairwise(qloader, loader).pairwise
    idx = build_index(model, factors, loader, tmp_path / "i", compression="sjlt", dim=4, dtype="float16")
    rough = idx.search(qloader, k=3, opponents=True)
    cand = idx.search(qloader, k=12, opponents=True)  # every example is a candidate: reranking is exact
    top = idx.rerank(qloader, cand, train, k=3, collate_fn=lm_collate, batch_size=4)
    assert top.ids.tolist() == brute_top(dense, 3).tolist() and top.opponent_ids.tolist() == brute_top(dense, 3, largest=False).tolist()
    torch.testing.assert_close(top.scores, dense.gather(1, brute_top(dense, 3)), rtol=1e-8, atol=1e-10)
    assert rough.ids.tolist() != top.ids.tolist()  # the 4-number sketch alone gets the order wrong
    # fewer candidates: each query's exact top-k among its own candidates
    few = idx.search(qloader, k=5)
    got = idx.rerank(qloader, few, train, k=2, collate_fn=lm_collate)
    for r in range(3):
        own = few.ids[r]
        best = own[torch.topk(dense[r, own], 2).indices]
        assert got.ids[r].tolist() == best.tolist()
    with pytest.raises(ValueError, match="query ids"):
        idx.rerank(DataLoader(Subset(query, [1, 0, 2]), batch_size=3, collate_fn=lm_collate), few, train, collate_fn=lm_collate)


@pytest.mark.parametrize("compression", ["sjlt", "kronecker"])
def test_training_vectors_are_the_projection_of_the_whitened_autograd_gradient(tmp_path, compression):
    """The fast training path (permuted rotation + bucket sums, or blocks of examples) equals the
    projection's plain definition applied to √W ⊙ Q_Sᵀ G Q_A from autograd gradients."""
    model, factors, train, _ = lm_case(n=9)
    idx = build_index(model, factors, DataLoader(train, batch_size=4, collate_fn=lm_collate), tmp_path / "i",
                      compression=compression, dim=10, dtype="float64")
    grads = per_example_param_grads(model, idx.task, [lm_collate([train[i]]) for i in range(len(train))], idx.tracked)
    block = next(idx.blocks())
    for n in idx.layer_names:
        lt, f = idx.transform.layers[n], factors.layers[n]
        white = (f.q_s.T @ grads[n] @ f.q_a) * f.inverse_scale(factors.dampings()[n], power=0.5)
        if compression == "sjlt":
            ref = lt.projection.apply(white)
        else:
            ref = lt.projection.apply(white / lt.whiten * torch.outer(lt.u, lt.v))
        torch.testing.assert_close(block.vectors[n], ref, rtol=1e-8, atol=1e-10)
        small = lt.train_batch(*(lambda io: (io.a, io.ds))(_layer_io(model, idx, train, n)), torch.float64, block_bytes=1)
        torch.testing.assert_close(small[0], ref, rtol=1e-8, atol=1e-10)  # one example per block: same numbers


def _layer_io(model, idx, train, name):
    from lightning_influence.ekfac.layer_data import iter_layer_data

    loader = DataLoader(train, batch_size=len(train), collate_fn=lm_collate)
    return next(iter(iter_layer_data(model, loader, idx.tracked, idx.task, "loss")))[1][name]


@pytest.mark.parametrize("compression", ["exact", "sjlt", "kronecker"])
def test_query_vectors_from_tokens_equal_those_of_formed_gradients(tmp_path, compression):
    model, factors, train, query = lm_case(n=6)
    idx = build_index(model, factors, DataLoader(train, batch_size=3, collate_fn=lm_collate), tmp_path / "i",
                      compression=compression, dim=10, dtype="float64")
    qloader = DataLoader(query, batch_size=2, collate_fn=lm_collate)
    ids, fast, _ = idx.query_vectors(qloader)
    ids2, slow, _ = idx.vectors_of(idx.query_gradients(qloader))  # the multi-stage path: gradients in the standard basis
    assert ids.tolist() == ids2.tolist()
    for n in idx.layer_names:
        torch.testing.assert_close(fast[n], slow[n], rtol=1e-8, atol=1e-10)


def test_index_options_are_frozen_plain_values_checked_on_construction_and_saved(tmp_path):
    import dataclasses

    from lightning_influence import IndexOptions

    opts = IndexOptions(compression="exact", dtype="bfloat16", shard_size=7)
    assert opts.storage_dtype is torch.bfloat16 and opts.as_dict()["dtype"] == "bfloat16"
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.dim = 3  # type: ignore[misc]
    for bad in (dict(dtype=torch.float16), dict(dtype="int8"), dict(compression="pca"), dict(dim=0), dict(per_layer=1)):
        with pytest.raises(InvalidArgumentError, match=rf"IndexOptions\({next(iter(bad))}=\.\.\.\)"):
            IndexOptions(**bad)
    model, factors, train, _ = mlp_case(n=10)
    idx = build_index(model, factors, DataLoader(train, batch_size=5), tmp_path / "i", compression="exact", dtype="bfloat16")
    assert idx.catalog["settings"]["dtype"] == "bfloat16"
    assert next(idx.blocks()).vectors["net.0"].dtype == torch.bfloat16
