"""Fact tracing with multi-stage influence, at small scale with generated data.

The shape of the fact-tracing benchmark of arXiv 2505.05017 (§5.3), shrunk to a CPU:

1. **World.** Made-up subjects (``"zorvak"``), four relations and made-up objects give
   (subject, relation, object) facts. Each fact is stated by two sentences of the
   pre-training corpus (``"zorvak was born in pelmor ."``, ``"the birthplace of zorvak is
   pelmor ."``): those are the fact's *sources*. A tiny word-level tokenizer (no downloads)
   maps words to ids.
2. **Pre-training.** A tiny GPT-NeoX is trained on the corpus with :class:`EKFACInfluence`
   (factors of the pre-training loss saved at the end of ``fit``).
3. **Fine-tuning.** From those weights, the model is fine-tuned to answer questions
   (``"which city does zorvak come from ?" → "pelmor"``, loss on the answer tokens only) about half of the
   facts, with another :class:`EKFACInfluence` (fine-tuning factors).
4. **Tracing.** For every question about a *held-out* fact (never seen in fine-tuning), the
   multi-stage influence ranks all pre-training sentences; MRR and recall@10 measure how well
   the fact's own sources come first. The measurement is ``-log p(answer | question)`` of the
   fine-tuned model. The same ranking is also done after k-NN candidate narrowing.

Run: ``.venv/bin/python examples/multistage_fact_tracing.py`` (30 s of CPU time on 2 cores;
1.9 min wall measured on a busy machine); ``LI_EXAMPLE_QUICK=1`` runs a reduced size.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import random
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_influence import EKFACInfluence, IndexedDataset, load_factors
from lightning_influence.data import lm_collate, qa_collate
from lightning_influence.demos import CausalLMModule, tiny_causal_lm
from lightning_influence.multistage import MultiStageScorer

# relation: (object pool name, two statement templates, question template)
# Question wording shares no relation word with the statements (as in the paper's benchmark,
# where cloze templates were rewritten as questions), so retrieval cannot rely on it.
RELATIONS: dict[str, tuple[str, tuple[str, str], str]] = {
    "born_in": ("city", ("{s} was born in {o} .", "the birthplace of {s} is {o} ."), "which city does {s} come from ?"),
    "works_as": ("job", ("{s} works as a {o} .", "by profession {s} is a {o} ."), "what does {s} do for a living ?"),
    "speaks": ("language", ("{s} speaks {o} .", "the mother tongue of {s} is {o} ."), "which language does {s} use ?"),
    "likes": ("food", ("{s} likes to eat {o} .", "the favourite food of {s} is {o} ."), "what dish does {s} enjoy ?"),
}
SPECIAL = ["<pad>", "<eos>"]


# ----------------------------------------------------------------------------------------------
# World and tokenizer
# ----------------------------------------------------------------------------------------------
class WordTokenizer:
    """Whitespace word-level tokenizer over a fixed vocabulary (id 0 = ``<pad>``, 1 = ``<eos>``)."""

    def __init__(self, words: list[str]) -> None:
        self.itos = SPECIAL + sorted(set(words) - set(SPECIAL))
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.pad_id, self.eos_id = 0, 1

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str, eos: bool = False) -> Tensor:
        ids = [self.stoi[w] for w in text.split()] + ([self.eos_id] if eos else [])
        return torch.tensor(ids, dtype=torch.long)

    def decode(self, ids: Tensor) -> str:
        return " ".join(self.itos[int(i)] for i in ids)


def _made_up_words(n: int, rng: random.Random, syllables: int, taken: set[str]) -> list[str]:
    cons, vows = "bdfgklmnprstvz", "aeiou"
    out = []
    while len(out) < n:
        w = "".join(rng.choice(cons) + rng.choice(vows) for _ in range(syllables)) + rng.choice(cons)
        if w not in taken:
            taken.add(w)
            out.append(w)
    return out


@dataclass
class FactWorld:
    """Generated facts, corpus and questions.

    Attributes:
        facts: ``(subject, relation, object)`` triples.
        corpus: pre-training sentences; ``corpus_fact[i]`` is the fact index sentence ``i`` states.
        ft_questions / test_questions: ``(question, answer, fact index)`` for fine-tuning and for
            tracing (disjoint sets of facts).
    """

    tokenizer: WordTokenizer
    facts: list[tuple[str, str, str]]
    corpus: list[str]
    corpus_fact: list[int]
    ft_questions: list[tuple[str, str, int]]
    test_questions: list[tuple[str, str, int]]

    def pretraining_dataset(self) -> IndexedDataset:
        return IndexedDataset([{"input_ids": self.tokenizer.encode(s, eos=True)} for s in self.corpus])

    def qa_dataset(self, questions: list[tuple[str, str, int]]) -> IndexedDataset:
        tok = self.tokenizer
        return IndexedDataset([{"prompt_ids": tok.encode(q), "answer_ids": tok.encode(a, eos=True)} for q, a, _ in questions])

    def relevance(self) -> Tensor:
        """``BoolTensor[n_test, n_corpus]``: True where the sentence states the question's fact."""
        fact = torch.tensor(self.corpus_fact)
        return torch.stack([fact == f for _, _, f in self.test_questions])


def make_world(n_subjects: int = 60, n_objects: int = 10, test_fraction: float = 0.5, seed: int = 0) -> FactWorld:
    """Facts for every (subject, relation) with a random object; questions split into
    fine-tuning and test by fact (``test_fraction`` of the facts are held out of fine-tuning)."""
    rng = random.Random(seed)
    taken: set[str] = set()
    subjects = _made_up_words(n_subjects, rng, 2, taken)
    pools = {pool: _made_up_words(n_objects, rng, 2, taken) for pool, _, _ in RELATIONS.values()}
    facts = [(s, r, rng.choice(pools[RELATIONS[r][0]])) for s in subjects for r in RELATIONS]
    corpus, corpus_fact = [], []
    for i, (s, r, o) in enumerate(facts):
        for tpl in RELATIONS[r][1]:
            corpus.append(tpl.format(s=s, o=o))
            corpus_fact.append(i)
    order = list(range(len(corpus)))
    rng.shuffle(order)
    corpus, corpus_fact = [corpus[i] for i in order], [corpus_fact[i] for i in order]
    questions = [(RELATIONS[r][2].format(s=s), o, i) for i, (s, r, o) in enumerate(facts)]
    rng.shuffle(questions)
    n_test = int(round(test_fraction * len(questions)))
    words = [w for text in corpus + [q for q, _, _ in questions] for w in text.split()]
    return FactWorld(WordTokenizer(words), facts, corpus, corpus_fact, questions[n_test:], questions[:n_test])


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
@dataclass
class Config:
    n_subjects: int = 60
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    pt_epochs: int = 60
    ft_epochs: int = 30
    lr: float = 3e-3
    ft_lr: float = 1e-3
    batch_size: int = 16
    n_test: Optional[int] = None  # cap on traced questions
    knn_k: int = 50
    seed: int = 0

    @classmethod
    def quick(cls) -> "Config":
        return cls(n_subjects=16, hidden=32, layers=1, heads=2, pt_epochs=60, ft_epochs=20, n_test=24, knn_k=20)


def _trainer(max_epochs: int, callbacks: list, root: Path):
    import lightning as L

    return L.Trainer(
        max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, default_root_dir=str(root),
    )


@contextlib.contextmanager
def _quiet():
    """Silence Lightning's banner lines and warnings about tiny dataloaders."""
    loggers = [logging.getLogger(n) for n in ("lightning", "lightning.pytorch", "pytorch_lightning", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            for lg, lv in zip(loggers, levels):
                lg.setLevel(lv)


def fit_quietly(model, data, collate, epochs: int, batch_size: int, callbacks: list, root: Path) -> float:
    """Train ``model`` on ``data`` (shuffled batches of ``batch_size`` through ``collate``) for
    ``epochs`` on the CPU with ``callbacks``, Lightning's chatter silenced; returns the seconds."""
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, collate_fn=collate)
    t0 = time.perf_counter()
    with _quiet():
        _trainer(epochs, callbacks, root).fit(model, loader)
    return time.perf_counter() - t0


@dataclass
class Trained:
    world: FactWorld
    config: Config
    pt_model: CausalLMModule
    ft_model: CausalLMModule
    pt_factors_dir: Path
    ft_factors_dir: Path
    seconds: dict[str, float] = field(default_factory=dict)
    ft_accuracy: float = 0.0
    test_accuracy: float = 0.0


def answer_accuracy(model: CausalLMModule, world: FactWorld, questions: list[tuple[str, str, int]]) -> float:
    """Fraction of questions whose greedy next token after the prompt is the answer's first token."""
    tok, hits = world.tokenizer, 0
    model.eval()
    with torch.no_grad():
        for q, a, _ in questions:
            ids = tok.encode(q)[None]
            hits += int(model(ids)[0, -1].argmax()) == int(tok.encode(a)[0])
    return hits / max(len(questions), 1)


def train_stages(config: Config, workdir: Path) -> Trained:
    """Pre-train with EKFACInfluence, then fine-tune with another one; both factor sets saved."""
    world = make_world(config.n_subjects, seed=config.seed)
    secs: dict[str, float] = {}
    import lightning as L

    L.seed_everything(config.seed, verbose=False)
    pt_model = CausalLMModule(
        tiny_causal_lm("gpt_neox", vocab_size=len(world.tokenizer), hidden=config.hidden, layers=config.layers, heads=config.heads, max_len=32, seed=config.seed),
        lr=config.lr,
    )
    pt_ekfac = EKFACInfluence(exclude="*lm_head", name="pretrain", dirpath=str(workdir / "pretrain_ekfac"))
    secs["pretrain"] = fit_quietly(pt_model, world.pretraining_dataset(), lm_collate, config.pt_epochs, config.batch_size,
                                   [pt_ekfac], workdir / "pt")

    ft_model = copy.deepcopy(pt_model)
    ft_model.lr = config.ft_lr
    ft_ekfac = EKFACInfluence(exclude="*lm_head", name="finetune", dirpath=str(workdir / "finetune_ekfac"))
    secs["finetune"] = fit_quietly(ft_model, world.qa_dataset(world.ft_questions), qa_collate, config.ft_epochs,
                                   config.batch_size, [ft_ekfac], workdir / "ft")
    pt_model.eval()
    ft_model.eval()
    test_q = world.test_questions[: config.n_test] if config.n_test else world.test_questions
    world.test_questions = test_q
    return Trained(
        world, config, pt_model, ft_model, pt_ekfac.factors_path, ft_ekfac.factors_path, secs,
        ft_accuracy=answer_accuracy(ft_model, world, world.ft_questions),
        test_accuracy=answer_accuracy(ft_model, world, test_q),
    )


# ----------------------------------------------------------------------------------------------
# Retrieval metrics (torchmetrics)
# ----------------------------------------------------------------------------------------------
def retrieval_metrics(scores: Tensor, relevant: Tensor, top_k: int = 10) -> dict[str, float]:
    """Mean reciprocal rank of the first relevant document and recall@``top_k``, averaged over
    queries (rows of ``scores [Q, N]``; larger score = ranked higher)."""
    from torchmetrics.functional.retrieval import retrieval_recall, retrieval_reciprocal_rank

    s, r = scores.double().cpu(), relevant.cpu()
    mrr = torch.stack([retrieval_reciprocal_rank(s[i], r[i]) for i in range(len(s))]).mean()
    rec = torch.stack([retrieval_recall(s[i], r[i], top_k=top_k) for i in range(len(s))]).mean()
    return {"mrr": float(mrr), f"recall@{top_k}": float(rec)}


def lm_or_qa_collate(items: list) -> Any:
    """Collate pre-training items with :func:`lm_collate` and QA items with :func:`qa_collate`."""
    first = items[0][1] if isinstance(items[0], (tuple, list)) else items[0]
    return qa_collate(items) if "prompt_ids" in first else lm_collate(items)


# ----------------------------------------------------------------------------------------------
def main(quick: Optional[bool] = None) -> dict[str, Any]:
    """Run the example; prints and returns the metrics (``quick``: default from ``LI_EXAMPLE_QUICK``)."""
    if quick is None:
        quick = os.environ.get("LI_EXAMPLE_QUICK", "0") not in ("", "0", "false", "False")
    # Tiny matrices: one intra-op thread avoids OpenMP spin-waiting on a busy 2-core machine.
    torch.set_num_threads(int(os.environ.get("LI_EXAMPLE_THREADS", "1")))
    config = Config.quick() if quick else Config()
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tr = train_stages(config, Path(tmp))
        world = tr.world
        print(f"world: {len(world.facts)} facts, {len(world.corpus)} pre-training sentences, "
              f"{len(world.ft_questions)} fine-tuning questions, {len(world.test_questions)} traced questions, vocab {len(world.tokenizer)}")
        print(f"trained: pre-training {tr.seconds['pretrain']:.1f} s, fine-tuning {tr.seconds['finetune']:.1f} s; "
              f"answer accuracy fine-tuning set {tr.ft_accuracy:.2f}, held-out facts {tr.test_accuracy:.2f}")

        # factors written by the two EKFACInfluence callbacks
        pt_factors = load_factors(tr.pt_factors_dir, tr.pt_model)
        ft_factors = load_factors(tr.ft_factors_dir, tr.ft_model)
        scorer = MultiStageScorer(tr.pt_model, pt_factors, tr.ft_model, ft_factors)
        print(scorer.describe())

        pt_data = world.pretraining_dataset()
        test_data = world.qa_dataset(world.test_questions)
        relevant = world.relevance()
        t0 = time.perf_counter()
        candidates = scorer.candidates(DataLoader(pt_data, batch_size=64, collate_fn=lm_collate))
        result = scorer.pairwise(DataLoader(test_data, batch_size=64, collate_fn=qa_collate), candidates)
        scores = result.pairwise  # [n_test, n_corpus]; columns in corpus order (IndexedDataset ids)
        t_full = time.perf_counter() - t0
        full = retrieval_metrics(scores, relevant)
        print(f"multi-stage influence, all {len(pt_data)} candidates: MRR {full['mrr']:.3f}  recall@10 {full['recall@10']:.3f}  ({t_full:.2f} s)")

        narrowed = scorer.narrowed(test_data, pt_data, k=config.knn_k, collate_fn=lm_or_qa_collate, batch_size=64)
        nar = retrieval_metrics(narrowed.dense(fill=float(scores.min()) - 1.0), relevant)
        print(f"multi-stage influence, k-NN narrowed (k={config.knn_k}, {narrowed.n_candidates} of {narrowed.n_train} "
              f"candidates): MRR {nar['mrr']:.3f}  recall@10 {nar['recall@10']:.3f}  ({narrowed.seconds['total']:.2f} s, "
              f"estimated {narrowed.estimated_full_seconds:.2f} s without narrowing, saved {narrowed.seconds_saved:.2f} s)")

        q0 = world.test_questions[0]
        print(f"example: Q: {q0[0]}  A: {q0[1]}")
        for i, v in result.top_pairwise(3).as_rows()[0]["proponents"]:
            mark = "*" if relevant[0, i] else " "
            print(f"   {mark} {v:+.3e}  {world.corpus[i]}")
    print(f"total {time.perf_counter() - t_start:.1f} s")
    return {"full": full, "narrowed": nar, "ft_accuracy": tr.ft_accuracy, "test_accuracy": tr.test_accuracy}


if __name__ == "__main__":
    main()
