"""Which training sequences made a transformers causal LM give this answer?

A GPT-2 (transformers ``GPT2LMHeadModel``, built from a small config: no download) learns
sentences ``"a + b = c"`` over a word-level vocabulary (``c = (a + b) mod 10``) inside a
LightningModule with ``EKFACInfluence`` attached. We then let it *generate* the answer to a
prompt, and ask which training sequences most support that generated answer: the measurement
is the loss of the answer tokens only, given the prompt (labels ``-100`` on the prompt).

    python examples/huggingface_lm.py
    LI_EXAMPLE_QUICK=1 python examples/huggingface_lm.py   # reduced size
"""

from __future__ import annotations

import os
from itertools import product

import lightning as L
import torch
from torch.utils.data import DataLoader

from lightning_influence import EKFACInfluence, IndexedDataset, InfluenceScorer, load_factors
from lightning_influence.demos import CausalLMModule, tiny_causal_lm
from lightning_influence.data import lm_collate

WORDS = ["<pad>", "<bos>", "+", "="] + [str(d) for d in range(10)]
ID = {w: i for i, w in enumerate(WORDS)}


def encode(text: str) -> torch.Tensor:
    return torch.tensor([ID["<bos>"]] + [ID[w] for w in text.split()])


def decode(ids) -> str:
    return " ".join(WORDS[i] for i in ids if WORDS[i] not in ("<pad>", "<bos>"))


def main(quick: bool = False) -> list[str]:
    L.seed_everything(0, verbose=False)
    sentences = [f"{a} + {b} = {(a + b) % 10}" for a, b in product(range(10), range(10))]
    train = IndexedDataset([{"input_ids": encode(s)} for s in sentences])
    loader = DataLoader(train, batch_size=20, shuffle=True, collate_fn=lm_collate)
    model = CausalLMModule(tiny_causal_lm("gpt2", vocab_size=len(WORDS), hidden=32 if quick else 64, layers=2, heads=2, max_len=16), lr=3e-3)
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
    scores = scorer.pairwise(query, DataLoader(train, batch_size=50, collate_fn=lm_collate)).pairwise[0]
    order = torch.argsort(scores, descending=True)
    print("\nmost helpful training sequences (proponents):")
    top = []
    for i in order[:5].tolist():
        top.append(sentences[i])
        print(f"  {scores[i]:+10.3f}  {sentences[i]}")
    print("most harmful training sequences (opponents):")
    for i in order[-3:].flip(0).tolist():
        print(f"  {scores[i]:+10.3f}  {sentences[i]}")
    return top


if __name__ == "__main__":
    main(quick=os.environ.get("LI_EXAMPLE_QUICK") == "1")
