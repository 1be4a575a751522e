"""EK-FAC's end-of-fit eigendecompositions under data parallelism: every rank decomposing every
layer (before) against each layer decomposed by one rank and broadcast (now), side by side in
one run, over the same covariance sums.

Two CPU processes (gloo, one thread each, as two ranks of a DDP run on one machine would get),
``--blocks`` GPT-2-small blocks' factor shapes (per block: ``attn.c_attn`` 769 → 2304,
``attn.c_proj`` 769 → 768, ``mlp.c_fc`` 769 → 3072, ``mlp.c_proj`` 3073 → 768), sums of random
positive semi-definite matrices (the same on both ranks, as after the epoch's all-reduce). Each
mode runs ``--repeats`` times; the wall time of a mode is the slowest rank's, median over
repeats. Also checked: the shared decompositions equal the ones every rank computed alone.

Run: ``.venv/bin/python benchmarks/bench_shared_eigh.py`` (``--blocks 12`` for all of GPT-2
small; results in ``docs/benchmarks.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, md_table, utc_now  # noqa: E402

SHAPES = {"attn.c_attn": (769, 2304), "attn.c_proj": (769, 768), "mlp.c_fc": (769, 3072), "mlp.c_proj": (3073, 768)}


class _Ranks:
    """What :func:`eigen_from_covariances` reads of :class:`lightning_influence.distributed.Ranks`,
    over a plain process group."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world, self.device = rank, world, torch.device("cpu")

    def all(self, fn):
        return fn()

    def broadcast_tensor(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        dist.broadcast(tensor, src=src)
        return tensor


def _sums(blocks: int):
    from lightning_influence.ekfac.covariance import CovarianceAccumulator

    g = torch.Generator().manual_seed(0)
    covs = {}
    for b in range(blocks):
        for name, (a, o) in SHAPES.items():
            acc = CovarianceAccumulator(a, o)
            for side, d in (("a_sum", a), ("s_sum", o)):
                x = torch.randn(d, 256, generator=g) * torch.rand(d, 1, generator=g)
                setattr(acc, side, x @ x.T + 1e-3 * torch.eye(d))
            acc.a_tokens = acc.s_tokens = 1024
            acc.examples = 8
            covs[f"h.{b}.{name}"] = acc
    return covs


def _worker(rank: int, world: int, port: int, blocks: int, repeats: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from lightning_influence.ekfac.fit import eigen_from_covariances

    covs = _sums(blocks)
    times = {"every rank, every layer": [], "shared by layer": []}
    results = {}
    for _ in range(repeats):
        for mode, ranks in (("every rank, every layer", None), ("shared by layer", _Ranks(rank, world))):
            dist.barrier()
            t0 = time.perf_counter()
            results[mode] = eigen_from_covariances(covs, torch.float32, ranks=ranks)
            elapsed = torch.tensor([time.perf_counter() - t0])
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # a mode ends when its slowest rank does
            times[mode].append(float(elapsed))
    alone, shared = results["every rank, every layer"], results["shared by layer"]
    same = all(torch.equal(alone[n].eig_a, shared[n].eig_a) and torch.equal(alone[n].q_s, shared[n].q_s) for n in alone)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"times": times, "bitwise_equal": same, "layers": len(covs)}, f)
    dist.destroy_process_group()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--world", type=int, default=2)
    args = p.parse_args(argv)
    out = tempfile.mktemp(suffix=".json")
    mp.spawn(_worker, args=(args.world, 29517, args.blocks, args.repeats, out), nprocs=args.world, join=True)
    with open(out) as f:
        r = json.load(f)
    before, now = (statistics.median(r["times"][m]) for m in ("every rank, every layer", "shared by layer"))
    print(f"{utc_now()}, {machine()}; {r['layers']} layers of GPT-2-small shapes ({args.blocks} blocks), {args.world} "
          f"processes × 1 thread, median of {args.repeats}")
    print(md_table(["end-of-fit eigendecompositions", "wall s (slowest rank)", "× before"],
                   [["every rank, every layer (before)", f"{before:.1f}", "1.00×"],
                    ["each layer by one rank, broadcast (now)", f"{now:.1f}", f"{now / before:.2f}×"]]))
    print(f"shared results bitwise equal to every rank's own: {r['bitwise_equal']}")
    return 0 if r["bitwise_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
