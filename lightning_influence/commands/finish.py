"""``lightning-influence finish-factors CHECKPOINT``: write the EK-FAC factors a run accumulated,
from its Lightning checkpoint, without training (after a crash or a full disk during the
end-of-fit work; see :func:`lightning_influence.ekfac.finish.finish_factors`).

``--correction none`` (K-FAC eigenvalues) or ``online`` need only the checkpoint. The run's own
``pass`` correction needs the model and the training loader: ``--model pkg.module:factory`` and
``--data pkg.module:factory`` name functions that take no argument and return them.
"""

from __future__ import annotations

import argparse

from . import fail
from ._objects import load_callable

NAME = "finish-factors"
HELP = "write EK-FAC factors from a training checkpoint (after an interrupted end of fit)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="the Lightning checkpoint (e.g. last.ckpt)")
    p.add_argument("--name", default=None, help="which EKFACInfluence callback, when the checkpoint holds several")
    p.add_argument("--out", default=None, help="the factors folder (default: <the callback's recorded folder>/factors)")
    p.add_argument("--correction", choices=("pass", "online", "none"), default=None,
                   help="eigenvalue correction (default: the run's own; 'pass' needs --model and --data)")
    p.add_argument("--model", default=None, help="module:function returning the model, for --correction pass")
    p.add_argument("--data", default=None, help="module:function returning the training DataLoader, for --correction pass")
    p.add_argument("--device", default="cpu", help="where the correction pass runs (default cpu)")
    p.add_argument("--unsafe-load", action="store_true",
                   help="load the checkpoint with torch.load(weights_only=False): only for files you trust")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import pickle

    from ..ekfac.finish import CheckpointStateError, finish_factors
    from ..validation import InvalidArgumentError

    if not Path(args.checkpoint).is_file():
        return fail(f"no checkpoint file at {args.checkpoint}")
    try:
        model = load_callable(args.model, "model")() if args.model else None
        loader = load_callable(args.data, "data")() if args.data else None
        path = finish_factors(args.checkpoint, model, loader, name=args.name, output=args.out, correction=args.correction,
                              device=args.device, weights_only=not args.unsafe_load)
    except (CheckpointStateError, InvalidArgumentError, ValueError, ImportError, AttributeError) as e:
        return fail(e)
    except pickle.UnpicklingError as e:
        return fail(f"{args.checkpoint} holds objects that torch.load(weights_only=True) refuses ({e}); rerun with "
                    "--unsafe-load if you trust the file")
    print(path)
    return 0
