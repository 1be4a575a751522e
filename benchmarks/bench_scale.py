"""Influence at the size people train: GPT-2 small (124M, real vocabulary 50257) and Pythia-410M
configs (random init, no download), plain training vs each callback at its defaults, side by side.

Each (model, mode) runs in its own subprocess, so that peak resident memory is that run's alone.
Per run it reports:

* ``cpu_s/step``: process CPU seconds per training step (``time.process_time`` between the first
  and the last training batch's start, over the steps after a warm-up step; CPU time, not
  wall time, because other jobs load this machine);
* ``wall_s/step``: the same in wall-clock seconds;
* ``end_s``: wall seconds from the last training batch's end to the end of ``fit`` (the
  callbacks' end-of-fit work), also in plain-step units;
* ``peak_rss``: the process's resident high-water mark (``VmHWM``) at the end; beside it the
  largest resident size sampled every 0.2 s during training and during the end of fit;
* ``disk``: bytes the run wrote under its influence folder.

    python benchmarks/bench_scale.py                          # GPT-2 small: plain, ekfac, z0 (add --modes lissa)
    python benchmarks/bench_scale.py --model pythia-410m --modes plain ekfac
    python benchmarks/bench_scale.py --device cuda            # bf16 autocast on a CUDA machine
    python benchmarks/bench_scale.py --model pythia-410m --modes plain ekfac --fsdp2   # FSDP2, 2 CPU processes
    make bench-scale

Targets (issue 20, GPT-2 small, 30 steps of 4 × 128 tokens): ``EKFACInfluence()`` finishes;
≤ 1.10× CPU per training step; end of fit ≤ 60 plain steps; peak RSS ≤ 1.5× plain; factors
≤ 2× the fp32 weights on disk; ``LiSSASelfInfluence`` at its defaults on a 16-sequence probe
finishes; ``Z0Influence`` ≤ 1.5×.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import make_trainer, md_table

MODELS = {
    # name: (transformers architecture, config kwargs)
    "gpt2-small": ("gpt2", dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)),
    "pythia-410m": ("gpt_neox", dict(num_hidden_layers=24, hidden_size=1024, num_attention_heads=16, intermediate_size=4096,
                                      vocab_size=50304, max_position_embeddings=2048)),
    # a 2-layer GPT-2 with the real vocabulary: the code paths of gpt2-small at a tenth of the cost
    "gpt2-2l": ("gpt2", dict(n_layer=2, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)),
    # a smoke-test size (seconds)
    "gpt2-tiny": ("gpt2", dict(n_layer=2, n_embd=64, n_head=2, vocab_size=50257, n_positions=256)),
}
MODES = ("plain", "ekfac", "z0", "lissa")


def build_model(name: str):
    import torch
    import transformers

    arch, kw = MODELS[name]
    torch.manual_seed(0)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(**kw, use_cache=False)
        return transformers.GPT2LMHeadModel(cfg)
    cfg = transformers.GPTNeoXConfig(**kw, use_cache=False)
    return transformers.GPTNeoXForCausalLM(cfg)


def corpus(n: int, seq: int, vocab: int, seed: int = 0):
    """``n`` generated sequences of ``seq`` tokens: a Zipf-like unigram draw with a repeated motif,
    so the loss falls during training (a stand-in for text; no download)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, vocab + 1, dtype=torch.float64)
    probs = (1.0 / ranks) / (1.0 / ranks).sum()
    ids = torch.multinomial(probs, n * seq, replacement=True, generator=g).reshape(n, seq)
    motif = torch.randint(0, 1000, (16,), generator=g)
    ids[:, : motif.numel()] = motif  # every sequence starts alike
    return [{"input_ids": ids[i]} for i in range(n)]


def _sharded_lm():
    from lightning_influence.demos import CausalLMModule

    class ShardedLM(CausalLMModule):
        """FSDP2: ``configure_model`` shards every transformer block and then the whole model over
        the data-parallel mesh (``ModelParallelStrategy``)."""

        def configure_model(self) -> None:
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            blocks = getattr(getattr(self.model, "transformer", None), "h", None) or self.model.gpt_neox.layers
            for block in blocks:
                fully_shard(block, mesh=mesh)
            fully_shard(self.model, mesh=mesh)

    return ShardedLM


def run_one(args) -> dict:
    global ShardedLM
    ShardedLM = _sharded_lm()
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from lightning_influence import EKFACInfluence, IndexedDataset, LiSSASelfInfluence, Z0Influence
    from lightning_influence.data import lm_collate
    from lightning_influence.demos import CausalLMModule

    torch.set_num_threads(args.threads)
    model = (ShardedLM if args.fsdp2 else CausalLMModule)(build_model(args.model), lr=1e-4)
    vocab = MODELS[args.model][1]["vocab_size"]
    n_train = args.steps * args.batch
    train = IndexedDataset(corpus(n_train, args.seq, vocab))
    loader = DataLoader(train, batch_size=args.batch, shuffle=True, collate_fn=lm_collate,
                        generator=torch.Generator().manual_seed(0))
    out_dir = Path(tempfile.mkdtemp(prefix=f"bench_scale_{args.mode}_"))
    callbacks = []
    probe = IndexedDataset(corpus(args.probe, args.seq, vocab, seed=1))
    if args.mode == "ekfac":
        callbacks.append(EKFACInfluence(dirpath=str(out_dir / "ekfac")))
    elif args.mode == "z0":
        callbacks.append(Z0Influence(probe=probe, dirpath=str(out_dir / "z0")))
    elif args.mode == "lissa":
        callbacks.append(LiSSASelfInfluence(probe=probe, dirpath=str(out_dir / "lissa")))

    class Clock(L.Callback):
        def __init__(self) -> None:
            self.starts: list[tuple[float, float]] = []
            self.last_end = None

        def on_train_batch_start(self, *a) -> None:
            self.starts.append((time.process_time(), time.perf_counter()))

        def on_train_batch_end(self, *a) -> None:
            self.last_end = time.perf_counter()

    clock = Clock()
    import threading

    samples: list[tuple[float, int]] = []  # (seconds, VmRSS bytes) every 0.2 s: which phase holds the peak
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.2):
            with open("/proc/self/status") as f:
                rss = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))
            samples.append((time.perf_counter(), rss))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    precision = "bf16-mixed" if args.device == "cuda" else "32-true"
    strategy = "auto"
    if args.fsdp2:
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    trainer = make_trainer(1, [clock, *callbacks], str(out_dir), accelerator="gpu" if args.device == "cuda" else "cpu",
                           devices=2 if args.fsdp2 else 1, strategy=strategy, precision=precision)
    t0 = time.perf_counter()
    trainer.fit(model, loader)
    fit_end = time.perf_counter()
    stop.set()
    sampler.join()
    boundary = clock.last_end or fit_end
    rss_training = max((r for t, r in samples if t <= boundary), default=0)
    rss_end = max((r for t, r in samples if t > boundary), default=0)
    (c1, w1), (cn, wn) = clock.starts[1], clock.starts[-1]
    steps = len(clock.starts) - 2
    disk = sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file())
    factors = sum(p.stat().st_size for p in (out_dir / "ekfac" / "factors").rglob("*") if p.is_file()) \
        if (out_dir / "ekfac" / "factors").exists() else 0
    with open("/proc/self/status") as f:
        hwm = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
    params = sum(p.numel() for p in model.parameters())
    result = {
        "model": args.model + (" (FSDP2, 2 processes)" if args.fsdp2 else ""), "mode": args.mode, "rank": trainer.global_rank, "device": args.device, "steps": len(clock.starts),
        "cpu_s_per_step": (cn - c1) / max(steps, 1), "wall_s_per_step": (wn - w1) / max(steps, 1),
        "end_s": fit_end - (clock.last_end or fit_end), "fit_s": fit_end - t0, "peak_rss": hwm, "disk": disk,
        "sampled_rss_training": rss_training, "sampled_rss_end_of_fit": rss_end,
        "factor_bytes": factors, "fp32_weight_bytes": 4 * params, "params": params,
    }
    if args.mode == "ekfac":
        cb = callbacks[0]
        result["ekfac_layers"] = len(cb.state.layers)
        result["ekfac_examples"] = cb.factors.n_examples if cb.factors is not None else None
        result["ekfac_seconds"] = dict(cb.state.seconds)
    if args.mode == "lissa" and callbacks[0].scores is not None:
        metrics = callbacks[0].scores.meta["metrics"]
        result["lissa"] = {k: metrics.get(k) for k in ("sample_size", "sample_limited", "depth", "budget_limited", "scale",
                                                        "damping", "auto_products", "seconds", "steps", "chunk_size")}
    import shutil

    shutil.rmtree(out_dir, ignore_errors=True)
    return result


def table(rows: list[dict]) -> str:
    by_model: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_model.setdefault(r["model"], {})[r["mode"]] = r
    lines = []
    for model, modes in by_model.items():
        plain = modes.get("plain")
        for mode, r in modes.items():
            if "error" in r:
                lines.append([model, mode, f"failed: {r['error'][:120]}", *[""] * 7])
                continue
            ratio = lambda k: f"{r[k] / plain[k]:.2f}×" if plain and "error" not in plain and plain[k] else ""
            steps = f"{r['end_s'] / plain['wall_s_per_step']:.1f}" if plain and "error" not in plain else ""
            fw = f"{r['factor_bytes'] / r['fp32_weight_bytes']:.2f}×" if r.get("factor_bytes") else ""
            lines.append([model, mode, f"{r['cpu_s_per_step']:.2f}", ratio("cpu_s_per_step"), f"{r['end_s']:.1f}", steps,
                          f"{r['peak_rss'] / 2**30:.2f}", ratio("peak_rss"), f"{r['disk'] / 1e6:.0f}", fw])
    return md_table(["model", "mode", "CPU s/step", "× plain", "end of fit s", "(plain steps)", "peak RSS GiB", "× plain", "on disk MB",
                     "factors / fp32 weights"], lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2-small", choices=sorted(MODELS))
    # LiSSA is not in the default run: at its defaults one curvature product over a 32-sequence
    # GPT-2 small mini-batch costs ~850 CPU-s on 2 cores (docs/lissa.md); ask for it with --modes lissa
    p.add_argument("--modes", nargs="+", default=["plain", "ekfac", "z0"], choices=MODES)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--probe", type=int, default=16)
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2)))
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--fsdp2", action="store_true", help="FSDP2 (fully_shard) over 2 processes, data parallel")
    p.add_argument("--out", default="benchmarks/out/bench_scale.json")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one mode in this process
    args = p.parse_args()
    if args.one:
        args.mode = args.one
        result = run_one(args)
        if result.get("rank", 0) == 0:
            print(json.dumps(result))
        return
    rows = []
    for mode in args.modes:
        cmd = [sys.executable, __file__, "--one", mode, "--model", args.model, "--steps", str(args.steps), "--batch",
               str(args.batch), "--seq", str(args.seq), "--probe", str(args.probe), "--threads", str(args.threads),
               "--device", args.device] + (["--fsdp2"] if args.fsdp2 else [])
        print(f"== {args.model} {mode}", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        try:
            row = json.loads(proc.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            row = {"model": args.model, "mode": mode, "error": " / ".join(tail)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else []
    Path(args.out).write_text(json.dumps(old + rows, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
