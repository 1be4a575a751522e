"""Which training sequences made a transformers causal LM give this answer, and which tokens of them?

A GPT-2 (transformers ``GPT2LMHeadModel``, built from a small config: no download) learns
sentences ``"a + b = c"`` over a word-level vocabulary (``c = (a + b) mod 10``) inside a
LightningModule with ``EKFACInfluence`` attached. We then let it *generate* the answer to a
prompt, and ask which training sequences most support that generated answer: the measurement
is the loss of the answer tokens only, given the prompt (labels ``-100`` on the prompt).

A sequence's loss is the sum of its token losses, so its influence is the sum of per-token
influences: scoring each training token's loss term on its own shows *which tokens* of a
proponent carry its influence. The scores are saved beside the factors and the HTML report
(``runs/huggingface_lm/influence/plots/report.html``) shows the query and its proponents and
opponents as text, each token coloured by its share (green helps, red hurts).

    python examples/huggingface_lm.py
    LI_EXAMPLE_QUICK=1 python examples/huggingface_lm.py   # reduced size
"""

from __future__ import annotations

import logging
import os
import warnings
from itertools import product
from pathlib import Path

import lightning as L
import torch
import transformers
from torch.utils.data import DataLoader

from lightning_influence import EKFACInfluence, IndexedDataset, InfluenceScorer, load_factors, save_scores
from lightning_influence.data import lm_collate
from lightning_influence.demos import CausalLMModule, tiny_causal_lm
from lightning_influence.report import write_html_report

WORDS = ["<pad>", "<bos>", "+", "="] + [str(d) for d in range(10)]
ID = {w: i for i, w in enumerate(WORDS)}


def encode(text: str) -> torch.Tensor:
    return torch.tensor([ID["<bos>"]] + [ID[w] for w in text.split()])


def decode(ids) -> str:
    return " ".join(WORDS[i] for i in ids if WORDS[i] not in ("<pad>", "<bos>"))


class WordTokenizer:
    """The example's word-level vocabulary as a tokenizer: the report decodes one token at a time
    with ``decode([id])`` (a Hugging Face tokenizer works the same way)."""

    def decode(self, ids) -> str:
        return " ".join(WORDS[int(i)] for i in ids)


def per_token_scores(scorer: InfluenceScorer, query, sequences: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """``{train id: Tensor[T-1]}``: the influence of each predicted token's loss term of each
    sequence on the query (token ``t`` predicted from tokens ``< t``); each row sums to the
    sequence's score because the sequence loss is the sum of its token losses."""
    items, owners = [], []
    for i, ids in sequences.items():
        for t in range(1, len(ids)):  # the loss term of target token t only
            labels = torch.full_like(ids, -100)
            labels[t] = ids[t]
            items.append((len(items), {"input_ids": ids, "labels": labels}))
            owners.append(i)

    def collate(batch):
        ids, dicts = zip(*batch)
        out = lm_collate([{"input_ids": d["input_ids"]} for d in dicts])
        width = out["input_ids"].shape[1]
        out["labels"] = torch.stack([torch.nn.functional.pad(d["labels"], (0, width - len(d["labels"])), value=-100) for d in dicts])
        return torch.tensor(ids), out

    flat = scorer.pairwise(query, DataLoader(items, batch_size=64, collate_fn=collate)).pairwise[0]
    out: dict[int, list] = {}
    for owner, s in zip(owners, flat.tolist()):
        out.setdefault(owner, []).append(s)
    return {i: torch.tensor(v) for i, v in out.items()}


def main(quick: bool = False) -> list[str]:
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*(validation_step|LeafSpec|log_every_n_steps|does not have many workers).*")
    transformers.logging.set_verbosity_error()  # the tiny config's notes on defaults
    L.seed_everything(0, verbose=False)
    sentences = [f"{a} + {b} = {(a + b) % 10}" for a, b in product(range(10), range(10))]
    train = IndexedDataset([{"input_ids": encode(s)} for s in sentences])
    loader = DataLoader(train, batch_size=20, shuffle=True, collate_fn=lm_collate)
    model = CausalLMModule(tiny_causal_lm("gpt2", vocab_size=len(WORDS), hidden=32 if quick else 64, layers=2, heads=2, max_len=16), lr=3e-3)
    model.tokenizer = WordTokenizer()  # how the report shows token ids
    ekfac = EKFACInfluence(exclude="*lm_head", epochs=5)
    trainer = L.Trainer(max_epochs=15 if quick else 60, accelerator="cpu", logger=False, callbacks=[ekfac],
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        default_root_dir="runs/huggingface_lm")
    trainer.fit(model, loader)

    # generate an answer
    prompt = encode("3 + 4 =")[None]
    lm = model.model.eval()
    with torch.no_grad():
        out = lm.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=1, do_sample=False, pad_token_id=0)
    answer = out[0, prompt.shape[1]:]
    print(f"\nprompt: '{decode(prompt[0])}'  generated answer: '{decode(answer)}'  (true: {(3 + 4) % 10})")

    # measurement: loss of the answer tokens only, given the prompt
    labels = out.clone()
    labels[:, : prompt.shape[1]] = -100
    query = [(torch.tensor([0]), {"input_ids": out, "attention_mask": torch.ones_like(out), "labels": labels})]
    factors = load_factors(ekfac.factors_path, model=model)
    scorer = InfluenceScorer(model, factors)
    result = scorer.pairwise(query, DataLoader(train, batch_size=50, collate_fn=lm_collate))
    scores = result.pairwise[0]
    order = torch.argsort(scores, descending=True)
    print("\nmost helpful training sequences (proponents):")
    top = []
    for i in order[:5].tolist():
        top.append(sentences[i])
        print(f"  {scores[i]:+10.3f}  {sentences[i]}")
    print("most harmful training sequences (opponents):")
    for i in order[-3:].flip(0).tolist():
        print(f"  {scores[i]:+10.3f}  {sentences[i]}")

    # which tokens carry the influence, for the sequences the report shows
    shown = order[:5].tolist() + order[-5:].tolist()
    tokens = per_token_scores(scorer, query, {i: train[i][1]["input_ids"] for i in shown})
    gap = max(abs(float(tokens[i].sum()) - float(scores[i])) for i in shown)
    print(f"\nper-token influence of the top sequences: rows sum to the sequence scores (largest gap {gap:.2e})")
    for i in order[:2].tolist():
        parts = "  ".join(f"{WORDS[int(t)]}:{s:+.2f}" for t, s in zip(train[i][1]["input_ids"][1:], tokens[i].tolist()))
        print(f"  {sentences[i]:<12} {parts}")

    # save the query's scores beside the factors and write the HTML report
    result.meta["callback"] = "generated_answer"
    influence = Path(ekfac.factors_path).parent.parent
    save_scores(result, influence / "posthoc" / "generated_answer", top_k=5)
    queries = IndexedDataset([{"input_ids": out[0], "labels": labels[0]}])  # the answer token is what is measured
    page = write_html_report(influence, datasets={"train": train, "queries": queries}, tokenizer=WordTokenizer(),
                             token_scores={(0, i): t for i, t in tokens.items()}, top_k=5, queries=1)
    print(f"wrote {page}")
    return top


if __name__ == "__main__":
    main(quick=os.environ.get("LI_EXAMPLE_QUICK") == "1")
