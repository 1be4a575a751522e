"""Multi-stage influence: attribute a fine-tuned model's predictions to pre-training data.

Implements the multi-stage influence function of Ding et al. (arXiv 2505.05017) on top of the
EK-FAC factors of both stages::

    score(z_pt, x) = ∇m(x, θ_ft)ᵀ (G_ft + λ_ft I)⁻¹ (G_pt + λ_pt I)⁻¹ ∇ℓ_pt(z_pt, θ_pt)

* ``∇m(x, θ_ft)``: gradient of the query measurement at the **fine-tuned** weights;
* ``(G_ft + λ_ft I)⁻¹``: damped EK-FAC inverse curvature of the fine-tuning loss;
* ``(G_pt + λ_pt I)⁻¹``: damped EK-FAC inverse curvature of the pre-training loss;
* ``∇ℓ_pt(z_pt, θ_pt)``: gradient of the pre-training example's (token-summed) loss at the
  **pre-trained** weights.

Each stage's ``(G + λI)⁻¹`` is one :class:`~lightning_influence.ekfac.preconditioner.Preconditioner`
(the one the single-stage :class:`~lightning_influence.InfluenceScorer` uses), and every gradient
comes from :func:`~lightning_influence.ekfac.layer_data.iter_layer_data`. Both preconditioners are
block-diagonal over layers and symmetric, so the score is ``Σ_layers ⟨P_ft ∇m(x), P_pt ∇ℓ(z)⟩``:
the pre-training side ``P_pt ∇ℓ(z)`` is computed once per candidate
(:meth:`MultiStageScorer.candidates`) and reused by every query.

Only layers present with equal gradient shapes in both models (and in both factor sets) take
part; a replaced head is left out, and :attr:`MultiStageScorer.layers_excluded` says why each
other layer was left out. Either model may be sharded (FSDP1 or FSDP2, e.g. the model a sharded
run trained, scored on every rank alike) or a consolidated checkpoint in a plain module: layers
are matched by their names in the unwrapped model and their declared sizes
(:func:`~lightning_influence.layers.named_modules`).

**Sign:** a positive score means up-weighting the pre-training example ``z`` *lowers* the
fine-tuned model's measurement on ``x`` (``z`` helps ``x``), as everywhere in this library.
Scores are not normalised by dataset size.

Candidate narrowing (the paper's §4.3): :meth:`MultiStageScorer.narrowed` first keeps, for
each query, its ``k`` nearest pre-training examples in an embedding space (a user function, by
default :class:`~lightning_influence.retrieval.MeanPooledHiddenStates` of the pre-trained model)
and computes pre-training gradients only for the union of those candidates.

For question answering, the measurement is the loss of the answer tokens given the prompt:
:func:`lightning_influence.data.qa_collate` builds causal-LM batches whose ``labels`` are
``-100`` on the prompt, so the default measurement is exactly ``-log p(answer | prompt)``.

No Lightning import: the scorer works on plain ``nn.Module`` models as well as LightningModules.

Modules: :mod:`.pairing` (which layers take part), :mod:`.scoring` (scores from the two
sides' vectors), :mod:`.sweep` (several dampings from one pass), :mod:`.narrowing` (k-NN
candidates), :mod:`.scorer` (the class; :meth:`~MultiStageScorer.damping_sweep` and
:meth:`~MultiStageScorer.narrowed` come from the mixins of :mod:`.sweep` and :mod:`.narrowing`).
"""

from __future__ import annotations

from ..ekfac.preconditioner import StageDamping
from .narrowing import NarrowedScores
from .pairing import NoSharedLayersError
from .scorer import MultiStageScorer
from .scoring import CandidateGradients

__all__ = [
    "MultiStageScorer",
    "NoSharedLayersError",
    "CandidateGradients",
    "NarrowedScores",
    "StageDamping",
]
