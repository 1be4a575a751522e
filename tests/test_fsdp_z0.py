"""Z0Influence under sharded training: two CPU processes (gloo) against one process.

FSDP2 (``ModelParallelStrategy``, float64) and FSDP1 (``FSDPStrategy``, float32), lr > 0,
65 training examples (the sampler pads rank 1 each epoch) and the one-process reference taking
the same optimizer steps (see ``test_fsdp_ekfac.py``). Each rank writes only its part of every
snapshot and computes its part of each Gram entry; the parts are summed with the strategy's
reduce. Checked against the reference: the Gram matrix, the probe's and queries' loss tables
(the probe of 65 examples in batches of 16 is padded to equal shares of 33 under sharding), the snapshots put back
together from the shard files, and that no shard file holds a whole sharded parameter; without
``keep_snapshots`` every rank deletes its own files.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from fsdp_launch import ShardedMLP, fsdp1, fsdp2, run_ranks, trainer
from lightning_influence import Z0Influence, load_scores, load_z0
from lightning_influence.demos import digits_dataset
from lightning_influence.z0 import flatten_snapshot, load_snapshot
from scaffold import MergedRanks, indexed

pytestmark = pytest.mark.slow

N, BATCH = 65, 8


def _data(dtype):
    train, test, _ = digits_dataset(dtype=dtype)
    return indexed(train, N), indexed(test, 5, offset=1000)


def _callbacks(root, dtype, keep=True):
    data, queries = _data(dtype)
    return [Z0Influence(probe=data, queries=queries, record_initial=True, keep_snapshots=keep, probe_batch_size=16,
                        dirpath=str(root))]


def _model(dtype):
    torch.manual_seed(0)
    return ShardedMLP(hidden=8, lr=0.5).to(dtype)


def _sharded_run(rank, kind, root, dtype):
    data, _ = _data(dtype)
    strategy = fsdp2() if kind == "fsdp2" else fsdp1()
    cbs = _callbacks(root / "fsdp", dtype) + [Z0Influence(probe=data, name="dropped", dirpath=str(root / "dropped"))]
    trainer(strategy, root / "run", cbs).fit(_model(dtype), DataLoader(data, batch_size=BATCH))
    return rank


@pytest.mark.parametrize("kind, dtype, rtol", [("fsdp2", torch.float64, 1e-10), ("fsdp1", torch.float32, 1e-4)])
def test_sharded_recording_equals_one_process(tmp_path, kind, dtype, rtol):
    run_ranks(_sharded_run, kind, tmp_path, dtype, tmp_path=tmp_path)
    data, _ = _data(dtype)
    ref_model = _model(dtype)
    trainer("auto", tmp_path / "single", _callbacks(tmp_path / "one", dtype)).fit(
        ref_model, DataLoader(data, batch_size=2 * BATCH, sampler=MergedRanks(N, BATCH)))

    sharded, one = load_z0(tmp_path / "fsdp" / "recording"), load_z0(tmp_path / "one" / "recording")
    assert sharded.num_checkpoints == one.num_checkpoints == 3 and sharded.steps.tolist() == one.steps.tolist()
    assert sharded.manifest["snapshot_shards"] == 2 and one.manifest["snapshot_shards"] is None
    assert sharded.manifest["param_names"] == one.manifest["param_names"] == ["net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"]
    assert sharded.manifest["param_shapes"] == one.manifest["param_shapes"]
    assert sharded.probe_ids.tolist() == list(range(N)) and sharded.query_ids.tolist() == list(range(1000, 1005))
    torch.testing.assert_close(sharded.probe_losses, one.probe_losses, rtol=rtol * 10, atol=rtol)
    torch.testing.assert_close(sharded.query_losses, one.query_losses, rtol=rtol * 10, atol=rtol)
    torch.testing.assert_close(sharded.gram, one.gram, rtol=rtol, atol=0)

    snaps = [flatten_snapshot(one.snapshot(r)) for r in range(3)]  # an independent Gram: float64 dot products
    torch.testing.assert_close(one.gram, torch.stack(snaps) @ torch.stack(snaps).T, rtol=1e-12, atol=0)
    folder = tmp_path / "fsdp" / ".snapshots"
    for row in range(3):
        files = sorted(p.name for p in folder.glob(f"snapshot_{row:05d}*"))
        assert files == [f"snapshot_{row:05d}.shard-00000-of-00002.safetensors", f"snapshot_{row:05d}.shard-00001-of-00002.safetensors"]
        whole = sharded.snapshot(row)  # put back together from both ranks' files
        for name, t in one.snapshot(row).items():
            torch.testing.assert_close(whole[name], t, rtol=rtol * 10, atol=rtol)
        from safetensors import safe_open

        for f in files:  # no rank wrote a whole weight matrix
            with safe_open(str(folder / f), framework="pt") as s:
                for name in ("net.0.weight", "net.2.weight"):
                    assert s.get_tensor(name).numel() < whole[name].numel()
    direct = load_snapshot(folder, 2)  # every name, without the manifest's list
    assert sorted(direct) == sorted(sharded.manifest["param_names"])
    assert all(torch.equal(direct[n], t) for n, t in sharded.snapshot(2).items())
    assert load_scores(tmp_path / "fsdp" / "self_influence").train_ids.tolist() == list(range(N))
    assert not (tmp_path / "dropped" / ".snapshots").exists()  # keep_snapshots=False: each rank deleted its part
    assert load_z0(tmp_path / "dropped" / "recording").num_checkpoints == 2
