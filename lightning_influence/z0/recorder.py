"""The state of a Z0 recording between recording points, with no Lightning import.

:class:`Z0Recorder` is what :class:`~lightning_influence.Z0Influence` keeps while a model trains;
any training loop can drive it:

1. with ``losses_from="training_step"``: :meth:`~Z0Recorder.clear_training_losses` at the start of
   each epoch, :meth:`~Z0Recorder.observe_training_losses` after each training batch, and
   :meth:`~Z0Recorder.pop_training_losses` at the recording point (the losses to record);
2. at each recording point, :meth:`~Z0Recorder.add` with the per-example losses (ids sorted and
   unique, e.g. gathered across processes) and the selected parameters: the loss rows are aligned
   with the first row's ids, the parameters are snapshotted into the
   :class:`~lightning_influence.z0.gram.SnapshotGram` (or, on a process that writes no snapshot,
   the writer's Gram matrix is adopted; or, with sharded parameters, every process writes its
   part and adds the Gram row summed over processes) and the row is kept;
3. :meth:`~Z0Recorder.result` gives the :class:`~lightning_influence.z0.artifact.Z0Result`
   recorded so far (snapshot files are written lazily: :meth:`~Z0Recorder.flush` before reading
   them back); :meth:`~Z0Recorder.state_dict` / :meth:`~Z0Recorder.load_state_dict`
   carry everything (tables, Gram matrix, the training-step buffer) across a checkpoint.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Optional

import torch
from torch import Tensor

from .. import validation as check
from .artifact import Z0Result
from .gram import Shard, SnapshotGram
from .shards import local_parts

__all__ = ["Z0Recorder", "LOSS_SOURCES", "LossSource", "LOSS_TIMINGS", "LossTiming"]

LossSource = Literal["probe", "training_step"]
LOSS_SOURCES = ("probe", "training_step")
LossTiming = Literal["snapshot", "training_step"]
LOSS_TIMINGS = ("snapshot", "training_step")
STATE_VERSION = 2


def _stack(rows: list[Tensor]) -> Tensor:
    return torch.stack(rows) if rows else torch.zeros(0, 0)


def _cat(parts: list[Tensor], dtype: torch.dtype) -> Tensor:
    return torch.cat([p.to(parts[0].device) for p in parts]) if parts else torch.zeros(0, dtype=dtype)


class Z0Recorder:
    """Loss tables, ids, steps and the snapshot Gram matrix of one Z0 recording.

    Args:
        snapshot_dir: where the :class:`~lightning_influence.z0.gram.SnapshotGram` writes
            snapshot files (a resumed recording must see the same folder).
        losses_from: ``"probe"``: every row holds the same probe ids (a changed set raises);
            ``"training_step"``: rows are aligned by id with the first row (ids not in it are
            dropped with a warning; ids missing from a later row get ``nan``).
        options: JSON-serialisable options saved in the result's manifest.
        warn: how warnings are reported (``warnings.warn`` by default; a trainer passes its
            rank-zero warning).
        shard: ``(rank, count)`` when the parameters are sharded over ``count`` processes and
            this one records part ``rank`` (see :mod:`lightning_influence.z0.gram`).

    Attributes:
        gram: the :class:`~lightning_influence.z0.gram.SnapshotGram`.
        probe_ids / query_ids: ``int64 Tensor[n]`` fixed by the first row (``None`` before it;
            ``query_ids`` stays ``None`` without queries).
        steps / epochs: global step and completed epochs of each row.
        losses_at: per row, where its probe losses were measured (``"snapshot"`` or
            ``"training_step"``; see :meth:`add`).
    """

    def __init__(
        self,
        snapshot_dir: str | os.PathLike,
        losses_from: LossSource = "probe",
        options: Optional[Mapping[str, Any]] = None,
        warn: Callable[[str], Any] = warnings.warn,
        shard: Optional[Shard] = None,
    ) -> None:
        self.losses_from = check.choice("Z0Recorder", "losses_from", losses_from, LOSS_SOURCES)
        self.gram = SnapshotGram(snapshot_dir, shard=shard, lazy_files=True)  # files written when a checkpoint or the caller needs them
        self.options = dict(options or {})
        self.warn = warn
        self.probe_ids: Optional[Tensor] = None
        self.query_ids: Optional[Tensor] = None
        self.steps: list[int] = []
        self.epochs: list[int] = []
        self.losses_at: list[str] = []
        self._probe_rows: list[Tensor] = []
        self._query_rows: list[Tensor] = []
        self._buffer_ids: list[Tensor] = []
        self._buffer_losses: list[Tensor] = []

    @property
    def rows(self) -> int:
        """Number of recorded rows (checkpoints)."""
        return len(self.steps)

    @property
    def last_step(self) -> int:
        """Global step of the last row (``-1`` before the first)."""
        return self.steps[-1] if self.steps else -1

    # -- losses from the training step ----------------------------------------------------------
    def observe_training_losses(self, ids: Tensor, losses: Tensor) -> None:
        """Buffer one training batch's per-example losses.

        Args:
            ids: ``LongTensor[B]`` example ids; losses: ``Tensor[B]`` (summed over tokens).

        Raises:
            ValueError: the shapes do not match.
        """
        if losses.dim() != 1 or ids.dim() != 1 or losses.shape[0] != ids.shape[0]:
            raise ValueError(
                f"Z0: per_example_loss has shape {tuple(losses.shape)} but the batch has ids of shape {tuple(ids.shape)}"
            )
        # kept on their device until the recording point, so that no training step waits for a copy
        self._buffer_ids.append(ids.detach().to(torch.long))
        self._buffer_losses.append(losses.detach().to(torch.float32))

    def clear_training_losses(self) -> None:
        """Forget the buffered training losses (at the start of an epoch: a row holds one epoch)."""
        self._buffer_ids, self._buffer_losses = [], []

    def pop_training_losses(self) -> tuple[Tensor, Tensor]:
        """The buffered ``(ids int64 [m], losses float32 [m])`` (CPU, in arrival order), emptying the buffer."""
        out = _cat(self._buffer_ids, torch.long).cpu(), _cat(self._buffer_losses, torch.float32).cpu()
        self.clear_training_losses()
        return out

    # -- rows -----------------------------------------------------------------------------------
    def add(
        self,
        step: int,
        epoch: int,
        params: Mapping[str, Tensor],
        probe_ids: Tensor,
        probe_losses: Tensor,
        query_ids: Optional[Tensor] = None,
        query_losses: Optional[Tensor] = None,
        gram: Optional[Tensor] = None,
        gram_row: Optional[Tensor] = None,
        shapes: Optional[Mapping[str, Any]] = None,
        losses_at: Optional[LossTiming] = None,
    ) -> None:
        """Record one row: losses at the current weights and a snapshot of ``params``.

        Args:
            step: the global step of this row.
            epoch: the number of completed epochs of this row.
            params: name → tensor, the selected parameters (any device; read, not modified).
            probe_ids: ``LongTensor[n]``, sorted and unique.
            probe_losses: ``Tensor[n]``, their losses.
            query_ids: the same for the query set (every row or none).
            query_losses: their measurements.
            gram: ``None``: snapshot ``params`` (extends the Gram matrix and writes a snapshot
                file). Given: the ``float64 Tensor[E+1, E+1]`` Gram matrix after this snapshot,
                computed by the process that writes the snapshots (under DDP, rank zero's); only
                the names and shapes of ``params`` are checked.
            gram_row: sharded parameters: the new Gram row ``float64 Tensor[E+1]``, the sum over
                processes of their :meth:`SnapshotGram.partial_row
                <lightning_influence.z0.gram.SnapshotGram.partial_row>`; ``params`` are this
                process's parts, written to its own snapshot file.
            shapes: name → full shape when ``params`` are parts.
            losses_at: where ``probe_losses`` were measured: ``"snapshot"`` (at these weights, in
                eval mode) or ``"training_step"`` (each at the weights of the step that trained on
                it); default: ``"snapshot"`` with ``losses_from="probe"``, else ``"training_step"``.

        Nothing is kept when this raises.

        Raises:
            ValueError: a probe (``losses_from="probe"``) or query id set is empty or differs
                from the first row's, queries come and go between rows, shapes do not match, or
                ``params`` differ from the first snapshot's.
            FileNotFoundError: an earlier snapshot file is missing.
        """
        default = "snapshot" if self.losses_from == "probe" else "training_step"
        timing = check.choice("Z0Recorder.add", "losses_at", losses_at or default, LOSS_TIMINGS)
        probe = self._aligned("probe", self.probe_ids, probe_ids, probe_losses, step)
        if (query_ids is None) != (self.query_ids is None) and self.rows > 0:
            raise ValueError(f"Z0: queries must be given for every row or for none (row {self.rows}, step {step})")
        query = None if query_ids is None else self._aligned("query", self.query_ids, query_ids, query_losses, step)
        if gram_row is not None:
            self.gram.extend(gram_row, params, shapes)
        elif gram is None:
            self.gram.append(params)
        else:
            self.gram.check(params)
            if tuple(gram.shape) != (self.gram.rows + 1,) * 2:
                raise ValueError(f"Z0: the given Gram matrix has shape {tuple(gram.shape)}, expected {(self.gram.rows + 1,) * 2}")
            self.gram.set_gram(gram)
        self.probe_ids = probe[0]
        self._probe_rows.append(probe[1])
        if query is not None:
            self.query_ids = query[0]
            self._query_rows.append(query[1])
        self.steps.append(int(step))
        self.epochs.append(int(epoch))
        self.losses_at.append(timing)

    def _aligned(self, what: str, known: Optional[Tensor], ids: Tensor, losses: Optional[Tensor], step: int) -> tuple[Tensor, Tensor]:
        """``(ids of the table, float32 row in their order)`` for a new row of ``what``."""
        ids = ids.detach().to("cpu", torch.long).reshape(-1)
        if ids.numel() == 0:
            raise ValueError(f"Z0: the {what} set holds no example at step {step}")
        if losses is None or tuple(losses.shape) != tuple(ids.shape):
            shape = None if losses is None else tuple(losses.shape)
            raise ValueError(f"Z0: {what} losses have shape {shape}, expected ({ids.numel()},) to match the ids")
        row = losses.detach().to("cpu", torch.float32)
        bad = ~torch.isfinite(row)
        if bool(bad.any()):
            self.warn(
                f"Z0: {int(bad.sum())} {what} losses are not finite (NaN or inf) at step {step} (row {self.rows}), e.g. ids "
                f"{ids[bad][:5].tolist()}; their scores will be NaN and they are left out of rankings"
            )
        if known is None:
            known = ids
        elif not torch.equal(known, ids):
            if not (what == "probe" and self.losses_from == "training_step"):
                raise ValueError(
                    f"Z0: the {what} set changed between recordings ({known.numel()} ids before, {ids.numel()} at "
                    f"step {step}); it must stay fixed"
                )
            pos = torch.searchsorted(known, ids).clamp_max(known.numel() - 1)
            ok = known[pos] == ids
            aligned = torch.full((known.numel(),), float("nan"))
            aligned[pos[ok]] = row[ok]
            if not bool(ok.all()):
                self.warn(f"Z0: {int((~ok).sum())} training ids unseen in the first recorded epoch were ignored at step {step}")
            absent = ~torch.isin(known, ids)
            if bool(absent.any()):
                self.warn(f"Z0: {int(absent.sum())} training ids of the first recorded epoch have no loss at step {step} "
                          f"(e.g. ids {known[absent][:5].tolist()}); their losses in this row are NaN")
            row = aligned
        return known, row

    # -- results --------------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        """Parameter names and shapes, snapshot folder, loss source and the given options."""
        shapes = [list(s) for s in self.gram.shapes]
        return {
            "param_names": list(self.gram.names),
            "param_shapes": shapes,
            "num_params": int(sum(torch.Size(s).numel() for s in shapes)),
            "losses_from": self.losses_from,
            "probe_losses_at": list(self.losses_at),
            "snapshot_dir": str(self.gram.directory),
            "snapshot_shards": None if self.gram.shard is None else self.gram.shard[1],
            "query_values": "measurement",
            **self.options,
        }

    def add_across_ranks(self, ranks: Any, row: Mapping[str, Any], params: Mapping[str, Tensor], module: torch.nn.Module) -> None:
        """:meth:`add` ``row`` (the keyword arguments of :meth:`add` but the parameters) on every
        rank (a collective). Replicated parameters: rank zero writes the snapshot and extends the
        Gram matrix, the others adopt it (broadcast). Sharded ones: every rank writes its part of
        the snapshot and computes its part of the Gram row, summed over ranks.

        Args:
            ranks: a :class:`~lightning_influence.distributed.Ranks` (``rank``, ``world``,
                ``is_zero``, ``device``, ``all``, ``zero``, ``broadcast``, ``reduce_sum``).
            params: the selected parameters, named as in the unwrapped model.
            module: the model that holds them (for each rank's own pieces when sharded).
        """
        with torch.no_grad():
            if self.gram.shard is not None:
                parts, shapes = local_parts(params, module, ranks.rank)
                if self.rows == 0:  # rank zero makes the folder, so that one rank knows it did
                    ranks.zero(self.gram.ensure_directory)
                partial = ranks.all(lambda: self.gram.partial_row(parts, shapes))
                total = ranks.reduce_sum(partial.to(ranks.device))
                ranks.all(lambda: self.add(**row, params=parts, shapes=shapes, gram_row=total))
            else:
                ranks.zero(lambda: self.add(**row, params=params))  # writes the snapshot file
                if ranks.world > 1:
                    gram = ranks.broadcast(self.gram.gram)
                    ranks.all(lambda: None if ranks.is_zero else self.add(**row, params=params, gram=gram))

    def result(self, directory: Optional[str | os.PathLike] = None) -> Z0Result:
        """What has been recorded so far (tensors copied to the CPU; ``directory`` is where it is
        or will be written).

        Raises:
            RuntimeError: nothing is recorded yet.
        """
        if not self.rows:
            raise RuntimeError("Z0: nothing is recorded yet")
        return Z0Result(
            gram=self.gram.gram.clone(),
            probe_ids=self.probe_ids,
            probe_losses=_stack(self._probe_rows),
            steps=torch.tensor(self.steps, dtype=torch.long),
            epochs=torch.tensor(self.epochs, dtype=torch.long),
            query_ids=self.query_ids,
            query_losses=_stack(self._query_rows) if self._query_rows else None,
            manifest=self.manifest(),
            directory=None if directory is None else Path(directory),
        )

    def flush(self) -> None:
        """Write the snapshot files still held only in memory (the snapshots are written lazily:
        when :meth:`state_dict` is taken, when they no longer fit in memory, or now; see
        :mod:`lightning_influence.z0.gram`). Call it before reading snapshots back."""
        self.gram.flush()

    def cleanup(self) -> None:
        """Delete the snapshot files."""
        self.gram.cleanup()

    def finish_files(self, ranks: Any, keep: bool) -> None:
        """At the end of training, on every rank: write the snapshots held in memory (``keep``),
        else delete the files this recording wrote (sharded: every rank its own part, then rank
        zero the folder; replicated: rank zero)."""
        if keep:
            ranks.all(self.gram.flush)
        elif self.gram.shard is not None:
            ranks.all(lambda: self.gram.cleanup(remove_folder=False))
            ranks.zero(self.gram.remove_folder)
        else:
            ranks.zero(self.cleanup)

    # -- checkpointing --------------------------------------------------------------------------
    def state_dict(self, ranks: Any = None) -> dict[str, Any]:
        """Everything recorded, as tensors and plain values. With ``ranks`` (every rank calls;
        for a checkpoint that keeps one rank's state) the buffered training losses of every rank
        are gathered by id (``buffer_gathered``): load it with ``primary=True`` on one rank only."""
        state = {
            "version": STATE_VERSION,
            "losses_from": self.losses_from,
            "gram": self.gram.state_dict(),
            "probe_ids": self.probe_ids,
            "probe_losses": _stack(self._probe_rows),
            "query_ids": self.query_ids,
            "query_losses": _stack(self._query_rows),
            "steps": list(self.steps),
            "epochs": list(self.epochs),
            "buffer_ids": _cat(self._buffer_ids, torch.long).cpu(),
            "buffer_losses": _cat(self._buffer_losses, torch.float32).cpu(),
            "losses_at": list(self.losses_at),
        }
        if ranks is not None:
            ids, losses = ranks.gather_by_id(state["buffer_ids"].to(ranks.device), state["buffer_losses"].to(ranks.device))
            state.update(buffer_ids=ids.cpu(), buffer_losses=losses.cpu(), buffer_gathered=True)
        return state

    def load_state_dict(self, state: Mapping[str, Any], snapshot_dir: Optional[str | os.PathLike] = None,
                        check_files: bool = True, primary: bool = True) -> None:
        """Continue from :meth:`state_dict`, reading the snapshot files from the folder the state
        records (or from ``snapshot_dir`` when they were moved); ``check_files``: check now that
        they are all there (on the process that writes snapshots). Gathered training losses
        (``buffer_gathered``) go to the ``primary`` rank only.

        Raises:
            ValueError: a state of another version or loss source.
            FileNotFoundError: a recorded snapshot file is missing (checked now, not at the next row).
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"Z0 state version {state.get('version')!r} is not {STATE_VERSION} (checkpoints of lightning-influence "
                "before 0.2 cannot continue a Z0 recording)"
            )
        if state.get("buffer_gathered") and not primary:
            state = {**state, "buffer_ids": state["buffer_ids"][:0], "buffer_losses": state["buffer_losses"][:0]}
        if state["losses_from"] != self.losses_from:
            raise ValueError(f"Z0 state was recorded with losses_from={state['losses_from']!r}, not {self.losses_from!r}")
        self.gram.load_state_dict(state["gram"], directory=snapshot_dir)
        missing = self.gram.missing() if check_files else []
        if missing:
            raise FileNotFoundError(
                f"Z0: {len(missing)} of the {self.gram.rows} snapshot files this recording needs are missing (e.g. "
                f"{missing[0]}): the Gram matrix needs every earlier snapshot. Resume where the snapshot_dir "
                f"{self.gram.directory} is readable (or pass snapshot_dir= where they were moved); a run that finished "
                "deletes its snapshots unless recorded with Z0Influence(keep_snapshots=True)."
            )
        self.probe_ids, self.query_ids = state["probe_ids"], state["query_ids"]
        self._probe_rows = list(state["probe_losses"]) if state["probe_losses"].numel() else []
        self._query_rows = list(state["query_losses"]) if state["query_losses"].numel() else []
        self.steps, self.epochs = [int(s) for s in state["steps"]], [int(e) for e in state["epochs"]]
        default = "snapshot" if self.losses_from == "probe" else "training_step"
        self.losses_at = [str(a) for a in state.get("losses_at", [default] * len(self.steps))]
        self._buffer_ids = [state["buffer_ids"]] if state["buffer_ids"].numel() else []
        self._buffer_losses = [state["buffer_losses"]] if state["buffer_losses"].numel() else []
