"""Z0-Inf: zeroth-order influence from loss trajectories and parameter snapshots (no Lightning).

* :mod:`.gram`: incremental Gram matrix of snapshots spilled to disk;
* :mod:`.neighbours`: distances and neighbour checkpoints from the Gram matrix;
* :mod:`.estimators`: self-influence and train-test influence (:class:`DirectionalFit`);
* :mod:`.capture`: :class:`TrainingLossCapture`, per-example losses read from the training forward;
* :mod:`.recorder`: :class:`Z0Recorder`, the state of a recording between recording points;
* :mod:`.shards`: this process's part of sharded (FSDP) parameters, for sharded Gram matrices;
* :mod:`.artifact`: :class:`Z0Result`, :func:`load_z0` / :func:`write_z0`.

Every name in a submodule's ``__all__`` is exported here.
"""

from . import artifact, capture, estimators, gram, neighbours, recorder, shards
from .artifact import *  # noqa: F403
from .capture import *  # noqa: F403
from .estimators import *  # noqa: F403
from .gram import *  # noqa: F403
from .neighbours import *  # noqa: F403
from .recorder import *  # noqa: F403
from .shards import *  # noqa: F403

__all__: list[str] = []
__all__ += artifact.__all__
__all__ += capture.__all__
__all__ += estimators.__all__
__all__ += gram.__all__
__all__ += neighbours.__all__
__all__ += recorder.__all__
__all__ += shards.__all__
