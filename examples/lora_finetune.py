"""A LoRA fine-tune traced back to pre-training sentences with multi-stage influence.

The same generated world as ``multistage_fact_tracing.py`` (made-up subjects, four relations,
each fact stated by two pre-training sentences), with the fine-tuning done as people do it today:

1. **Pre-training.** A tiny Llama (from a config, no download) is trained on the corpus with
   :class:`EKFACInfluence` at its defaults: attention and MLP layers (the vocabulary-sized head
   is left out, with a log line).
2. **LoRA fine-tuning.** ``peft.get_peft_model`` adds rank-``r`` adapters to ``q_proj``,
   ``v_proj``, ``up_proj`` and ``down_proj`` of a copy of the pre-trained model (base frozen), and
   only the adapters are trained to answer questions about half of the facts. A second
   :class:`EKFACInfluence` tracks the adapted layers as whole layers
   (``layers=["*q_proj", ...]``: each one's gradient with respect to its effective weight
   ``W₀ + s·B·A``, see ``docs/lora.md``).
3. **Tracing.** Questions about held-out facts, answered by the fine-tuned model, are attributed
   to every pre-training sentence with :class:`MultiStageScorer`: the fine-tuned model's
   gradient through the adapters, preconditioned by the fine-tuning factors, then by the
   pre-training factors of the layer each adapter modifies (``layer_map`` maps the pre-trained
   names to peft's). MRR and recall@10 measure how well each fact's own two sentences come first;
   the same with an identity fine-tuning preconditioner for comparison.

Run: ``.venv/bin/python examples/lora_finetune.py`` (a few minutes on 2 CPU cores);
``LI_EXAMPLE_QUICK=1`` runs a reduced size in about a minute. Needs the ``peft`` extra
(``pip install "lightning-influence[peft]"``).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
import multistage_fact_tracing  # noqa: E402
from multistage_fact_tracing import answer_accuracy, fit_quietly, make_world, retrieval_metrics  # noqa: E402

from lightning_influence import EKFACInfluence, load_factors, save_scores  # noqa: E402
from lightning_influence.data import lm_collate, qa_collate  # noqa: E402
from lightning_influence.demos import CausalLMModule, tiny_causal_lm  # noqa: E402
from lightning_influence.multistage import MultiStageScorer  # noqa: E402

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
ADAPTED = [f"*{t}" for t in TARGETS]


@dataclass
class Config(multistage_fact_tracing.Config):
    """The multi-stage example's sizes (its ``knn_k`` unused here), with the adapters' rank."""

    ft_lr: float = 1e-2  # adapters usually take a larger learning rate than full fine-tuning
    rank: int = 8

    @classmethod
    def quick(cls) -> "Config":
        return dataclasses.replace(super().quick(), rank=4)


def to_peft_name(name: str) -> str:
    """A pre-trained layer's name → the same layer's name inside the peft model
    (``model.model.layers.0...`` → ``model.base_model.model.model.layers.0...``)."""
    return name.replace("model.", "model.base_model.model.", 1)


def pretrain(config: Config, world, work: Path, callbacks: Optional[list] = None) -> tuple[CausalLMModule, float]:
    """Pre-train a tiny Llama on the world's corpus (``callbacks`` default: one
    ``EKFACInfluence(name="pretrain")`` at its defaults); returns the model and the seconds."""
    import lightning as L

    L.seed_everything(config.seed, verbose=False)
    pt = CausalLMModule(tiny_causal_lm("llama", vocab_size=len(world.tokenizer), hidden=config.hidden, layers=config.layers,
                                       heads=config.heads, max_len=32, seed=config.seed), lr=config.lr)
    if callbacks is None:
        callbacks = [EKFACInfluence(name="pretrain", dirpath=str(work / "pretrain_ekfac"))]
    return pt, fit_quietly(pt, world.pretraining_dataset(), lm_collate, config.pt_epochs, config.batch_size, callbacks, work / "pt")


def lora_finetune(config: Config, world, pt: CausalLMModule, work: Path, callbacks: list,
                  lora: bool = True) -> tuple[CausalLMModule, float]:
    """Fine-tune a copy of ``pt`` on the fine-tuning questions: LoRA adapters on a frozen base
    (``lora=True``) or every weight (``lora=False``, for comparison); returns the model and the seconds."""
    import lightning as L
    import peft

    L.seed_everything(config.seed + 1, verbose=False)
    if lora:
        lora_cfg = peft.LoraConfig(r=config.rank, lora_alpha=2 * config.rank, target_modules=TARGETS, lora_dropout=0.0)
        ft = CausalLMModule(peft.get_peft_model(copy.deepcopy(pt.model), lora_cfg), lr=config.ft_lr)
    else:
        ft = CausalLMModule(copy.deepcopy(pt.model), lr=config.ft_lr / 10)
    return ft, fit_quietly(ft, world.qa_dataset(world.ft_questions), qa_collate, config.ft_epochs, config.batch_size,
                           callbacks, work / "ft")


def main(quick: Optional[bool] = None, seed: int = 0) -> dict[str, Any]:
    """Run the example; prints and returns the metrics (``quick``: default from ``LI_EXAMPLE_QUICK``)."""
    if quick is None:
        quick = os.environ.get("LI_EXAMPLE_QUICK", "0") not in ("", "0", "false", "False")
    torch.set_num_threads(int(os.environ.get("LI_EXAMPLE_THREADS", "1")))
    config = Config.quick() if quick else Config()
    config.seed = seed
    t_start = time.perf_counter()
    world = make_world(config.n_subjects, seed=config.seed)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pt, t_pt = pretrain(config, world, work)
        pt_ekfac_path = work / "pretrain_ekfac" / "factors"
        pt_data = world.pretraining_dataset()
        ft_ekfac = EKFACInfluence(name="finetune", layers=ADAPTED, dirpath=str(work / "finetune_ekfac"))
        ft, t_ft = lora_finetune(config, world, pt, work, [ft_ekfac])
        n_adapter = sum(p.numel() for p in ft.parameters() if p.requires_grad)
        n_total = sum(p.numel() for p in ft.parameters())
        pt.eval()
        ft.eval()
        if config.n_test:
            world.test_questions = world.test_questions[: config.n_test]
        print(f"world: {len(world.facts)} facts, {len(world.corpus)} pre-training sentences, {len(world.ft_questions)} "
              f"fine-tuning questions, {len(world.test_questions)} traced questions, vocab {len(world.tokenizer)}")
        print(f"pre-training {t_pt:.1f} s; LoRA fine-tuning {t_ft:.1f} s ({n_adapter} of {n_total} parameters trained, "
              f"rank {config.rank}); answer accuracy: fine-tuning set {answer_accuracy(ft, world, world.ft_questions):.2f}, "
              f"held-out facts {answer_accuracy(ft, world, world.test_questions):.2f}")

        pt_factors = load_factors(pt_ekfac_path, pt)
        ft_factors = load_factors(ft_ekfac.factors_path, ft)
        test_loader = DataLoader(world.qa_dataset(world.test_questions), batch_size=64, collate_fn=qa_collate)
        pt_loader = DataLoader(pt_data, batch_size=64, collate_fn=lm_collate)
        relevant = world.relevance()
        results = {}
        for label, factors in (("multi-stage", ft_factors), ("identity fine-tuning preconditioner", None)):
            scorer = MultiStageScorer(pt, pt_factors, ft, factors, layers=ADAPTED, layer_map=to_peft_name)
            result = scorer.pairwise(test_loader, scorer.candidates(pt_loader))
            results[label] = (result, retrieval_metrics(result.pairwise, relevant))
            m = results[label][1]
            print(f"{label} ({len(scorer.layers_used)} layers): MRR {m['mrr']:.3f}  recall@10 {m['recall@10']:.3f}")

        result = results["multi-stage"][0]
        q0 = world.test_questions[0]
        print(f"example: Q: {q0[0]}  A: {q0[1]}")
        for i, v in result.top_pairwise(3).as_rows()[0]["proponents"]:
            print(f"   {'*' if relevant[0, i] else ' '} {v:+.3e}  {world.corpus[i]}")
        saved = save_scores(result, work / "lora_multistage")
        print(f"scores written to {saved.name}/ (an InfluenceScores artifact; `lightning-influence report` reads it)")
    print(f"total {time.perf_counter() - t_start:.1f} s")
    return {label: metrics for label, (_, metrics) in results.items()}


if __name__ == "__main__":
    main()
