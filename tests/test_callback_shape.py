"""One shape for the three callbacks: names, folders, metric names and the artifact format are
the same for every method, and two instances of each method run side by side in one Trainer."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, Subset

from lightning_influence import (
    EKFACInfluence,
    InfluenceScorer,
    LiSSAOptions,
    LiSSASelfInfluence,
    Z0Influence,
    load_factors,
    load_scores,
    load_z0,
)
from lightning_influence.demos import MLPClassifier, digits_dataset
from lightning_influence.storage import list_artifacts, read_artifact
from scaffold import indexed, quiet_trainer

TOP = 3


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shape")
    torch.manual_seed(0)
    train, test, _ = digits_dataset(dtype=torch.float64)
    tr = indexed(train, 96)
    probe = Subset(tr, range(0, 96, 3))
    queries = indexed(test, 4, offset=1000)
    lissa = LiSSAOptions(depth=10, damping=0.1, scale=50.0, sample_size=32)
    callbacks = [
        EKFACInfluence(name="ekfac_a", probe=probe, update_every_n_steps=1, top_k=TOP),
        EKFACInfluence(name="ekfac_b", probe=probe, update_every_n_steps=1, layers="net.2", top_k=TOP),
        Z0Influence(name="z0_a", probe=probe, queries=queries, top_k=TOP),
        Z0Influence(name="z0_b", probe=probe, params="last_layer", top_k=TOP),
        LiSSASelfInfluence(probe, name="lissa_a", options=lissa, top_k=TOP),
        LiSSASelfInfluence(probe, name="lissa_b", options=LiSSAOptions(depth=10, damping=0.1, scale=50.0, sample_size=32, params="net.2.*"), top_k=TOP),
    ]
    ckpt = ModelCheckpoint(dirpath=str(tmp / "ckpt"), save_last=True)
    trainer = quiet_trainer(None, [*callbacks, ckpt], max_epochs=2, precision="64-true", logger=CSVLogger(str(tmp), name="run"),
                            enable_checkpointing=True, num_sanity_val_steps=0)
    model = MLPClassifier(hidden=8, lr=0.05)
    trainer.fit(model, DataLoader(tr, batch_size=16))
    return trainer, model, callbacks, probe, tmp


def test_every_callback_writes_the_same_shape_of_output(run):
    trainer, model, callbacks, probe, tmp = run
    root = tmp / "run" / "version_0" / "influence"
    found = {info.path.relative_to(root).as_posix(): info.kind for info in list_artifacts(root)}
    assert found == {
        "ekfac_a/factors": "ekfac", "ekfac_a/self_influence": "scores",
        "ekfac_b/factors": "ekfac", "ekfac_b/self_influence": "scores",
        "z0_a/recording": "z0", "z0_a/self_influence": "scores",
        "z0_b/recording": "z0", "z0_b/self_influence": "scores",
        "lissa_a/self_influence": "scores", "lissa_b/self_influence": "scores",
        **{f"{cb.name}/examples": "examples" for cb in callbacks},  # the rendered top examples, saved at fit end
    }
    probe_ids = sorted(probe[i][0] for i in range(len(probe)))
    manifests = {}
    for cb in callbacks:
        tensors, manifest = read_artifact(root / cb.name / "self_influence", kind="scores")
        assert set(tensors) == {"train_ids", "self_influence"}, cb.name
        assert tensors["train_ids"].tolist() == probe_ids
        assert manifest["method"] == cb.method and manifest["meta"]["callback"] == cb.name
        assert manifest["epoch"] == 1 and manifest["step"] == trainer.global_step and manifest["n_train"] == len(probe_ids)
        manifests[cb.name] = manifest
    keys = {name: set(m) for name, m in manifests.items()}
    assert all(k == keys["ekfac_a"] for k in keys.values()), keys


def test_metric_names_follow_one_rule(run):
    trainer, model, callbacks, probe, tmp = run
    metrics = trainer.callback_metrics
    for cb in callbacks:
        prefix = f"influence/{cb.name}/"
        for key in ["self_mean", "self_max", "nonfinite"] + [f"top{r}_id" for r in range(1, TOP + 1)]:
            assert prefix + key in metrics, prefix + key
        assert prefix + "top0_id" not in metrics and prefix + "top_id_0" not in metrics
        saved = load_scores(tmp / "run" / "version_0" / "influence" / cb.name / "self_influence")
        ranked = saved.train_ids[torch.argsort(saved.self_influence, descending=True)]
        assert [int(metrics[prefix + f"top{r}_id"]) for r in range(1, TOP + 1)] == ranked[:TOP].tolist(), cb.name
        assert float(metrics[prefix + "self_max"]) == pytest.approx(float(saved.self_influence.max()), rel=1e-6)
        assert float(metrics[prefix + "nonfinite"]) == 0
    logged = (tmp / "run" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"influence/ekfac_b/top1_id", "influence/z0_b/top1_id", "influence/lissa_b/top1_id"} <= set(logged)


def test_two_instances_of_each_method_keep_their_own_state(run):
    trainer, model, callbacks, probe, tmp = run
    ek_a, ek_b, z_a, z_b, li_a, li_b = callbacks
    ckpt = torch.load(tmp / "ckpt" / "last.ckpt", weights_only=False)
    keys = [k for k in ckpt["callbacks"] if "Influence" in k]
    assert len(keys) == 6 and len(set(keys)) == 6  # every callback keeps state (its folder at least), under its own key
    assert {ckpt["callbacks"][cb.state_key]["folder"] for cb in callbacks} == {str(cb.output_dir) for cb in callbacks}
    root = tmp / "run" / "version_0" / "influence"
    # instance b tracks net.2 only; its factors equal instance a's for that layer, so its
    # self-influence equals a's net.2 term, computed independently by the scorer
    fa, fb = load_factors(root / "ekfac_a" / "factors"), load_factors(root / "ekfac_b" / "factors")
    assert fa.layer_names == ["net.0", "net.2"] and fb.layer_names == ["net.2"]
    torch.testing.assert_close(fb.layers["net.2"].lambdas, fa.layers["net.2"].lambdas)
    ref = InfluenceScorer(model, fa, layers="net.2").self_influence(DataLoader(probe, batch_size=7))
    torch.testing.assert_close(load_scores(root / "ekfac_b" / "self_influence").self_influence.double(),
                               ref.self_influence, rtol=1e-5, atol=1e-8)
    # the two Z0 recordings snapshot different parameters of the same weights
    ra, rb = load_z0(root / "z0_a" / "recording"), load_z0(root / "z0_b" / "recording")
    assert rb.manifest["param_names"] == ["net.2.weight", "net.2.bias"]
    assert len(ra.manifest["param_names"]) == 4 and ra.query_losses is not None and rb.query_losses is None
    w = torch.cat([model.net[2].weight.reshape(-1), model.net[2].bias]).double()
    assert float(rb.gram[-1, -1]) == pytest.approx(float(w @ w), rel=1e-12)
    assert float(ra.gram[-1, -1]) > float(rb.gram[-1, -1])
    # the two LiSSA runs use different parameter subsets, hence different scores
    sa = load_scores(root / "lissa_a" / "self_influence").self_influence
    sb = load_scores(root / "lissa_b" / "self_influence").self_influence
    assert not torch.allclose(sa, sb)
    assert load_scores(root / "lissa_b" / "self_influence").options["params"] == "net.2.*"
