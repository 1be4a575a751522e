"""EK-FAC at the size people train, on small configs that still take the real code paths: a
1-layer GPT-2 with the real vocabulary (50257), the pre-flight memory estimate, float32 factors
against a float64 reference, and the in-place accumulation (no per-batch or per-epoch copy)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import transformers
from torch.utils.data import DataLoader

from lightning_influence import EKFACInfluence, IndexedDataset, InfluenceScorer, load_factors
from lightning_influence.data import lm_collate
from lightning_influence.demos import CausalLMModule
from lightning_influence.ekfac.budget import FactorMemory
from lightning_influence.ekfac.fit import fit_factors, resolve_layers
from lightning_influence.memory import InsufficientMemoryError
from scaffold import exact, quiet_trainer

VOCAB = 50257


def gpt2_real_vocab(n_embd: int = 32) -> CausalLMModule:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=n_embd, n_head=2, vocab_size=VOCAB, n_positions=32, use_cache=False,
                                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return CausalLMModule(transformers.GPT2LMHeadModel(cfg), lr=0.0)


def sequences(n: int = 16, length: int = 12, seed: int = 0) -> IndexedDataset:
    g = torch.Generator().manual_seed(seed)
    return IndexedDataset([{"input_ids": torch.randint(0, VOCAB, (length,), generator=g)} for _ in range(n)])


def fit(tmp_path, cb, data, **kw) -> L.Trainer:
    return quiet_trainer(tmp_path, [cb], max_epochs=1, **kw)


def test_including_the_vocabulary_sized_head_on_purpose_is_refused_before_step_zero(tmp_path):
    """``layers='*'`` names GPT-2's tied head: its output side is the vocabulary, 50257² floats =
    10.1 GB per copy. The pre-flight estimate refuses at fit start, before any training step, with
    the numbers and the knob; the model's weights are untouched."""
    model = gpt2_real_vocab()
    model.lr = 1.0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cb = EKFACInfluence(layers="*", memory_budget=2**30, dirpath=str(tmp_path / "f"))
    with pytest.raises(InsufficientMemoryError) as info:
        fit(tmp_path, cb, None).fit(model, DataLoader(sequences(), batch_size=4, collate_fn=lm_collate))
    msg = str(info.value)
    head = VOCAB * VOCAB * 4
    assert f"model.lm_head (32×32 + {VOCAB}×{VOCAB}" in msg and "exclude=" in msg and "memory_budget" in msg
    assert "1.00 GiB" in msg and f"{(head + 32 * 32 * 4) / 2**30:.2f} GiB" in msg  # the head's sums, stated exactly
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # no step ran


def test_default_selection_fits_and_factors_leave_the_head_out(tmp_path):
    """At the defaults the same model trains: the head is left out (the selection's notice), the
    estimate is far below the machine's memory, and the factors cover the block's four layers."""
    model = gpt2_real_vocab()
    cb = EKFACInfluence(dirpath=str(tmp_path / "f"))
    fit(tmp_path, cb, None).fit(model, DataLoader(sequences(), batch_size=4, collate_fn=lm_collate))
    saved = load_factors(tmp_path / "f" / "factors", model=model)
    assert sorted(saved.layers) == sorted(f"model.transformer.h.0.{n}" for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    est = FactorMemory.of(cb.state.layers, 4, max_epochs=1)
    assert est.sums == sum((l.a_dim ** 2 + l.d_out ** 2) * 4 for l in cb.state.layers) < 2**20


def test_float32_factors_score_like_the_float64_reference(tmp_path):
    """Float32 training stores float32 eigenvectors and corrected eigenvalues (half the bytes of
    float64). Against factors fitted in float64 at the same weights (``lr=0``, every step
    counted, the same correction examples), pairwise scores agree to 1e-3 relative (max over
    the score matrix, relative to its largest entry)."""
    model = gpt2_real_vocab(n_embd=16)
    data = sequences(24)
    loader = DataLoader(data, batch_size=4, collate_fn=lm_collate)
    cb = exact(dirpath=str(tmp_path / "f"))
    fit(tmp_path, cb, None).fit(model, loader)
    f32 = load_factors(tmp_path / "f" / "factors", model=model)
    assert all(f.q_a.dtype == f.q_s.dtype == f.lambdas.dtype == torch.float32 for f in f32.layers.values())
    ref_model = gpt2_real_vocab(n_embd=16).double()
    ref_model.load_state_dict(model.state_dict())
    f64 = fit_factors(ref_model, loader, layers=[l.name for l in cb.state.layers])
    assert all(f.q_a.dtype == torch.float64 for f in f64.layers.values())
    queries = DataLoader(sequences(3, seed=1), batch_size=3, collate_fn=lm_collate)
    train = DataLoader(sequences(8, seed=2), batch_size=4, collate_fn=lm_collate)
    s64 = InfluenceScorer(ref_model, f64, damping=1e-3).pairwise(queries, train).pairwise
    s32 = InfluenceScorer(ref_model, f32, damping=1e-3).pairwise(queries, train).pairwise
    err = float((s32.double() - s64).abs().max() / s64.abs().max())
    assert err < 1e-3, err


def test_on_disk_factors_are_float32_and_half_the_float64_bytes(tmp_path):
    model = gpt2_real_vocab(n_embd=16)
    loader = DataLoader(sequences(8), batch_size=4, collate_fn=lm_collate)
    cb = EKFACInfluence(dirpath=str(tmp_path / "f"), factor_storage="exact")
    fit(tmp_path, cb, None).fit(model, loader)
    tensors = (tmp_path / "f" / "factors" / "tensors.safetensors").stat().st_size
    layers = cb.state.layers
    expected = sum((l.a_dim ** 2 + l.d_out ** 2 + l.a_dim * l.d_out) * 4 + (l.a_dim + l.d_out) * 8 for l in layers)
    assert expected <= tensors <= expected + 64 * 1024  # float32 Q's and Λ, float64 eigenvalues, plus the header
    # the default ("auto"): float16 Q's and bfloat16 Λ (tests/test_factor_storage.py checks the numbers)
    default = EKFACInfluence(dirpath=str(tmp_path / "g"))
    fit(tmp_path, default, None).fit(model, loader)
    small = sum((l.a_dim ** 2 + l.d_out ** 2 + l.a_dim * l.d_out) * 2 + (l.a_dim + l.d_out) * 8 for l in layers)
    assert small <= (tmp_path / "g" / "factors" / "tensors.safetensors").stat().st_size <= small + 64 * 1024


def test_training_holds_one_copy_of_the_sums_in_the_first_epoch():
    """No per-batch scratch and no clone at the first fold: the running sums *are* the first
    epoch's tensors (the same storage), so the first epoch holds one copy of the factors."""
    from lightning_influence.ekfac.online import AccumulationOptions, OnlineFactors
    from lightning_influence.task import CausalLMTask

    model = gpt2_real_vocab(n_embd=16)
    layers = resolve_layers(model, None)
    state = OnlineFactors(layers, AccumulationOptions(update_every_n_steps=1))
    assert not hasattr(state, "batch_accs")
    batch = lm_collate([sequences(2)[i] for i in range(2)])
    state.begin_epoch(0, 1)
    active, mask = state.begin_batch(batch, CausalLMTask(), 0, 1)
    a = torch.randn(2, 12, layers[0].a_dim)
    ds = torch.randn(2, 12, layers[0].d_out)
    state.observe(layers[0], a, ds, None)
    assert state.end_batch() is True
    epoch_tensor = state.epoch_accs[layers[0].name]._sums["a_sum"]
    state.end_epoch(0, 1, lambda t: t)
    assert state.running[layers[0].name]._sums["a_sum"].data_ptr() == epoch_tensor.data_ptr()
    torch.testing.assert_close(state.running[layers[0].name].a_sum, a.reshape(-1, a.shape[-1]).T @ a.reshape(-1, a.shape[-1]))


def test_training_state_counts_gradients_and_lazy_optimizer_state():
    """What training allocates after ``fit`` starts, by optimizer (explicit parameter counts)."""
    from lightning_influence.memory import TrainingState

    model = torch.nn.Sequential(torch.nn.Linear(10, 5), torch.nn.Linear(5, 3, bias=False))
    model[1].weight.requires_grad_(False)  # frozen: neither gradient nor state
    n = (10 * 5 + 5) * 4
    cases = [(torch.optim.AdamW(model.parameters()), 2), (torch.optim.Adam(model.parameters(), amsgrad=True), 3),
             (torch.optim.SGD(model.parameters(), lr=0.1), 0), (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), 1),
             (torch.optim.RMSprop(model.parameters(), momentum=0.9, centered=True), 3)]
    for opt, copies in cases:
        state = TrainingState.of(model, [opt])
        assert (state.gradients, state.optimizer, state.total) == (n, copies * n, (1 + copies) * n), type(opt).__name__
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 10)).sum().backward()
    opt.step()  # a resumed run: gradients and state exist already
    assert TrainingState.of(model, [opt]).total == 0


def test_preflight_counts_the_optimizer_state_training_will_allocate(tmp_path):
    """A budget that holds the factors but not the factors plus AdamW's lazily created state and
    the gradients (2 + 1 parameter-sized buffers, about 20 MB for this model) is refused before
    step 0, naming the optimizer; the factors' own estimate is far below it."""
    from lightning_influence.memory import TrainingState

    model = gpt2_real_vocab()
    params = sum(p.numel() * 4 for p in model.parameters())
    layers = resolve_layers(model, None)
    layers = [l for l in layers if "lm_head" not in l.name]
    factors_only = FactorMemory.of(layers, 4, max_epochs=1).peak
    budget = factors_only + params  # room for the factors and one more copy of the weights, not three
    assert factors_only < 2**20 < params
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.lr = 1.0
    cb = EKFACInfluence(memory_budget=budget, dirpath=str(tmp_path / "f"))
    with pytest.raises(InsufficientMemoryError) as info:
        fit(tmp_path, cb, None).fit(model, DataLoader(sequences(), batch_size=4, collate_fn=lm_collate))
    msg = str(info.value)
    assert "AdamW state" in msg and "gradients" in msg
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # no step ran
    assert TrainingState.of(model, [torch.optim.AdamW(model.parameters())]).total == 3 * params
    cb = EKFACInfluence(memory_budget=factors_only + 4 * params, dirpath=str(tmp_path / "g"))  # enough: it trains
    fit(tmp_path / "g", cb, None).fit(model, DataLoader(sequences(), batch_size=4, collate_fn=lm_collate))
    assert (tmp_path / "g" / "factors" / "manifest.json").exists()
