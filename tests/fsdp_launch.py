"""Two-process sharded training on CPU for the tests (gloo): a launcher, the strategies, a model.

**Launching.** Lightning's ``FSDPStrategy`` and ``ModelParallelStrategy`` start their processes
by re-running the script (``_SubprocessScriptLauncher``), which under pytest would re-run pytest.
Like ``torchrun`` or SLURM, :func:`run_ranks` starts the processes itself (forked: a few seconds,
not the half minute of imports a spawn costs on two cores) with the environment a cluster gives
(``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``), so Lightning sees an
externally launched job and each process runs ``trainer.fit`` as on a cluster.

**FSDP1 on CPU.** Lightning refuses ``FSDPStrategy`` with ``accelerator="cpu"`` (it checks the
strategy's exact type) and wraps with ``device_id=None``, for which torch's FSDP1 looks for an
accelerator and finds none. :class:`CPUFSDPStrategy` is ``FSDPStrategy`` that wraps the
LightningModule exactly as Lightning does, with ``device_id=cpu``; everything else (auto-wrap
policy, ``use_orig_params=True``, reductions, checkpoints) is Lightning's. FSDP2
(``ModelParallelStrategy``) runs on CPU as it is.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from typing import Any, Callable

import lightning as L
import torch
import torch.multiprocessing as mp
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import nn

from lightning_influence.demos import MLPClassifier
from scaffold import quiet_trainer


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's ``FSDPStrategy``, wrapping with ``device_id=cpu`` (see the module docstring)."""

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        if not any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            model = FullyShardedDataParallel(module=model, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
                                             sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"), **self.kwargs)
            self.kwargs.pop("auto_wrap_policy", None)  # applied above
        return super()._setup_model(model)


def fsdp1(**kw: Any) -> CPUFSDPStrategy:
    """FSDP1 with every ``nn.Linear`` in a unit of its own (the usual auto-wrap policy)."""
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    kw.setdefault("auto_wrap_policy", ModuleWrapPolicy({nn.Linear}))
    return CPUFSDPStrategy(process_group_backend="gloo", **kw)


def fsdp2(**kw: Any) -> ModelParallelStrategy:
    """FSDP2: data parallel over the two processes; the module calls ``fully_shard``."""
    return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, **kw)


class ShardedMLP(MLPClassifier):
    """The demo MLP; under ``ModelParallelStrategy`` ``configure_model`` shards each linear layer
    and the network with ``fully_shard`` (FSDP2), elsewhere the model stays as it is."""

    def configure_model(self) -> None:
        mesh = getattr(self, "_device_mesh", None)
        if mesh is None or getattr(self, "_sharded", False):
            return
        from torch.distributed.fsdp import fully_shard

        for m in self.net:
            if isinstance(m, nn.Linear):
                fully_shard(m, mesh=mesh["data_parallel"])
        fully_shard(self.net, mesh=mesh["data_parallel"])
        self._sharded = True


def trainer(strategy: Any, root: Any, callbacks: list, **kw: Any) -> L.Trainer:
    opts = dict(devices=2 if strategy != "auto" else 1, strategy=strategy, num_sanity_val_steps=0, max_epochs=2, callbacks=callbacks)
    opts.update(kw)
    return quiet_trainer(root, **opts)


def full_state(trainer: L.Trainer, model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter whole, named as in the unwrapped model (a test's check only: gathers the
    model on every rank). FSDP1's full-state-dict checkpoint crashes on CPU (a segfault in
    torch's gather for checkpoints), so its parameters are gathered with ``summon_full_params``."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    from lightning_influence.layers import unwrapped_name

    root = trainer.strategy.model
    if isinstance(root, FullyShardedDataParallel):
        with FullyShardedDataParallel.summon_full_params(root, writeback=False):
            return {unwrapped_name(n): p.detach().clone() for n, p in model.named_parameters()}
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in model.named_parameters()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, world: int, port: int, out: str, fn: Callable, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0", LOCAL_WORLD_SIZE=str(world), GROUP_RANK="0")
    code = 0
    if os.environ.get("FSDP_TEST_DUMP"):  # debugging a hang: every thread's stack after that many seconds
        import faulthandler

        faulthandler.dump_traceback_later(float(os.environ["FSDP_TEST_DUMP"]), exit=True)
    try:
        result = fn(rank, *args)
        torch.save({"result": result}, f"{out}.{rank}")
    except BaseException:  # reported to the test by the parent
        torch.save({"error": traceback.format_exc()}, f"{out}.{rank}")
        code = 1
    os._exit(code)  # no atexit handlers of the parent (pytest) in the child


def run_ranks(fn: Callable, *args: Any, tmp_path: Any, world: int = 2, timeout: float = 90) -> list[Any]:
    """Run ``fn(rank, *args)`` in ``world`` forked processes that form one job; return their
    results in rank order (``fn``'s return value must be picklable by ``torch.save``).

    Raises:
        AssertionError: a process failed (with its traceback) or did not finish in ``timeout`` s.
    """
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # pragma: no cover - CPU test machines
        import pytest

        pytest.skip("forking after CUDA initialisation is unsafe")
    out = str(tmp_path / "rank-result")
    port = _free_port()
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_child, args=(r, world, port, out, fn, args)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(deadline - time.monotonic(), 0.1))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for r in hung:
        procs[r].kill()
        procs[r].join()
    results, errors = [], []
    for r in range(world):
        path = f"{out}.{r}"
        saved = torch.load(path, weights_only=False) if os.path.exists(path) else {"error": f"no result (exit code {procs[r].exitcode})"}
        if "error" in saved:
            errors.append(f"rank {r}:\n{saved['error']}")
        results.append(saved.get("result"))
    assert not hung, f"ranks {hung} did not finish within {timeout} s (a collective that not every rank called?)\n" + "\n".join(errors)
    assert not errors, "\n".join(errors)
    return results
