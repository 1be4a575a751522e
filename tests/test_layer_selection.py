"""The default layer selection: vocabulary-sized (embedding/unembedding) layers and, in a partly
frozen model, frozen layers are left out with one log line; explicit patterns include them."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_influence import EKFACInfluence, IndexedDataset, load_factors
from lightning_influence.data import lm_collate
from lightning_influence.demos import CausalLMModule, MLPClassifier, synthetic_token_dataset
from lightning_influence.layers import LayerSelectionError, select_layers
from lightning_influence.layers.selection import default_exclusions
from scaffold import quiet_trainer

LOGGER = "lightning_influence.layers.selection"


def notices(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def gpt2_real_vocab(seed: int = 0):
    """A 1-layer GPT-2 with the real vocabulary (50257) and width 32; n_positions equals the width,
    so a rule that took the positional table for the vocabulary would leave out every layer."""
    import transformers

    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
                                  attn_pdrop=0.0)
    assert cfg.vocab_size == 50257
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(cfg)
    model.config.use_cache = False
    return model


BLOCK = ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]


def test_gpt2_real_vocabulary_head_left_out_by_default_with_one_notice(caplog):
    model = gpt2_real_vocab()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        names = [l.name for l in select_layers(model)]
    assert names == BLOCK
    (msg,) = notices(caplog)  # exactly one line
    assert "lm_head" in msg and "weight tied to embedding 'transformer.wte'" in msg and "layers=" in msg
    assert caplog.records[-1].levelno == logging.WARNING
    # naming the head includes it (and logs nothing); layers="*" is every supported layer
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert [l.name for l in select_layers(model, ["*mlp.c_fc", "lm_head"])] == ["transformer.h.0.mlp.c_fc", "lm_head"]
        assert [l.name for l in select_layers(model, "*")] == BLOCK + ["lm_head"]
    assert notices(caplog) == []
    # an exclusion of the head stays valid (it names a supported layer) and changes nothing
    assert [l.name for l in select_layers(model, exclude="*lm_head")] == BLOCK


def test_untied_head_left_out_by_its_width_not_by_positional_tables():
    model = gpt2_real_vocab()
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())  # untie
    reasons = default_exclusions(model, select_layers(model, "*"))
    assert reasons == {"lm_head": "output width 50257 = vocabulary size"}


class PlainLM(nn.Module):
    """A plain-torch LM: token and position tables, a hidden layer whose width equals the
    position table's rows, and an output layer of the vocabulary's width."""

    def __init__(self, vocab: int = 40, positions: int = 12, d: int = 12, tied: bool = False) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(positions, d)
        self.hidden = nn.Linear(d, positions)
        self.proj = nn.Linear(positions, d)
        self.out = nn.Linear(d, vocab, bias=False)
        if tied:
            self.out.weight = self.tok.weight

    def forward(self, ids):
        h = self.tok(ids) + self.pos(torch.arange(ids.shape[1]))
        return self.out(self.proj(torch.tanh(self.hidden(h))))


@pytest.mark.parametrize("tied", [False, True])
def test_plain_model_vocabulary_is_the_largest_table(tied, caplog):
    model = PlainLM(tied=tied)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert [l.name for l in select_layers(model)] == ["hidden", "proj"]
    (msg,) = notices(caplog)
    assert ("out: weight tied to embedding 'tok'" if tied else "out: output width 40 = vocabulary size") in msg


def test_partly_frozen_model_tracks_trainable_layers_only(caplog):
    model = gpt2_real_vocab()
    for name, p in model.named_parameters():
        p.requires_grad_("mlp" in name)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert [l.name for l in select_layers(model)] == ["transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]
    (msg,) = notices(caplog)  # one line for both kinds
    assert "2 frozen layer(s)" in msg and "transformer.h.0.attn.c_attn" in msg and "lm_head" in msg
    # explicit patterns include frozen layers
    assert [l.name for l in select_layers(model, "*attn.*")] == BLOCK[:2]
    # a wholly frozen model (e.g. frozen for scoring) is not "partly frozen": nothing is left out for it
    model.requires_grad_(False)
    assert [l.name for l in select_layers(model)] == BLOCK


def test_nothing_left_out_of_an_mlp_and_no_notice(caplog):
    model = MLPClassifier(d_in=8, hidden=6, n_classes=3)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert [l.name for l in select_layers(model)] == [l.name for l in select_layers(model, "*")]
    assert notices(caplog) == []


def test_everything_left_out_is_an_error_that_says_how_to_include():
    model = nn.Sequential(nn.Embedding(30, 8), nn.Linear(8, 30))
    with pytest.raises(LayerSelectionError, match=r"every supported layer is left out.*1: output width 30.*layers="):
        select_layers(model)
    assert [l.name for l in select_layers(model, "1")] == ["1"]


def test_ekfac_callback_default_on_real_vocabulary_gpt2(tmp_path, caplog):
    """EKFACInfluence() at its defaults on the real-vocabulary GPT-2 finishes and its factors
    hold the block's layers only (the head's output factor alone would be 50257² floats)."""
    module = CausalLMModule(gpt2_real_vocab(), lr=0.0)
    data = IndexedDataset(synthetic_token_dataset(8, vocab_size=200, min_len=3, max_len=8, seed=0))
    cb = EKFACInfluence(dirpath=str(tmp_path / "ekfac"))
    with caplog.at_level(logging.INFO, logger=LOGGER):
        quiet_trainer(tmp_path, [cb], max_epochs=1).fit(module, DataLoader(data, batch_size=4, collate_fn=lm_collate))
    saved = load_factors(tmp_path / "ekfac" / "factors", model=module)
    assert saved.layer_names == ["model." + n for n in BLOCK]
    assert any("model.lm_head" in m for m in notices(caplog))
