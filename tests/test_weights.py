"""Weights fingerprints: artifacts record the weights they were made with, and loading them with
other weights raises (factors, an index, trajectory segments, multi-stage factors), unless the
caller passes ``allow_other_weights=True``.

References: the fingerprint is compared with one recomputed by hand from the documented sample
positions (``i · numel // 4096``, float32, BLAKE2b); the "other weights" are the same
architecture with another seed, and the trained model one SGD step later (a later checkpoint).
"""

from __future__ import annotations

import copy
import hashlib
import time

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_influence import EKFACInfluence, load_factors
from lightning_influence.demos import MLPClassifier, digits_dataset
from lightning_influence.ekfac.factors import save_factors
from lightning_influence.ekfac.fit import fit_factors
from lightning_influence.index import build_index, load_index
from lightning_influence.multistage import MultiStageScorer
from lightning_influence.trajectory import TrajectoryScorer
from lightning_influence.weights import SAMPLE_SIZE, WeightsMismatchError, fingerprint_weights
from scaffold import indexed, quiet_trainer


def model(seed=0):
    torch.manual_seed(seed)
    return MLPClassifier(hidden=16)


def data(n=96):
    train, test, _ = digits_dataset()
    return DataLoader(indexed(train, n), batch_size=32), DataLoader(indexed(test, 5), batch_size=5)


def one_sgd_step(m):
    later = copy.deepcopy(m)
    train, _ = data()
    opt = torch.optim.SGD(later.parameters(), lr=0.05)
    batch = next(iter(train))
    later.training_step(batch, 0).backward()
    opt.step()
    return later


def fit_trained(tmp_path, epochs=2, **cb_kw):
    m = model()
    cb = EKFACInfluence(dirpath=str(tmp_path / "ekfac"), **cb_kw)
    train, _ = data()
    quiet_trainer(tmp_path, [cb], max_epochs=epochs).fit(m, train)
    return m


def test_fingerprint_equals_a_hand_computed_hash_of_the_documented_sample():
    big = nn.Linear(100, 70)  # 7000 entries > SAMPLE_SIZE: sampled; the bias (70) is hashed whole
    m = nn.Sequential(big)
    h = hashlib.blake2b(digest_size=32)
    h.update(b"sampled-v1")
    h.update(b"\0layer\0" + b"0")
    w = big.weight.detach().reshape(-1)
    idx = [i * w.numel() // SAMPLE_SIZE for i in range(SAMPLE_SIZE)]
    h.update(b"\0weight(70, 100)\0")
    h.update(w[idx].float().numpy().tobytes())
    h.update(b"\0bias(70,)\0")
    h.update(big.bias.detach().float().numpy().tobytes())
    fp = fingerprint_weights(m, ["0"], "here")
    assert fp.digest == "sampled-v1:" + h.hexdigest()
    # a float64 copy of the same float32 weights agrees; one sampled entry changed does not
    assert fingerprint_weights(copy.deepcopy(m).double(), ["0"]).digest == fp.digest
    other = copy.deepcopy(m)
    with torch.no_grad():
        other[0].weight.view(-1)[idx[17]] += 1e-3
    assert fingerprint_weights(other, ["0"]).digest != fp.digest


def test_fingerprint_of_gpt2_small_sized_layers_is_cheap():
    """The tracked layers of a 124M GPT-2 (12 blocks of 768→2304, 768→768, 768→3072, 3072→768:
    85M parameters): the fingerprint reads 4096 entries per tensor."""
    torch.manual_seed(0)
    blocks = nn.ModuleList(nn.ModuleDict({"qkv": nn.Linear(768, 2304), "proj": nn.Linear(768, 768),
                                          "fc": nn.Linear(768, 3072), "out": nn.Linear(3072, 768)}) for _ in range(12))
    names = [f"{i}.{k}" for i in range(12) for k in ("qkv", "proj", "fc", "out")]
    assert sum(p.numel() for p in blocks.parameters()) > 85_000_000
    fingerprint_weights(blocks, names)  # warm-up
    t0 = time.perf_counter()
    fingerprint_weights(blocks, names)
    assert time.perf_counter() - t0 < 0.25  # about 15 ms measured on 2 busy CPU cores


def test_load_factors_refuses_other_weights_and_accepts_them_on_request(tmp_path):
    trained = fit_trained(tmp_path)
    path = tmp_path / "ekfac" / "factors"
    good = load_factors(path, model=trained)
    assert good.meta["weights"]["fingerprint"] == fingerprint_weights(trained, good.layer_names).digest
    assert "EKFACInfluence(name='ekfac')" in good.meta["weights"]["source"]
    for other, why in ((model(seed=1), "same shape, other weights"), (one_sgd_step(trained), "a later checkpoint")):
        with pytest.raises(WeightsMismatchError) as e:
            load_factors(path, model=other)
        msg = str(e.value)
        stored, now = good.meta["weights"]["fingerprint"][:27], fingerprint_weights(other, good.layer_names).digest[:27]
        assert stored in msg and now in msg and stored != now, why
        assert "allow_other_weights=True" in msg and str(path) in msg and "global_step" in msg
        loaded = load_factors(path, model=other, allow_other_weights=True)
        torch.testing.assert_close(loaded.layers["net.0"].lambdas, good.layers["net.0"].lambdas, rtol=0, atol=0)
    # factors saved without weights (older artifacts, hand-made factors) are not checked
    save_factors(good, tmp_path / "plain")
    load_factors(tmp_path / "plain", model=model(seed=1))


def test_load_index_refuses_other_weights(tmp_path):
    trained = model()
    train, queries = data()
    factors = fit_factors(trained, train)
    idx = build_index(trained, factors, train, tmp_path / "idx", compression="exact")
    want = idx.search(queries, k=5)
    assert torch.equal(load_index(tmp_path / "idx", model=trained).search(queries, k=5).ids, want.ids)
    for other in (model(seed=1), one_sgd_step(trained)):
        with pytest.raises(WeightsMismatchError, match="allow_other_weights=True"):
            load_index(tmp_path / "idx", model=other)
        # on request: the other model's query gradients against the stored training gradients
        got = load_index(tmp_path / "idx", model=other, allow_other_weights=True).search(queries, k=5)
        assert got.ids.shape == want.ids.shape and bool(torch.isfinite(got.scores).all())


def test_trajectory_scorer_refuses_a_model_other_than_the_run_s_final_one(tmp_path):
    trained = fit_trained(tmp_path, epochs=2, segments=2, update_every_n_steps=1)
    TrajectoryScorer(trained, tmp_path / "ekfac")
    with pytest.raises(WeightsMismatchError, match="final factors"):
        TrajectoryScorer(model(seed=1), tmp_path / "ekfac")
    TrajectoryScorer(model(seed=1), tmp_path / "ekfac", allow_other_weights=True)


def test_multistage_scorer_refuses_models_their_factors_were_not_made_with(tmp_path):
    pt, ft = model(), one_sgd_step(model())
    train, _ = data()
    save_factors(fit_factors(pt, train), tmp_path / "pt", model=pt)
    save_factors(fit_factors(ft, train), tmp_path / "ft", model=ft)
    f_pt, f_ft = load_factors(tmp_path / "pt"), load_factors(tmp_path / "ft")
    MultiStageScorer(pt, f_pt, ft, f_ft)
    with pytest.raises(WeightsMismatchError, match="finetuned_model"):
        MultiStageScorer(pt, f_pt, model(seed=1), f_ft)
    with pytest.raises(WeightsMismatchError, match="pretrained_model"):
        MultiStageScorer(ft, f_pt, ft, f_ft)
    MultiStageScorer(pt, f_pt, model(seed=1), f_ft, allow_other_weights=True)
