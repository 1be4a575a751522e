"""An index built by two processes (torch.distributed, gloo, spawned) is one object equal to the
index one process builds: same examples, same scores, same top-k; each rank wrote its own shards
and rank zero the catalog."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, Subset, TensorDataset

from lightning_influence import IndexedDataset
from lightning_influence.demos import MLPClassifier
from lightning_influence.ekfac.fit import fit_factors
from lightning_influence.index import build_index, load_index

pytestmark = pytest.mark.slow

N = 37
KW = dict(compression="sjlt", dim=8, dtype="float32", shard_size=5, per_layer=True)


def _case():
    torch.manual_seed(0)
    model = MLPClassifier(d_in=5, hidden=6, n_classes=3)
    g = torch.Generator().manual_seed(0)
    train = IndexedDataset(TensorDataset(torch.randn(N, 5, generator=g), torch.randint(0, 3, (N,), generator=g)))
    query = IndexedDataset(TensorDataset(torch.randn(4, 5, generator=g), torch.randint(0, 3, (4,), generator=g)), offset=100)
    factors = fit_factors(model, DataLoader(train, batch_size=8))
    return model, factors, train, query


def _worker(rank: int, world: int, init_file: str, root: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, factors, train, _ = _case()
        part = Subset(train, range(rank, N, world))  # strided, as InfluenceCallback.probe_loader splits
        build_index(model, factors, DataLoader(part, batch_size=4), root, **KW)
    finally:
        # leave only once every rank is done: a rank that tears its gloo pairs down while the other
        # still waits on the last barrier makes that one fail with "Connection closed by peer"
        done = dist.FileStore(init_file + ".done", world)
        done.add("done", 1)
        while done.add("done", 0) < world:
            time.sleep(0.01)
        dist.destroy_process_group()


def test_two_process_build_equals_one_process_build(tmp_path):
    root = str(tmp_path / "two")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), root), nprocs=2, join=True)
    model, factors, train, query = _case()
    one = build_index(model, factors, DataLoader(train, batch_size=4), tmp_path / "one", **KW)
    two = load_index(root, model=model)
    assert two.n_examples == one.n_examples == N
    assert sorted({e["rank"] for e in two.shards}) == [0, 1]
    assert sorted(p.name for p in (tmp_path / "two" / "shards").iterdir() if p.name.startswith("r00001")) == [
        "r00001-s000000", "r00001-s000001", "r00001-s000002", "r00001-s000003"]  # 18 examples, shards of 5
    qloader = DataLoader(query, batch_size=4)
    a, b = one.scores(qloader, per_layer=True), two.scores(qloader, per_layer=True)
    order = torch.argsort(b.train_ids)
    assert b.train_ids[order].tolist() == a.train_ids.tolist() == list(range(N))
    torch.testing.assert_close(b.pairwise[:, order], a.pairwise, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.self_influence[order], a.self_influence, rtol=1e-5, atol=1e-6)
    for n in a.per_layer:
        torch.testing.assert_close(b.per_layer[n][:, order], a.per_layer[n], rtol=1e-5, atol=1e-5)
    ta, tb = one.search(qloader, k=6, opponents=True), two.search(qloader, k=6, opponents=True)
    assert ta.ids.tolist() == tb.ids.tolist() and ta.opponent_ids.tolist() == tb.opponent_ids.tolist()
    torch.testing.assert_close(ta.scores, tb.scores, rtol=1e-5, atol=1e-5)
    si = two.self_influence(per_layer=True)
    torch.testing.assert_close(si.self_influence[torch.argsort(si.train_ids)], a.self_influence, rtol=1e-5, atol=1e-6)
