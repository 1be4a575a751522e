"""EKFACInfluence under sharded training: two CPU processes (gloo) against one process.

FSDP2 (``ModelParallelStrategy``, ``fully_shard`` on every linear layer) in float64 and FSDP1
(``FSDPStrategy`` with every ``nn.Linear`` in its own unit) in float32 (Lightning's FSDP
precision plugin converts the model to float32). The one-process reference takes the same
optimizer steps: its batch ``k`` is the union of the two ranks' batch ``k`` under the
``DistributedSampler`` Lightning uses, and its mean loss over both halves is the average of the
ranks' means that FSDP's gradient reduction forms. With 63 examples rank 1 holds a padded
duplicate each epoch; the reference leaves it out by position as the callback does, and the
correction pass must count the 65 examples once each (shares of 33 and 32 in batches of 8: 5 batches
each only if the short rank splits its last ones) while every rank runs as many forward
passes (each one is a collective under FSDP).

Checked: the factors (spectra and the preconditioners they define), the example counts, the
probe self-influence (a probe of 9 examples: padded to equal shares under sharding), and the
scorer and multi-stage scorer on the sharded model (on every rank; every pass ends with
``reshard_fsdp1``, so FSDP1 units hold their shards again) and on the consolidated checkpoint,
against the reference.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Subset

from fsdp_launch import ShardedMLP, fsdp1, fsdp2, full_state, run_ranks, trainer
from lightning_influence import EKFACInfluence, InfluenceScorer, MultiStageScorer, load_factors, load_scores
from lightning_influence.demos import digits_dataset
from scaffold import MergedRanks, indexed

pytestmark = pytest.mark.slow

BATCH = 8
PROBE = list(range(0, 63, 7))  # 9 examples: shares of 5 and 4, padded to 5 each under sharding


def _data(n, dtype):
    train, test, _ = digits_dataset(dtype=dtype)
    return indexed(train, n), indexed(test, 6, offset=1000)


def _callback(path, probe):
    return EKFACInfluence(update_every_n_steps=1, correction_max_examples=None, probe=probe, probe_batch_size=4, dirpath=str(path))


def _model(dtype, lr):
    torch.manual_seed(0)
    return ShardedMLP(hidden=8, lr=lr).to(dtype)


def _sharded_run(rank, kind, root, n, lr, dtype):
    data, queries = _data(n, dtype)
    model = _model(dtype, lr)
    strategy = fsdp2(save_distributed_checkpoint=False) if kind == "fsdp2" else fsdp1()
    t = trainer(strategy, root / "run", [_callback(root / "fsdp", Subset(data, PROBE))])
    t.fit(model, DataLoader(data, batch_size=BATCH))
    if kind == "fsdp2":  # one file with whole tensors, written by rank zero (FSDP1's crashes on CPU: full_state)
        t.save_checkpoint(root / "consolidated.ckpt")
    weights = full_state(t, model)
    factors = load_factors(root / "fsdp" / "factors")
    # the scorers on the sharded model: every rank runs the same passes (forwards are collectives)
    train_loader, query_loader = DataLoader(Subset(data, range(12)), batch_size=5), DataLoader(queries, batch_size=4)
    out = {"weights": weights, "names": [n for n, _ in model.named_modules()]}
    out["pairwise"] = InfluenceScorer(model, factors).pairwise(query_loader, train_loader).pairwise
    out["staged"] = MultiStageScorer(model, factors, model, factors).pairwise(query_loader, train_loader).pairwise
    assert len(list(model.parameters())) == 4  # every pass leaves FSDP1 units holding their shards again
    return out


class LeaveOutTheDuplicate(EKFACInfluence):
    """The reference leaves out, by position, the duplicate the sampler pads rank 1 with: the
    last example of the last merged batch of each epoch (rank 1's last); its correction pass
    runs over the examples in order, each once."""

    def __init__(self, *args, batches_per_epoch, **kw):
        super().__init__(*args, **kw)
        self.batches_per_epoch = batches_per_epoch

    def padded_positions(self, trainer, batch_size):
        self.seen = getattr(self, "seen", -1) + 1
        return [batch_size - 1] if self.seen % self.batches_per_epoch == self.batches_per_epoch - 1 else []

    def _without_padding(self, trainer, loader, *args):  # the correction pass: every example once
        return DataLoader(loader.dataset, batch_size=2 * BATCH)


def _reference(root, n, lr, dtype):
    data, _ = _data(n, dtype)
    model = _model(dtype, lr)
    order = MergedRanks(n, BATCH)
    per_rank = len(order.ranks()[0])
    kw = dict(update_every_n_steps=1, correction_max_examples=None, probe=Subset(data, PROBE), probe_batch_size=4,
              dirpath=str(root / "one"))
    cb = LeaveOutTheDuplicate(batches_per_epoch=-(-per_rank // BATCH), **kw) if n % 2 else EKFACInfluence(**kw)
    trainer("auto", root / "single", [cb]).fit(model, DataLoader(data, batch_size=2 * BATCH, sampler=order))
    return model, data


def _assert_same_factors(fa, fb, rtol):
    assert fa.layer_names == fb.layer_names == ["net.0", "net.2"]
    for n in fa.layer_names:
        a, b = fa.layers[n], fb.layers[n]
        assert (a.d_in, a.d_out, a.has_bias, a.layer_type) == (b.d_in, b.d_out, b.has_bias, b.layer_type)
        torch.testing.assert_close(a.eig_a, b.eig_a, rtol=rtol, atol=rtol * float(b.eig_a.abs().max()))
        torch.testing.assert_close(a.eig_s, b.eig_s, rtol=rtol, atol=rtol * float(b.eig_s.abs().max()))
        torch.testing.assert_close(a.lambdas, b.lambdas, rtol=rtol * 10, atol=rtol * 10 * float(b.lambdas.abs().max()))
        g = torch.randn(3, *a.grad_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        pa, pb = a.precondition(g, b.damping()), b.precondition(g, b.damping())  # eigenvectors: up to sign
        assert float((pa - pb).norm() / pb.norm()) < rtol * 100


@pytest.mark.parametrize("kind, n, lr, dtype, rtol", [
    ("fsdp2", 64, 0.0, torch.float64, 1e-9),
    ("fsdp2", 65, 0.5, torch.float64, 1e-9),
    ("fsdp1", 65, 0.5, torch.float32, 2e-4),
])
def test_sharded_factors_and_scores_equal_one_process(tmp_path, kind, n, lr, dtype, rtol):
    ranks = run_ranks(_sharded_run, kind, tmp_path, n, lr, dtype, tmp_path=tmp_path)
    ref_model, data = _reference(tmp_path, n, lr, dtype)

    assert not any("_fsdp_wrapped_module" in m for m in ranks[0]["names"]) or kind == "fsdp1"
    for name, p in ref_model.named_parameters():  # the same optimizer steps (lr > 0 moves the weights)
        torch.testing.assert_close(ranks[0]["weights"][name], p.detach(), rtol=rtol, atol=rtol)
    sharded, one = load_factors(tmp_path / "fsdp" / "factors"), load_factors(tmp_path / "one" / "factors")
    assert sharded.n_examples == one.n_examples == 2 * n  # two epochs, each example once
    assert sharded.n_lambda_examples == one.n_lambda_examples == n
    _assert_same_factors(sharded, one, rtol)
    # the two layers' eigendecompositions were shared out, one per rank, and broadcast (the
    # correction pass and the probe scores above, on both ranks, used them)
    assert sorted(sharded.meta["eigendecomposition_ranks"].values()) == [0, 1]
    assert "eigendecomposition_ranks" not in one.meta

    probe_sharded = load_scores(tmp_path / "fsdp" / "self_influence")
    probe_one = load_scores(tmp_path / "one" / "self_influence")
    assert probe_sharded.train_ids.tolist() == probe_one.train_ids.tolist() == PROBE
    torch.testing.assert_close(probe_sharded.self_influence, probe_one.self_influence, rtol=rtol * 100, atol=0)

    # scorers: the FSDP-trained model on each rank, and its consolidated checkpoint in a plain module
    _, queries = _data(n, dtype)
    train_loader, query_loader = DataLoader(Subset(data, range(12)), batch_size=5), DataLoader(queries, batch_size=4)
    reference = InfluenceScorer(ref_model, one).pairwise(query_loader, train_loader).pairwise
    staged = MultiStageScorer(ref_model, one, ref_model, one).pairwise(query_loader, train_loader).pairwise
    for r in ranks:
        torch.testing.assert_close(r["pairwise"], reference, rtol=rtol * 1000, atol=rtol * float(reference.abs().max()))
        torch.testing.assert_close(r["staged"], staged, rtol=rtol * 1000, atol=rtol * float(staged.abs().max()))
    consolidated = ShardedMLP(hidden=8).to(dtype)
    if kind == "fsdp2":
        state = torch.load(tmp_path / "consolidated.ckpt", weights_only=False)["state_dict"]
        assert all(not hasattr(t, "device_mesh") for t in state.values())  # whole tensors
    else:
        state = ranks[0]["weights"]
    consolidated.load_state_dict(state)
    saved = load_factors(tmp_path / "fsdp" / "factors", model=consolidated)
    got = InfluenceScorer(consolidated, saved).pairwise(query_loader, train_loader).pairwise
    torch.testing.assert_close(got, reference, rtol=rtol * 1000, atol=rtol * float(reference.abs().max()))
    got = MultiStageScorer(consolidated, saved, consolidated, saved).pairwise(query_loader, train_loader).pairwise
    torch.testing.assert_close(got, staged, rtol=rtol * 1000, atol=rtol * float(staged.abs().max()))


def _failing_decomposition(rank, root):
    """Rank 1's own eigendecomposition raises: every rank must raise (none may wait in the
    broadcast of a layer that rank 1 never decomposed)."""
    import lightning_influence.ekfac.fit as fit

    real = fit.KroneckerEigen.from_covariances

    def from_covariances(*args, **kw):
        if rank == 1:
            raise RuntimeError("injected failure on rank 1")
        return real(*args, **kw)

    fit.KroneckerEigen.from_covariances = from_covariances
    data, _ = _data(32, torch.float64)
    t = trainer(fsdp2(save_distributed_checkpoint=False), root / "run", [_callback(root / "fail", None)])
    try:
        t.fit(_model(torch.float64, 0.1), DataLoader(data, batch_size=BATCH))
    except Exception as e:  # noqa: BLE001 - the message is the result
        return f"{type(e).__name__}: {e}"
    return "no error"


def test_a_failed_shared_eigendecomposition_raises_on_every_rank(tmp_path):
    ranks = run_ranks(_failing_decomposition, tmp_path, tmp_path=tmp_path, timeout=60)
    assert ranks[1] == "RuntimeError: injected failure on rank 1"
    assert ranks[0].startswith("RuntimeError: EKFACInfluence failed on rank 1") and "injected failure" in ranks[0]
    assert not (tmp_path / "fail" / "factors").exists()
