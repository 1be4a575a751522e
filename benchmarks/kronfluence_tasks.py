"""kronfluence for the benchmarks: ``Task`` adapters matching lightning-influence's conventions,
the EK-FAC settings every comparison uses (:func:`ekfac_arguments`) and a fit-then-score adapter
(:class:`KronfluenceEKFAC`; benchmarks only).

Losses are **summed** over examples and tokens (kronfluence's convention and ours), shifted
causal-LM targets ignore ``-100``, and sampled labels (true Fisher) come from the model's
predictive distribution.
"""

from __future__ import annotations

import copy
import logging
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from common import quiet


def kronfluence_task(kind: Literal["classification", "causal_lm"], modules: list[str]):
    """A kronfluence ``Task`` instance tracking ``modules`` for ``(x, y)`` or HF dict batches."""
    from kronfluence.task import Task

    class _Classification(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            if sample:
                with torch.no_grad():
                    y = torch.multinomial(torch.softmax(logits.detach().float(), -1), 1).flatten()
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model, sample=False)

        def get_influence_tracked_modules(self):
            return modules

    class _CausalLM(_Classification):
        def compute_train_loss(self, batch, model, sample=False):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            labels = batch["labels"][:, 1:]
            if sample:
                with torch.no_grad():
                    probs = torch.softmax(logits.detach().float(), -1)
                    s = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1).view(labels.shape)
                    labels = s.masked_fill(labels == -100, -100)
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum")

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    if kind not in ("classification", "causal_lm"):
        raise ValueError(f"kind must be 'classification' or 'causal_lm', got {kind!r}")
    return _Classification() if kind == "classification" else _CausalLM()


def ekfac_arguments():
    """``(FactorArguments, ScoreArguments)`` of every comparison: EK-FAC with the empirical Fisher
    over all examples, float32 statistics and gradients, float64 eigendecompositions, and
    kronfluence's heuristic damping (0.1 × mean(Λ) per layer, as ours with ``damping="mean"``)."""
    from kronfluence.arguments import FactorArguments, ScoreArguments

    f32 = torch.float32
    factor_args = FactorArguments(
        strategy="ekfac", use_empirical_fisher=True, covariance_max_examples=None, lambda_max_examples=None,
        activation_covariance_dtype=f32, gradient_covariance_dtype=f32, eigendecomposition_dtype=torch.float64,
        per_sample_gradient_dtype=f32, lambda_dtype=f32,
    )
    score_args = ScoreArguments(damping_factor=None, per_sample_gradient_dtype=f32, precondition_dtype=f32, score_dtype=f32)
    return factor_args, score_args


def analyzer(model, task, name: str, workdir: str, collate=None):
    """A CPU kronfluence ``Analyzer`` of ``model`` (already ``prepare_model``-ed) writing under ``workdir``."""
    from kronfluence.analyzer import Analyzer
    from kronfluence.utils.dataset import DataLoaderKwargs

    out = Analyzer(analysis_name=name, model=model, task=task, cpu=True, disable_tqdm=True, output_dir=workdir,
                   disable_model_save=True, log_level=logging.WARNING)
    if collate is not None:
        out.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=collate))
    return out


class KronfluenceEKFAC:
    """kronfluence EK-FAC on a deep copy of ``model`` (``prepare_model`` wraps modules in place):
    ``fit(dataset, batch_size)``, then ``pairwise(query, train, query_batch, train_batch)`` →
    ``Tensor[n_query, n_train]``. ``kind``: ``"mlp"`` (classification) or anything else (causal LM)."""

    def __init__(self, model: nn.Module, kind: str, modules: list[str], collate, workdir: str, name: str = "bench") -> None:
        from kronfluence.analyzer import prepare_model

        self.task = kronfluence_task("classification" if kind == "mlp" else "causal_lm", modules)
        self.model = prepare_model(copy.deepcopy(model).eval(), self.task)
        self.analyzer = analyzer(self.model, self.task, name, workdir, collate)
        self.factor_args, self.score_args = ekfac_arguments()
        self.factors_name = "ekfac"

    def fit(self, dataset, batch_size: int) -> None:
        with quiet():
            self.analyzer.fit_all_factors(factors_name=self.factors_name, dataset=dataset, per_device_batch_size=batch_size,
                                          factor_args=self.factor_args, overwrite_output_dir=True)

    def pairwise(self, query, train, query_batch: int, train_batch: int) -> torch.Tensor:
        with quiet():
            self.analyzer.compute_pairwise_scores(scores_name="pairwise", factors_name=self.factors_name, query_dataset=query,
                                                  train_dataset=train, per_device_query_batch_size=query_batch,
                                                  per_device_train_batch_size=train_batch, score_args=self.score_args,
                                                  overwrite_output_dir=True)
            return self.analyzer.load_pairwise_scores("pairwise")["all_modules"]
