"""Tiny LoRA language models and token data for the LoRA tests (``peft``, the [peft] extra:
importing this module skips the importing test module without it)."""

from __future__ import annotations

import pytest
import torch

from lightning_influence import IndexedDataset
from lightning_influence.demos import CausalLMModule, synthetic_token_dataset, tiny_causal_lm

peft = pytest.importorskip("peft")  # the [peft] extra; `make test` installs it

VOCAB = 40  # differs from every width below (16, 32, 8): no layer has a vocabulary-sized side by accident
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
N = 12


def lora_module(arch: str = "llama", seed: int = 0, r: int = 2, init: bool = False) -> CausalLMModule:
    """A tiny LM with LoRA adapters (random ``B`` unless ``init``, so adapter gradients are not
    trivially zero), in float64, inside the library's ``CausalLMModule`` (lr = 0: fixed weights)."""
    targets = TARGETS if arch != "gpt2" else ["c_attn", "c_fc"]
    base = tiny_causal_lm(arch, vocab_size=VOCAB, hidden=16, layers=1, heads=2, max_len=16, seed=seed)
    torch.manual_seed(seed + 1)
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, lora_dropout=0.0, init_lora_weights=init,
                          fan_in_fan_out=arch == "gpt2")
    return CausalLMModule(peft.get_peft_model(base, cfg), lr=0.0).double()


def token_data(n: int = N, seed: int = 1) -> IndexedDataset:
    """``n`` synthetic token sequences (3 to 9 tokens over :data:`VOCAB`), ids ``0..n-1``."""
    return IndexedDataset(synthetic_token_dataset(n, vocab_size=VOCAB, min_len=3, max_len=9, seed=seed))
