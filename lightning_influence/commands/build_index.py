"""``lightning-influence build-index FACTORS --model SPEC --checkpoint CKPT --train SPEC --out DIR``:
a training-gradient index (see :func:`~lightning_influence.index.build_index`) from a run's saved
EK-FAC factors and trained weights, for ``lightning-influence query``.

``--model``, ``--model-kwargs``, ``--checkpoint`` and ``--train`` take the forms of the ``query``
command's options. The weights must be the ones the factors were made with (the factors'
fingerprint is checked; ``--allow-other-weights`` to use others). An interrupted build resumes
when run again.
"""

from __future__ import annotations

import argparse

from . import fail
from ._objects import add_model_arguments, load_loader, load_model

NAME = "build-index"
HELP = "index a run's training gradients (from its saved factors and checkpoint) for fast queries"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..index.builder import DEFAULT_COMPRESSION
    from ..index.projection import COMPRESSIONS

    p.add_argument("factors", help="the factors folder (e.g. RUN_DIR/influence/ekfac/factors)")
    add_model_arguments(p, "the factors were made with")
    p.add_argument("--train", required=True, help="the training Dataset / DataLoader (module.path:name, file.py:name or "
                                                   "a torch.save'd file), with ids (IndexedDataset)")
    p.add_argument("--out", required=True, help="the index folder to write")
    p.add_argument("--compression", choices=COMPRESSIONS, default=DEFAULT_COMPRESSION,
                   help=f"how gradients are stored (default {DEFAULT_COMPRESSION})")
    p.add_argument("--dim", type=int, default=None, help="projected dimension per layer (default: the library's)")
    p.add_argument("--batch-size", type=int, default=64, help="training batch size for a Dataset (default 64)")


def run(args: argparse.Namespace) -> int:
    from ..ekfac.factors import FactorMismatchError, load_factors
    from ..index import build_index
    from ..index.shards import InfluenceIndexError
    from ..storage import ArtifactError
    from ..weights import WeightsMismatchError

    if args.batch_size < 1 or (args.dim is not None and args.dim < 1):
        return fail("--batch-size and --dim must be >= 1")
    try:
        model = load_model(args.model, args.checkpoint, args.model_kwargs)
        factors = load_factors(args.factors, model=model, allow_other_weights=args.allow_other_weights)
        loader = load_loader(args.train, "train", args.batch_size)
        kw = {} if args.dim is None else {"dim": args.dim}
        index = build_index(model, factors, loader, args.out, compression=args.compression, **kw)
    except (WeightsMismatchError, ValueError, ImportError, ArtifactError, FileNotFoundError, InfluenceIndexError,
            FactorMismatchError) as e:
        return fail(e)
    print(f"wrote {index!r}")
    return 0
