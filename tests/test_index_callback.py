"""InfluenceIndexCallback: the index built at the end of fit from the EK-FAC callback's factors
equals an index (and the scorer's scores) computed after training from the same factors."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_influence import EKFACInfluence, load_factors, load_scores
from lightning_influence.callbacks.index import InfluenceIndexCallback
from lightning_influence.demos import MLPClassifier, digits_dataset
from lightning_influence.ekfac.scorer import InfluenceScorer
from lightning_influence.index import build_index, load_index
from lightning_influence.storage import read_manifest
from lightning_influence.validation import InvalidArgumentError
from scaffold import indexed, quiet_trainer


def _fit(tmp_path, callbacks, devices=1, **kw):
    torch.manual_seed(0)
    train, test, _ = digits_dataset()
    model = MLPClassifier(hidden=8)
    loader = DataLoader(indexed(train, 96), batch_size=32, shuffle=True)
    trainer = quiet_trainer(tmp_path, callbacks, devices=devices, max_epochs=2, **kw)
    trainer.fit(model, loader)
    return model, trainer, indexed(test, 6, offset=10_000), loader


def test_index_at_fit_end_equals_post_hoc_index_and_scorer(tmp_path):
    ekfac = EKFACInfluence(dirpath=str(tmp_path / "ekfac"))
    cb = InfluenceIndexCallback(compression="exact", dtype="float32", shard_size=40, dirpath=str(tmp_path / "idx"))
    model, trainer, query, loader = _fit(tmp_path, [cb, ekfac])  # order in the list does not matter: on_fit_end
    factors = load_factors(tmp_path / "ekfac" / "factors", model=model)
    index = load_index(tmp_path / "idx" / "index", model=model)
    assert index.n_examples == 96 and [e["n"] for e in index.shards] == [40, 40, 16]
    qloader = DataLoader(query, batch_size=3)
    plain = DataLoader(loader.dataset, batch_size=32, shuffle=False)  # the training set, in order
    ref = InfluenceScorer(model, factors).pairwise(qloader, plain)
    got = index.scores(qloader)
    torch.testing.assert_close(got.pairwise, ref.pairwise, rtol=1e-4, atol=1e-5)
    assert got.train_ids.tolist() == ref.train_ids.tolist() == list(range(96))
    # the callback's index references the EK-FAC callback's saved factors (no copy of them)
    assert read_manifest(index.path / "transform")["factors"]["path"] == str((tmp_path / "ekfac" / "factors").resolve())
    post = build_index(model, tmp_path / "ekfac" / "factors", plain, tmp_path / "post", compression="exact", dtype="float32", shard_size=40)
    assert post.catalog["fingerprint"] == index.catalog["fingerprint"]  # same weights, factors, options
    saved = load_scores(tmp_path / "idx" / "self_influence")
    torch.testing.assert_close(saved.self_influence, InfluenceScorer(model, factors).self_influence(plain).self_influence,
                               rtol=1e-4, atol=1e-6)
    assert saved.meta["callback"] == "index" and saved.epoch == 1
    assert trainer.callback_metrics["influence/index/examples"] == 96
    assert int(trainer.callback_metrics["influence/index/top1_id"]) == int(saved.train_ids[saved.self_influence.argmax()])


def test_missing_ekfac_callback_fails_before_training(tmp_path):
    with pytest.raises(ValueError, match="EKFACInfluence callback named 'other'"):
        _fit(tmp_path, [EKFACInfluence(dirpath=str(tmp_path / "e")), InfluenceIndexCallback(ekfac="other")], max_steps=1)
    with pytest.raises(InvalidArgumentError, match="dtype"):
        InfluenceIndexCallback(dtype="int8")
    with pytest.raises(InvalidArgumentError, match="compression"):
        InfluenceIndexCallback(compression="pq")


@pytest.mark.slow
def test_two_ranks_write_one_index(tmp_path):
    """ddp_spawn, 2 CPU processes: each rank indexes its stride of the data; one catalog."""
    ekfac = EKFACInfluence(dirpath=str(tmp_path / "ekfac"))
    cb = InfluenceIndexCallback(compression="sjlt", dim=16, dtype="float32", shard_size=20, dirpath=str(tmp_path / "idx"))
    model, _, query, loader = _fit(tmp_path, [ekfac, cb], devices=2, strategy="ddp_spawn")
    index = load_index(tmp_path / "idx" / "index")
    assert index.n_examples == 96 and sorted({e["rank"] for e in index.shards}) == [0, 1]
    # rank zero decided for both that the saved factors are the final ones: the index references them
    assert read_manifest(index.path / "transform")["factors"]["path"] == str((tmp_path / "ekfac" / "factors").resolve())
    # the weights come back from rank 0 (ddp_spawn): one process indexing them alike gives the same scores
    factors = load_factors(tmp_path / "ekfac" / "factors", model=model)
    plain = DataLoader(loader.dataset, batch_size=32, shuffle=False)
    one = build_index(model, factors, plain, tmp_path / "one", compression="sjlt", dim=16, dtype="float32", shard_size=20)
    qloader = DataLoader(query, batch_size=3)
    a, b = one.scores(qloader), index.bind(model).scores(qloader)
    order = torch.argsort(b.train_ids)
    assert b.train_ids[order].tolist() == a.train_ids.tolist() == list(range(96))
    torch.testing.assert_close(b.pairwise[:, order], a.pairwise, rtol=1e-4, atol=1e-4)
    assert index.catalog["settings"]["world_size"] == 2
    saved = load_scores(tmp_path / "idx" / "self_influence")
    assert sorted(saved.train_ids.tolist()) == list(range(96))


def test_html_report_is_written_with_the_index_callback_last(tmp_path):
    """The order docs/search.md shows (index callback last): the base's on_fit_end runs for it
    too, so the last influence callback writes ``plots/report.html`` and it lists the index's
    self-influence. No influence callback overrides ``on_fit_end`` (the base owns it and calls
    ``finish_fit``)."""
    from lightning_influence.callbacks.base import InfluenceCallback
    from lightning_influence.callbacks.lissa import LiSSASelfInfluence
    from lightning_influence.callbacks.z0 import Z0Influence

    ekfac = EKFACInfluence(dirpath=str(tmp_path / "influence" / "ekfac"))
    cb = InfluenceIndexCallback(compression="exact", dtype="float32", dirpath=str(tmp_path / "influence" / "index"))
    _fit(tmp_path, [ekfac, cb])
    page = tmp_path / "influence" / "plots" / "report.html"
    assert page.exists()
    assert "index" in page.read_text()
    for cls in (EKFACInfluence, InfluenceIndexCallback, Z0Influence, LiSSASelfInfluence):
        assert cls.on_fit_end is InfluenceCallback.on_fit_end, cls
