"""The pieces of sharded-training support, in one process: declared geometry, unwrapped names,
sharded Gram matrices and snapshots, even shares of passes (the two-process runs are in
``test_fsdp_ekfac.py``, ``test_fsdp_z0.py`` and ``test_strategies.py``)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_influence import EKFACInfluence, IndexedDataset
from lightning_influence.padding import even_batch_sizes
from lightning_influence.ekfac.fit import fit_factors
from lightning_influence.layers import TrackedLayer, named_modules, select_layers, unwrapped_name
from lightning_influence.z0 import SnapshotGram, flatten_snapshot, load_snapshot, local_parts


# -- geometry from declared sizes --------------------------------------------------------------
def _flatten_weight(module: nn.Module, numel: int) -> None:
    """What FSDP1 (use_orig_params=True) leaves in a module: a flat 1-D piece of its weight."""
    module.weight = nn.Parameter(torch.zeros(numel))


@pytest.mark.parametrize("module, d_in, d_out, weight_shape", [
    (nn.Linear(6, 4), 6, 4, (4, 6)),
    (nn.Conv2d(3, 5, (2, 3), padding=1), 3 * 2 * 3, 5, (5, 3, 2, 3)),
    (nn.Conv1d(2, 4, 3), 2 * 3, 4, (4, 2, 3)),
])
def test_geometry_comes_from_declared_sizes_not_sharded_weights(module, d_in, d_out, weight_shape):
    whole = TrackedLayer.from_module("m", module)
    assert (whole.d_in, whole.d_out, whole.has_bias) == (d_in, d_out, True)
    _flatten_weight(module, 7)  # a shard: the weight's shape says nothing about the layer
    sharded = TrackedLayer.from_module("m", module)
    assert (sharded.d_in, sharded.d_out, sharded.has_bias) == (d_in, d_out, True)
    g = torch.randn(2, d_out, d_in + 1)
    dw, db = sharded.param_gradient(g)
    assert tuple(dw.shape) == (2, *weight_shape) and tuple(db.shape) == (2, d_out)
    torch.testing.assert_close(sharded.flatten_param_grads([dw, db]), g)


def test_transformers_conv1d_geometry_from_nx_nf():
    from transformers.pytorch_utils import Conv1D

    m = Conv1D(nf=5, nx=3)
    assert (TrackedLayer.from_module("c", m).d_in, TrackedLayer.from_module("c", m).d_out) == (3, 5)
    _flatten_weight(m, 4)
    t = TrackedLayer.from_module("c", m)
    assert (t.d_in, t.d_out, t.has_bias) == (3, 5, True)
    del m.nx  # an older transformers: no declared input width, and a flat shard: refused, not guessed
    with pytest.raises(Exception, match="flat shard"):
        TrackedLayer.from_module("c", m)


# -- names without wrapper segments -------------------------------------------------------------
def test_wrapped_modules_keep_the_unwrapped_names_and_factors_apply_to_either():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    assert unwrapped_name("net._fsdp_wrapped_module.0._fsdp_wrapped_module") == "net.0"
    assert unwrapped_name("blocks.1._checkpoint_wrapped_module.mlp") == "blocks.1.mlp"
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    wrapped = nn.Sequential(checkpoint_wrapper(plain[0]), plain[1], plain[2])
    assert "0._checkpoint_wrapped_module" in dict(wrapped.named_modules())
    assert named_modules(wrapped)["0"] is plain[0]  # the wrapped module, not its wrapper
    assert [l.name for l in select_layers(wrapped)] == [l.name for l in select_layers(plain)] == ["0", "2"]
    x, y = torch.randn(12, 4), torch.randint(0, 2, (12,))
    loader = torch.utils.data.DataLoader(TensorDataset(x, y), batch_size=4)
    factors = fit_factors(wrapped, loader)
    assert factors.layer_names == ["0", "2"]
    assert [t.module for t in factors.check_model(plain)] == [plain[0], plain[2]]
    assert [t.module for t in factors.check_model(wrapped)] == [plain[0], plain[2]]


# -- sharded Gram matrices -----------------------------------------------------------------------
def _snapshots(rows=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"w": torch.randn(5, 3, generator=g, dtype=torch.float64), "b": torch.randn(4, generator=g, dtype=torch.float64)}
            for _ in range(rows)]


def _split(snap):
    """Two processes' parts: ``w`` by rows (FSDP2), ``b`` as pieces of the flat vector (FSDP1)."""
    return [{"w": snap["w"][:3], "b": snap["b"][:1]}, {"w": snap["w"][3:], "b": snap["b"][1:]}]


def test_sharded_gram_is_the_sum_of_the_shards_parts(tmp_path):
    shapes = {"w": [5, 3], "b": [4]}
    whole = SnapshotGram(tmp_path / "whole")
    shards = [SnapshotGram(tmp_path / "sharded", shard=(r, 2)) for r in range(2)]
    snaps = _snapshots()
    for snap in snaps:
        whole.append(snap)
        parts = _split(snap)
        row = sum(g.partial_row(p, shapes) for g, p in zip(shards, parts))  # the strategy's reduce: a sum
        for g, p in zip(shards, parts):
            g.extend(row, p, shapes)
    flat = torch.stack([flatten_snapshot(s) for s in snaps])
    torch.testing.assert_close(whole.gram, flat @ flat.T, rtol=1e-14, atol=0)
    for g in shards:
        torch.testing.assert_close(g.gram, whole.gram, rtol=1e-14, atol=0)
        assert g.shapes == [[5, 3], [4]] and g.names == ["w", "b"]
    names = sorted(p.name for p in (tmp_path / "sharded").iterdir())
    assert names == [f"snapshot_{r:05d}.shard-{s:05d}-of-00002.safetensors" for r in range(3) for s in range(2)]
    back = load_snapshot(tmp_path / "sharded", 1, ["w", "b"])
    assert torch.equal(back["w"], snaps[1]["w"]) and torch.equal(back["b"], snaps[1]["b"])
    # each process deletes its own files only; a recording never counts another's as its own
    shards[0].cleanup()
    assert sorted(p.name for p in (tmp_path / "sharded").iterdir()) == [n for n in names if "shard-00001" in n]
    with pytest.raises(FileNotFoundError, match="expected shards 0..1 of 2"):
        load_snapshot(tmp_path / "sharded", 1)
    fresh = SnapshotGram(tmp_path / "sharded", shard=(0, 2))
    assert len(fresh.foreign_snapshots()) == 3
    # a recording resumes only with as many shards (processes) as it was made with
    state = shards[1].state_dict()
    assert state["shards"] == 2
    with pytest.raises(ValueError, match="same strategy and number of processes"):
        SnapshotGram(tmp_path / "sharded").load_state_dict(state)
    other = SnapshotGram(tmp_path / "sharded", shard=(0, 2))
    other.load_state_dict(state)  # rank 0 may load rank 1's state (Lightning saves rank zero's): its own files
    assert other.shard == (0, 2) and other.missing() == [tmp_path / "sharded" / f"snapshot_{r:05d}.shard-00000-of-00002.safetensors"
                                                         for r in range(3)]


def test_local_parts_of_plain_tensors_count_once():
    params = {"net._fsdp_wrapped_module.0.weight": torch.ones(2, 3), "head.bias": torch.ones(4)}
    parts0, shapes0 = local_parts(params, None, rank=0)
    parts1, shapes1 = local_parts(params, None, rank=1)
    assert list(parts0) == ["net.0.weight", "head.bias"] and shapes0 == shapes1 == {"net.0.weight": [2, 3], "head.bias": [4]}
    assert [t.numel() for t in parts0.values()] == [6, 4] and [t.numel() for t in parts1.values()] == [0, 0]


# -- every rank runs as many batches -------------------------------------------------------------
def _stops(sizes, max_batches, max_examples):
    """Batches iter_layer_data runs over ``sizes`` under its caps (stop before the first batch
    once ``max_examples`` were seen; a batch is never cut)."""
    seen = 0
    for k, n in enumerate(sizes):
        if (max_batches is not None and k >= max_batches) or (max_examples is not None and seen >= max_examples):
            return k
        seen += n
    return len(sizes)


@pytest.mark.parametrize("share, batch", list(itertools.product(range(2, 30), (2, 3, 8))))
def test_even_batch_sizes_give_every_rank_as_many_batches(share, batch):
    for max_batches, max_examples in [(None, None), (2, None), (None, 5), (None, batch * 2), (3, 7)]:
        full = even_batch_sizes(share, share, batch, max_batches, max_examples)
        short = even_batch_sizes(share - 1, share, batch, max_batches, max_examples)
        assert sum(full) <= share and all(0 < n <= batch for n in full)
        assert short is not None and len(short) == len(full) and all(n > 0 for n in short)
        assert _stops(full, max_batches, max_examples) == _stops(short, max_batches, max_examples) == len(full)
        if max_batches is None and max_examples is None:
            assert sum(full) == share and sum(short) == share - 1 and len(full) == math.ceil(share / batch)
    assert even_batch_sizes(0, 1, 4) is None and even_batch_sizes(4, 5, 1) is None  # cannot be evened out


class _Trainer:
    def __init__(self, rank, world=2):
        self.global_rank, self.world_size = rank, world


@pytest.mark.parametrize("n", [1, 7, 8, 9])
def test_probe_shares_are_padded_to_equal_lengths_under_sharding(n):
    data = IndexedDataset(TensorDataset(torch.arange(n, dtype=torch.float64)))
    cb = EKFACInfluence(probe_batch_size=3)
    cb.sharded = True
    shares = [[int(i) for ids, _ in cb.probe_loader(_Trainer(r), data) for i in ids] for r in range(2)]
    assert len(shares[0]) == len(shares[1]) == -(-n // 2)
    assert sorted(set(shares[0] + shares[1])) == list(range(n))
    assert len(shares[0]) + len(shares[1]) - n == cb.probe_padding(_Trainer(0), data)
    cb.sharded = False  # DDP: strided without padding
    assert sum(len(list(cb.probe_loader(_Trainer(r), data).dataset)) for r in range(2)) == n
    assert cb.probe_padding(_Trainer(0), data) == 0
