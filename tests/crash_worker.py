"""A small training run for the crash-injection tests (tests/test_crash_safety.py), started as a
subprocess so that it can be killed with SIGKILL at named points.

``python tests/crash_worker.py ROOT [--resume] [--kill-at-step N]``: trains a float64 MLP for
three epochs on 64 digits with EKFACInfluence (with a probe), Z0Influence and LiSSASelfInfluence
(every epoch), saving ``ROOT/ckpt/last.ckpt`` after every epoch; artifacts go to
``ROOT/influence``. ``--resume`` continues from ``last.ckpt``; ``--kill-at-step N`` kills the
process after global step ``N``; ``LIGHTNING_INFLUENCE_FAULT`` (see
:mod:`lightning_influence.faults`) kills it at a named point of the library.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import warnings

import torch

EPOCHS = 3


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("root")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--kill-at-step", type=int, default=None)
    args = p.parse_args(argv)

    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader, Subset

    from lightning_influence import EKFACInfluence, LiSSAOptions, LiSSASelfInfluence, Z0Influence
    from lightning_influence.demos import MLPClassifier, digits_dataset
    from scaffold import indexed, quiet_trainer

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    train, _, _ = digits_dataset(dtype=torch.float64)
    data = indexed(train, 64)
    probe = Subset(data, range(0, 64, 4))

    class Kill(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if args.kill_at_step is not None and trainer.global_step == args.kill_at_step:
                os.kill(os.getpid(), signal.SIGKILL)

    callbacks = [
        EKFACInfluence(update_every_n_steps=1, probe=probe, top_k=3),
        Z0Influence(probe=probe, top_k=3),
        LiSSASelfInfluence(probe=probe, every_n_epochs=1, top_k=3,
                           options=LiSSAOptions(depth=4, scale=50.0, damping=0.1, sample_size=16)),
        ModelCheckpoint(dirpath=os.path.join(args.root, "ckpt"), save_last=True),
        Kill(),
    ]
    trainer = quiet_trainer(args.root, callbacks, max_epochs=EPOCHS, precision="64-true", enable_checkpointing=True,
                            deterministic=True, num_sanity_val_steps=0)
    torch.manual_seed(0)
    model = MLPClassifier(hidden=8, lr=0.2).double()  # float64 before fit: Lightning restores weights before converting
    ckpt = os.path.join(args.root, "ckpt", "last.ckpt") if args.resume else None
    trainer.fit(model, DataLoader(data, batch_size=16), ckpt_path=ckpt)


if __name__ == "__main__":
    sys.exit(main())
