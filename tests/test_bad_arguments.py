"""Bad input is refused early, with the argument named: every bad constructor argument of the
three callbacks at construction; unwritable or shared output folders, probes without ids and
gating that never fires at ``setup``, before any training step."""

from __future__ import annotations

import math
import warnings

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import EKFACInfluence, IndexedDataset, LiSSAOptions, LiSSASelfInfluence, Z0Influence
from lightning_influence.callbacks.base import OutputFolderError
from lightning_influence.demos import MLPClassifier
from lightning_influence.task import MissingExampleIdsError
from lightning_influence.validation import InvalidArgumentError
from scaffold import quiet_trainer

warnings.filterwarnings("ignore", ".*does not have many workers.*")

DATA = IndexedDataset(TensorDataset(torch.randn(32, 6), torch.randint(0, 3, (32,))))
PLAIN = TensorDataset(torch.randn(32, 6), torch.randint(0, 3, (32,)))  # batches (x, y): no ids
CALLBACKS = {
    "ekfac": lambda **kw: EKFACInfluence(**kw),
    "z0": lambda **kw: Z0Influence(**{"probe": DATA, **kw}),
    "lissa": lambda **kw: LiSSASelfInfluence(**{"probe": DATA, **kw}),
}

SHARED = [
    ("name", "."), ("name", ".."), ("name", "a/b"), ("name", ""), ("name", ".hidden"), ("name", 5), ("name", None), ("name", "x" * 101),
    ("dirpath", 123), ("dirpath", ""), ("dirpath", []), ("dirpath", 1.5),
    ("every_n_epochs", 0), ("every_n_epochs", -1), ("every_n_epochs", 1.5), ("every_n_epochs", "2"), ("every_n_epochs", True),
    ("probe_batch_size", 0), ("probe_batch_size", 2.0), ("probe_batch_size", None), ("probe_batch_size", "8"),
    ("top_k", -1), ("top_k", "3"), ("top_k", 1.0), ("top_k", None),
    ("task", object()), ("task", "classification"), ("task", 5),
]
OWN = {
    "ekfac": [
        ("layers", 123), ("layers", []), ("layers", [1]), ("layers", ""), ("layers", [""]), ("exclude", 5), ("exclude", [""]),
        ("exclude", [None]), ("fisher", "exact"), ("fisher", None), ("update_every_n_steps", 0), ("update_every_n_steps", True),
        ("update_every_n_steps", 1.5), ("max_examples_per_update", 0), ("epochs", 0), ("epochs", "last"), ("epochs", 1.5),
        ("ema_decay", 1.5), ("ema_decay", math.nan), ("ema_decay", 0), ("ema_decay", 1), ("correction", "x"),
        ("correction_max_batches", 0), ("correction_max_examples", -1), ("damping", math.nan), ("damping", math.inf),
        ("damping", -math.inf), ("damping", -1), ("damping", "0.1"), ("seed", "a"), ("seed", 1.5), ("seed", None),
        ("probe", "train"), ("probe", 5), ("probe", {"a": 1}),
    ],
    "z0": [
        ("probe", "train"), ("probe", 5), ("queries", 3), ("queries", "q"), ("every_n_steps", 0), ("every_n_steps", 1.5),
        ("params", 5), ("params", [""]), ("params", []), ("losses_from", "x"), ("record_initial", "yes"), ("record_initial", 1),
        ("keep_snapshots", 1), ("snapshot_dir", 5), ("snapshot_dir", ""), ("self_influence", "loss"), ("self_influence", 1),
    ],
    "lissa": [("probe", "x"), ("probe", None), ("probe", 3), ("options", {"depth": 3}), ("pool", "x"), ("pool", 3)],
    "lissa_options": [
        ("damping", math.nan), ("damping", math.inf), ("damping", -1), ("scale", 0), ("scale", math.nan), ("scale", math.inf),
        ("scale", "big"), ("depth", 0), ("repeats", 0), ("tol", -1), ("sampler", "x"), ("sample_size", 0), ("chunk_size", 0),
        ("seed", "a"), ("params", 5), ("curvature", "x"),
    ],
}
CASES = ([(m, k, v) for m in CALLBACKS for k, v in SHARED]
         + [(m, k, v) for m in ("ekfac", "z0", "lissa", "lissa_options") for k, v in OWN[m]])


def _case_id(method, argument, value):
    shown = repr(value) if isinstance(value, (int, float, str, list, dict, type(None))) else type(value).__name__
    return f"{method}-{argument}={shown}"[:60]


@pytest.mark.parametrize("method, argument, value", CASES, ids=[_case_id(*c) for c in CASES])
def test_every_bad_constructor_argument_is_refused_at_construction_naming_it(method, argument, value):
    make = (lambda **kw: LiSSAOptions(**kw)) if method == "lissa_options" else CALLBACKS[method]
    with pytest.raises(InvalidArgumentError) as e:
        make(**{argument: value})
    assert argument in str(e.value)


def _trainer(tmp_path, callbacks, epochs=1, **kw):
    return quiet_trainer(tmp_path, callbacks, max_epochs=epochs, **kw)


class StepCounter(L.Callback):
    def __init__(self):
        self.steps = 0

    def on_train_batch_start(self, *args):
        self.steps += 1


@pytest.mark.parametrize("method", ["ekfac", "z0", "z0-queries", "lissa"])
def test_a_probe_without_ids_fails_at_setup_for_every_callback(tmp_path, method):
    make = {"ekfac": lambda: EKFACInfluence(probe=PLAIN), "z0": lambda: Z0Influence(probe=PLAIN),
            "z0-queries": lambda: Z0Influence(probe=DATA, queries=DataLoader(PLAIN, batch_size=4)),
            "lissa": lambda: LiSSASelfInfluence(probe=PLAIN)}[method]
    counter = StepCounter()
    with pytest.raises(MissingExampleIdsError, match="carry no example ids.*IndexedDataset"):
        _trainer(tmp_path, [make(), counter]).fit(MLPClassifier(d_in=6, hidden=4, n_classes=3), DataLoader(DATA, batch_size=8))
    assert counter.steps == 0  # before any training, and before any artifact
    assert not list(tmp_path.rglob("manifest.json"))


@pytest.mark.parametrize("method", list(CALLBACKS))
def test_an_unwritable_output_folder_fails_at_setup(tmp_path, method):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the folder should go")
    counter = StepCounter()
    with pytest.raises(OutputFolderError, match=r"cannot write its output folder .*file/sub.*pass a writable dirpath"):
        _trainer(tmp_path, [CALLBACKS[method](dirpath=str(blocker / "sub")), counter]).fit(
            MLPClassifier(d_in=6, hidden=4, n_classes=3), DataLoader(DATA, batch_size=8))
    assert counter.steps == 0 and blocker.read_text() == "a file where the folder should go"


def test_two_callbacks_writing_into_one_folder_fail_at_setup(tmp_path):
    # a Z0 recording named "ekfac" would have replaced EK-FAC's self-influence scores with its own
    cbs = [EKFACInfluence(probe=DATA), Z0Influence(probe=DATA, name="ekfac")]
    with pytest.raises(OutputFolderError, match=r"Z0Influence\(name='ekfac'\) and EKFACInfluence\(name='ekfac'\) would both write"):
        _trainer(tmp_path, cbs).fit(MLPClassifier(d_in=6, hidden=4, n_classes=3), DataLoader(DATA, batch_size=8))


def test_scores_of_another_method_are_never_replaced(tmp_path):
    model = MLPClassifier(d_in=6, hidden=4, n_classes=3)
    _trainer(tmp_path, [Z0Influence(probe=DATA, dirpath=str(tmp_path / "shared"))], epochs=2).fit(model, DataLoader(DATA, batch_size=8))
    before = (tmp_path / "shared" / "self_influence" / "manifest.json").read_text()
    opts = LiSSAOptions(depth=2, scale=50.0, damping=0.1, sample_size=8)
    with pytest.raises(Exception, match=r"refuses to replace .*shared/self_influence: it holds 'z0' scores, not 'lissa' ones"):
        _trainer(tmp_path, [LiSSASelfInfluence(probe=DATA, options=opts, dirpath=str(tmp_path / "shared"))]).fit(
            model, DataLoader(DATA, batch_size=8))
    assert (tmp_path / "shared" / "self_influence" / "manifest.json").read_text() == before


def test_gating_that_never_fires_in_the_configured_run_is_warned_about(tmp_path):
    model = MLPClassifier(d_in=6, hidden=4, n_classes=3)
    cbs = [EKFACInfluence(every_n_epochs=5), Z0Influence(probe=DATA, every_n_steps=50),
           LiSSASelfInfluence(probe=DATA, every_n_epochs=3, options=LiSSAOptions(depth=2, scale=50.0, damping=0.1, sample_size=8))]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(tmp_path, cbs, epochs=2).fit(model, DataLoader(DATA, batch_size=8))
    text = "\n".join(str(w.message) for w in caught)
    assert "EKFACInfluence(every_n_epochs=5) never fires in this run: max_epochs=2" in text
    assert "LiSSASelfInfluence(every_n_epochs=3) never fires in this run: max_epochs=2" in text
    assert "Z0Influence(every_n_steps=50) never fires in this run: it lasts about 8 optimizer steps" in text
    assert "Z0Influence(every_n_epochs" not in text  # no false alarm for gating that fires


def test_an_empty_batch_contributes_nothing_and_divides_by_nothing():
    from lightning_influence.data import lm_collate
    from lightning_influence.demos import synthetic_token_dataset
    from lightning_influence.ekfac.online import AccumulationOptions, OnlineFactors
    from lightning_influence.layers import select_layers
    from lightning_influence.task import CausalLMTask, ClassificationTask

    empty_xy = (torch.zeros(0, dtype=torch.long), (torch.zeros(0, 6), torch.zeros(0, dtype=torch.long)))
    empty_lm = lm_collate([(i, s) for i, s in enumerate(synthetic_token_dataset(2, vocab_size=10, min_len=2, max_len=4))])
    empty_lm = (empty_lm[0][:0], {k: v[:0] for k, v in empty_lm[1].items()})
    for task, batch in ((ClassificationTask(), empty_xy), (ClassificationTask(loss="mse"), empty_xy),
                        *((CausalLMTask(r), empty_lm) for r in ("token_mean", "mean", "sum"))):
        assert task.gradient_scale(batch) == 1.0
    model = MLPClassifier(d_in=6, hidden=4, n_classes=3)
    state = OnlineFactors(select_layers(model), AccumulationOptions(update_every_n_steps=1))
    assert state.begin_batch(empty_xy, ClassificationTask(), 0, 1) == (False, None)
    torch.testing.assert_close(ClassificationTask().per_example_loss(model, empty_xy), torch.zeros(0))
