"""lightning-influence: training-data influence as a by-product of PyTorch Lightning training.

Public names resolve lazily at first use (``import lightning_influence`` loads neither Lightning
nor any method); type checkers and IDEs read the explicit imports under ``TYPE_CHECKING`` below,
which a test keeps identical to the lazy table. One name per job: every library error derives
from :class:`InfluenceError` (the specific classes live in the modules that raise them), and
the machinery behind a name (``resolve_task``, ``ModuleTask``, ``LayerFactors``, ``top_k``)
stays in its module.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

if TYPE_CHECKING:  # keep in step with _EXPORTS (tests/test_public_api.py checks)
    from .calibrate import calibrate
    from .callbacks.base import InfluenceCallback
    from .callbacks.ekfac import EKFACInfluence
    from .callbacks.index import InfluenceIndexCallback
    from .callbacks.lissa import LiSSASelfInfluence
    from .callbacks.z0 import Z0Influence
    from .data import IndexedDataset, answer_only_labels, classification_collate, lm_collate, qa_collate
    from .ekfac.factors import EKFACFactors, load_factors, save_factors
    from .ekfac.finish import finish_factors
    from .ekfac.fit import fit_factors
    from .ekfac.online import AccumulationOptions
    from .ekfac.scorer import InfluenceScorer
    from .errors import InfluenceError
    from .index import IndexOptions, InfluenceIndex, build_index, load_index
    from .layers import TrackedLayer, register_layer_type, select_layers
    from .lissa.options import LiSSAOptions
    from .lissa.self_influence import lissa_inverse_hvp
    from .multistage import CandidateGradients, MultiStageScorer, NarrowedScores
    from .ranking import TopInfluences
    from .report import write_html_report
    from .scores import InfluenceScores, load_scores, save_scores
    from .task import CausalLMTask, ClassificationTask, ImageClassificationTask, InfluenceTask, SequenceClassificationTask
    from .trajectory import TrajectoryScorer, load_segments
    from .z0.artifact import Z0Result, load_z0

_EXPORTS = {
    # callbacks
    "InfluenceCallback": "lightning_influence.callbacks.base",
    "EKFACInfluence": "lightning_influence.callbacks.ekfac",
    "InfluenceIndexCallback": "lightning_influence.callbacks.index",
    "LiSSASelfInfluence": "lightning_influence.callbacks.lissa",
    "Z0Influence": "lightning_influence.callbacks.z0",
    # data and tasks (the contract: lightning_influence.task.TASK_CONTRACT)
    "IndexedDataset": "lightning_influence.data",
    "lm_collate": "lightning_influence.data",
    "classification_collate": "lightning_influence.data",
    "qa_collate": "lightning_influence.data",
    "answer_only_labels": "lightning_influence.data",
    "InfluenceTask": "lightning_influence.task",
    "ClassificationTask": "lightning_influence.task",
    "CausalLMTask": "lightning_influence.task",
    "SequenceClassificationTask": "lightning_influence.task",
    "ImageClassificationTask": "lightning_influence.task",
    # layers
    "select_layers": "lightning_influence.layers",
    "TrackedLayer": "lightning_influence.layers",
    "register_layer_type": "lightning_influence.layers",
    # errors: every one derives from InfluenceError; each is defined in the module that raises it
    "InfluenceError": "lightning_influence.errors",
    # scores and rankings (every method's result type)
    "InfluenceScores": "lightning_influence.scores",
    "save_scores": "lightning_influence.scores",
    "load_scores": "lightning_influence.scores",
    "TopInfluences": "lightning_influence.ranking",
    "write_html_report": "lightning_influence.report",
    # EK-FAC
    "EKFACFactors": "lightning_influence.ekfac.factors",
    "save_factors": "lightning_influence.ekfac.factors",
    "load_factors": "lightning_influence.ekfac.factors",
    "fit_factors": "lightning_influence.ekfac.fit",
    "finish_factors": "lightning_influence.ekfac.finish",
    "AccumulationOptions": "lightning_influence.ekfac.online",
    "InfluenceScorer": "lightning_influence.ekfac.scorer",
    "calibrate": "lightning_influence.calibrate",
    # multi-stage (pre-training -> fine-tuning)
    "MultiStageScorer": "lightning_influence.multistage",
    "CandidateGradients": "lightning_influence.multistage",
    "NarrowedScores": "lightning_influence.multistage",
    # training-gradient index
    "build_index": "lightning_influence.index",
    "load_index": "lightning_influence.index",
    "IndexOptions": "lightning_influence.index",
    "InfluenceIndex": "lightning_influence.index",
    # trajectory segments
    "TrajectoryScorer": "lightning_influence.trajectory",
    "load_segments": "lightning_influence.trajectory",
    # Z0-Inf
    "Z0Result": "lightning_influence.z0.artifact",
    "load_z0": "lightning_influence.z0.artifact",
    # sampled LiSSA
    "LiSSAOptions": "lightning_influence.lissa.options",
    "lissa_inverse_hvp": "lightning_influence.lissa.self_influence",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_influence' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
