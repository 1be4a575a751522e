"""Factor storage (round trip, mismatch, corruption) and the task protocol."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import IndexedDataset, select_layers
from lightning_influence.ekfac.factors import FactorMismatchError
from lightning_influence.layers import LayerSelectionError
from lightning_influence.storage import ArtifactError
from lightning_influence.ekfac.factors import load_factors, save_factors
from lightning_influence.ekfac.fit import fit_factors
from lightning_influence.task import CausalLMTask, ClassificationTask, MissingExampleIdsError, resolve_task
from lightning_influence.demos import MLPClassifier, synthetic_token_dataset
from lightning_influence.data import lm_collate


@pytest.fixture()
def fitted(tmp_path):
    torch.manual_seed(0)
    model = MLPClassifier(d_in=6, hidden=5, n_classes=3)
    ds = IndexedDataset(TensorDataset(torch.randn(30, 6), torch.randint(0, 3, (30,))))
    factors = fit_factors(model, DataLoader(ds, batch_size=8))
    path = save_factors(factors, tmp_path / "ekfac")
    return model, factors, path


def test_round_trip_is_exact(fitted):
    model, factors, path = fitted
    loaded = load_factors(path, model=model)
    assert loaded.layer_names == factors.layer_names
    for n in factors.layer_names:
        for k in ("q_a", "eig_a", "q_s", "eig_s", "lambdas"):
            assert torch.equal(getattr(loaded.layers[n], k), getattr(factors.layers[n], k))
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["kind"] == "ekfac" and manifest["format_version"] == 2 and manifest["n_examples"] == 30
    assert [l["name"] for l in manifest["layers"]] == factors.layer_names
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_mismatched_model_names_every_bad_layer(fitted):
    _, _, path = fitted
    other = MLPClassifier(d_in=7, hidden=5, n_classes=4)
    with pytest.raises(FactorMismatchError) as e:
        load_factors(path, model=other)
    msg = str(e.value)
    assert "net.0" in msg and "d_in=6" in msg and "d_in=7" in msg and "net.2" in msg and "d_out=3" in msg


def test_corrupted_and_truncated_files_raise(fitted, tmp_path):
    _, _, path = fitted
    tensor_file = path / "tensors.safetensors"
    data = bytearray(tensor_file.read_bytes())
    data[-5] ^= 0xFF
    tensor_file.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="SHA-256"):
        load_factors(path)
    tensor_file.write_bytes(bytes(data[:-100]))
    with pytest.raises(ArtifactError, match="truncated"):
        load_factors(path)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_factors(path)
    with pytest.raises(ArtifactError, match="no artifact directory"):
        load_factors(tmp_path / "missing")


def test_classification_task_layouts_and_scale():
    task = ClassificationTask()
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    model = torch.nn.Linear(3, 3)
    ids = torch.tensor([5, 6, 7, 8])
    ref = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
    for batch in ((x, y), (ids, (x, y)), [ids, [x, y]], (ids, x, y)):
        torch.testing.assert_close(task.per_example_loss(model, batch), ref)
    assert task.example_ids((x, y)) is None
    assert task.example_ids((ids, (x, y))).tolist() == [5, 6, 7, 8]
    assert task.gradient_scale((x, y)) == 0.25
    assert ClassificationTask(training_reduction="sum").gradient_scale((x, y)) == 1.0
    with pytest.raises(MissingExampleIdsError, match="IndexedDataset"):
        task.require_ids((x, y))
    with pytest.raises(ValueError, match="loss"):
        ClassificationTask(loss="hinge")


def test_causal_lm_task_sums_shifted_token_losses():
    seqs = synthetic_token_dataset(3, vocab_size=10, min_len=2, max_len=5)
    batch = lm_collate([(i, s) for i, s in enumerate(seqs)])
    task = CausalLMTask()
    torch.manual_seed(0)
    logits = torch.randn(3, batch[1]["input_ids"].shape[1], 10)
    model = lambda input_ids, attention_mask=None: logits  # noqa: E731
    losses = task.per_example_loss(model, batch)
    for b, s in enumerate(seqs):
        ids = s["input_ids"]
        ref = torch.nn.functional.cross_entropy(logits[b, : len(ids) - 1], ids[1:], reduction="sum")
        torch.testing.assert_close(losses[b], ref)
    n_targets = sum(len(s["input_ids"]) - 1 for s in seqs)
    assert task.gradient_scale(batch) == pytest.approx(1.0 / n_targets)
    assert task.padding_mask(batch).sum() == sum(len(s["input_ids"]) for s in seqs)


def test_module_methods_override_defaults():
    class Custom(MLPClassifier):
        def per_example_loss(self, batch):
            return torch.full((len(batch[0]),), 3.0)

    m = Custom(d_in=2, hidden=2, n_classes=2)
    task = resolve_task(m)
    batch = (torch.tensor([1, 2]), (torch.randn(2, 2), torch.tensor([0, 1])))
    assert task.per_example_loss(m, batch).tolist() == [3.0, 3.0]
    assert task.measurement(m, batch).tolist() == [3.0, 3.0]  # measurement defaults to the loss
    assert task.example_ids(batch).tolist() == [1, 2]


def test_layer_selection_errors_list_available_layers():
    m = MLPClassifier(d_in=2, hidden=2, n_classes=2)
    assert [l.name for l in select_layers(m, "net.0")] == ["net.0"]
    assert [l.name for l in select_layers(m, exclude="net.2")] == ["net.0"]
    with pytest.raises(LayerSelectionError, match="net.0, net.2"):
        select_layers(m, "encoder.*")
    with pytest.raises(LayerSelectionError, match=r"unsupported modules \['net.1 \(Tanh\)'\]"):
        select_layers(m, "net.1")
    with pytest.raises(LayerSelectionError, match=r"exclude=.*'\*lm_head' matches no"):
        select_layers(m, exclude="*lm_head")  # an exclusion that excludes nothing is a mistake too


def test_progress_bars_show_only_when_asked(capsys, monkeypatch):
    from lightning_influence.progress import progress_bar, progress_enabled

    assert list(progress_bar(range(3), "x", progress=False)) == [0, 1, 2]
    assert capsys.readouterr().err == ""
    assert list(progress_bar(range(3), "counting", progress=True)) == [0, 1, 2]
    assert "counting" in capsys.readouterr().err
    monkeypatch.setenv("LIGHTNING_INFLUENCE_PROGRESS", "0")
    assert progress_enabled(None) is False  # and never on a non-terminal (pytest captures stderr)
    monkeypatch.delenv("LIGHTNING_INFLUENCE_PROGRESS")
    assert progress_enabled(None) is False


def test_scores_artifact_round_trip_and_csv(tmp_path):
    from lightning_influence.scores import InfluenceScores, load_scores, save_scores

    g = torch.Generator().manual_seed(0)
    pw = torch.randn(3, 5, generator=g)
    s = InfluenceScores("ekfac", torch.tensor([7, 3, 9, 1, 4]), self_influence=torch.rand(5, generator=g),
                        query_ids=torch.tensor([20, 21, 22]), pairwise=pw, per_layer={"a.b": pw / 2, "c": pw / 2},
                        epoch=2, step=40, options={"damping": 0.1}, meta={"callback": "x"})
    back = load_scores(save_scores(s, tmp_path / "s", top_k=2))
    for f in ("train_ids", "self_influence", "query_ids", "pairwise"):
        assert torch.equal(getattr(back, f), getattr(s, f))
    assert back.per_layer.keys() == s.per_layer.keys() and torch.equal(back.per_layer["a.b"], pw / 2)
    assert (back.method, back.epoch, back.step, back.options, back.meta) == ("ekfac", 2, 40, {"damping": 0.1}, {"callback": "x"})
    rows = (tmp_path / "s" / "self_influence.csv").read_text().splitlines()
    order = torch.argsort(s.self_influence, descending=True)
    assert [int(r.split(",")[0]) for r in rows[1:]] == s.train_ids[order].tolist()
    top = back.top_pairwise(2)
    ref = torch.topk(pw, 2, dim=1)
    assert top.ids.tolist() == s.train_ids[ref.indices].tolist()
    assert torch.equal(top.scores, ref.values)


def test_scores_with_mismatched_lengths_are_rejected_on_load(tmp_path):
    from lightning_influence.scores import load_scores
    from lightning_influence.storage import write_artifact

    write_artifact(tmp_path / "bad", "scores", {"train_ids": torch.arange(4), "self_influence": torch.rand(3)}, {"method": "x"})
    with pytest.raises(ArtifactError, match=r"tensors.safetensors: tensor 'self_influence' has shape \[3\], expected \[4\]"):
        load_scores(tmp_path / "bad")


def test_writes_never_replace_a_folder_the_library_did_not_write(tmp_path):
    from lightning_influence.storage import list_artifacts, write_artifact

    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    with pytest.raises(ArtifactError, match="not a lightning-influence artifact"):
        write_artifact(user, "scores", {"x": torch.zeros(1)}, {})
    assert (user / "notes.txt").read_text() == "keep me"
    write_artifact(tmp_path / "a" / "f", "ekfac", {"x": torch.zeros(1)}, {})
    with pytest.raises(ArtifactError, match="holds a 'ekfac' artifact"):
        write_artifact(tmp_path / "a" / "f", "scores", {"x": torch.zeros(1)}, {})
    write_artifact(tmp_path / "a" / "f", "ekfac", {"x": torch.ones(1)}, {})  # same kind: replaced
    (tmp_path / "a" / "plots").mkdir()
    found = [(i.path.relative_to(tmp_path).as_posix(), i.kind) for i in list_artifacts(tmp_path)]
    assert found == [("a/f", "ekfac")]


def test_gauss_newton_loss_needs_loss_from_outputs_when_the_module_owns_its_loss():
    class OwnLoss(MLPClassifier):
        def per_example_loss(self, batch):
            x, y = batch[1]
            return torch.nn.functional.cross_entropy(self(x), y, reduction="none")

    m = OwnLoss(d_in=2, hidden=2, n_classes=2)
    batch = (torch.tensor([1, 2]), (torch.randn(2, 2), torch.tensor([0, 1])))
    with pytest.raises(NotImplementedError, match="loss_from_outputs"):
        resolve_task(m).loss_from_outputs(m(batch[1][0]), batch)
    plain = MLPClassifier(d_in=2, hidden=2, n_classes=2)
    out = plain(batch[1][0])
    ref = torch.nn.functional.cross_entropy(out, batch[1][1], reduction="none")
    torch.testing.assert_close(resolve_task(plain).loss_from_outputs(out, batch), ref)


def test_factors_record_their_layer_type_and_refuse_another_type_of_equal_geometry(tmp_path):
    class Conv(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Conv1d(6, 5, kernel_size=1))

        def forward(self, x):
            return self.net(x[:, :, None]).squeeze(-1)

    class Lin(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(6, 5))

        def forward(self, x):
            return self.net(x)

    torch.manual_seed(0)
    ds = IndexedDataset(TensorDataset(torch.randn(12, 6), torch.randint(0, 5, (12,))))
    path = save_factors(fit_factors(Conv(), DataLoader(ds, batch_size=4)), tmp_path / "f")
    assert json.loads((path / "manifest.json").read_text())["layers"][0]["type"] == "torch.nn.Conv1d"
    assert load_factors(path, model=Conv()).layers["net.0"].layer_type == "torch.nn.Conv1d"
    with pytest.raises(FactorMismatchError, match=r"net.0: factors are for a torch.nn.Conv1d layer, the model's is a"):
        load_factors(path, model=Lin())
