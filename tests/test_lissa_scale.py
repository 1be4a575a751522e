"""LiSSA at scale (issue 20) and the sign of its self-influence (issue 21), against independent
references: an untied copy of a tied GPT-2 with the real vocabulary, dense float64 matrices,
and the plain recursion's arithmetic."""

from __future__ import annotations

import dataclasses
from functools import partial
import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_influence.lissa import (
    CurvatureOperator,
    LiSSADivergenceError,
    LiSSAMemoryError,
    LiSSAOptions,
    lissa_quadratic,
    lissa_recursion,
    plan_memory,
    self_influence,
)
from lightning_influence.lissa import budget, curvature
from lightning_influence.lissa.samplers import RandomSampler
from lightning_influence.memory import InsufficientMemoryError
from lightning_influence.task import CausalLMTask, ClassificationTask
from cases import tanh_mlp_problem
from scaffold import quiet_trainer

VOCAB, EMBD, SEQ, N_LM = 50257, 32, 12, 3


# ------------------------------------------------------------------------------ tied parameters
@pytest.fixture(scope="module")
def tied_gpt2():
    """A 1-layer GPT-2 with the real vocabulary and tied embeddings (float64), an untied copy
    with the same values (the reference), and one batch."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = dict(vocab_size=VOCAB, n_embd=EMBD, n_layer=1, n_head=2, n_positions=32)
    torch.manual_seed(0)
    tied = GPT2LMHeadModel(GPT2Config(**cfg)).double().eval()
    assert tied.lm_head.weight is tied.transformer.wte.weight
    untied = GPT2LMHeadModel(GPT2Config(**cfg, tie_word_embeddings=False)).double().eval()
    state = {k: v.clone() for k, v in tied.state_dict().items()}
    state["lm_head.weight"] = tied.transformer.wte.weight.detach().clone()
    untied.load_state_dict(state)
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    ids = torch.randint(0, VOCAB, (N_LM, SEQ), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return tied, untied, batch


def _ref_losses(untied, head, emb, batch, rows):
    """Per-example summed token cross-entropy of the untied copy with (head, embedding) swapped in."""
    out = torch.func.functional_call(untied, {"lm_head.weight": head, "transformer.wte.weight": emb}, (),
                                      {"input_ids": batch["input_ids"][rows], "attention_mask": batch["attention_mask"][rows]})
    logits = out.logits[:, :-1]
    labels = batch["input_ids"][rows][:, 1:]
    return F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), reduction="none").view(labels.shape).sum(1)


def _ref_hvp(untied, batch, w, v):
    """``H_tied v`` from the untied copy: the tied tensor's Hessian is the sum of the four blocks
    of (head, embedding), i.e. ``[I I] H_untied [I; I] v``."""
    head = w.clone().requires_grad_(True)
    emb = w.clone().requires_grad_(True)
    with sdpa_kernel(SDPBackend.MATH):  # the fused CPU attention kernel has no double backward
        loss = _ref_losses(untied, head, emb, batch, torch.arange(N_LM)).mean()
        gh, ge = torch.autograd.grad(loss, (head, emb), create_graph=True)
        hh, he = torch.autograd.grad((gh * v).sum() + (ge * v).sum(), (head, emb))
    return (hh + he).detach()


def test_last_layer_of_tied_gpt2_is_one_tensor_differentiated_through_both_uses(tied_gpt2):
    tied, untied, batch = tied_gpt2
    op = CurvatureOperator(tied, CausalLMTask(), params="last_layer")  # raised "functional_call got multiple values"
    assert op.names == ["lm_head.weight"] and op.tied == {"lm_head.weight": ["transformer.wte.weight"]}
    assert op.num_params == VOCAB * EMBD
    w = tied.lm_head.weight.detach()
    # per-example gradients: head use + embedding use, from the untied copy
    g = op.per_example_grads(batch)
    for i in range(N_LM):
        head, emb = w.clone().requires_grad_(True), w.clone().requires_grad_(True)
        gh, ge = torch.autograd.grad(_ref_losses(untied, head, emb, batch, torch.tensor([i])).sum(), (head, emb))
        assert ge.abs().sum() > 0 and gh.abs().sum() > 0  # both uses matter
        torch.testing.assert_close(g[i], (gh + ge).reshape(-1), rtol=1e-9, atol=1e-12)
    # Hessian- and GGN-free check: the Hessian-vector product equals the four untied blocks summed
    v = torch.randn(2, op.num_params, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = op.matvec(batch, v)
    for k in range(2):
        ref = _ref_hvp(untied, batch, w, v[k].view_as(w)).reshape(-1)
        torch.testing.assert_close(got[k], ref, rtol=1e-8, atol=1e-10)
    # the same tensor selected under its other name gives the same operator
    other = CurvatureOperator(tied, CausalLMTask(), params="transformer.wte.weight")
    torch.testing.assert_close(other.matvec(batch, v), got, rtol=1e-12, atol=0)


def test_self_influence_on_tied_last_layer_equals_the_series_of_the_untied_reference(tied_gpt2):
    """Whole pool every step (deterministic): the score is ``(1/s) Σ_{t<2T} gᵀ(I − A/s)ᵗ g`` with
    ``A = H + λI``, evaluated here with the untied copy's Hessian-vector products."""
    tied, untied, batch = tied_gpt2
    pool = [{"input_ids": batch["input_ids"][i], "attention_mask": batch["attention_mask"][i]} for i in range(N_LM)]
    w = tied.lm_head.weight.detach()
    g = CurvatureOperator(tied, CausalLMTask(), params="last_layer").per_example_grads(batch)
    # a valid scale from the reference: 30 power iterations on H, times 1.5
    u = torch.randn_like(w)
    for _ in range(30):
        hu = _ref_hvp(untied, batch, w, u / u.norm())
        top, u = float(hu.norm()), hu
    damping, depth = 0.2 * top, 3
    scale = 1.5 * (top + damping)
    expected = []
    for i in range(N_LM):
        h, total = g[i].view_as(w).clone(), 0.0
        for _ in range(2 * depth):
            total += float((g[i].view_as(w) * h).sum())
            h = h - (_ref_hvp(untied, batch, w, h) + damping * h) / scale
        expected.append(total / scale)
    opts = LiSSAOptions(sampler=RandomSampler(sample_size=N_LM), params="last_layer", damping=damping, scale=scale,
                        depth=depth, tol=None)
    res = self_influence(tied, [batch], pool, opts,
                         task=CausalLMTask())
    assert res.meta["num_params"] == VOCAB * EMBD and res.meta["steps"] == [depth]
    torch.testing.assert_close(res.self_influence, torch.tensor(expected, dtype=torch.float64), rtol=1e-7, atol=0)
    assert bool((res.self_influence > 0).all())


# ------------------------------------------------------------------------------ memory budget
D_IN, HID, C, N = 6, 5, 3, 40


_problem = partial(tanh_mlp_problem, n=N, hid=HID, d_in=D_IN, n_classes=C)


def test_plan_memory_arithmetic_and_refusal_with_the_numbers_and_knobs():
    P, item, act, B = 1000, 8, 64_000, 32  # 8 kB per P-vector, 2 kB of activations per example
    pv = budget.RESIDENT_COPIES * P * item
    graph = lambda m: int(budget.GRAPH_ACTIVATION_FACTOR * act / B * m) + P * item  # noqa: E731
    prod = lambda m: int(budget.PRODUCT_ACTIVATION_FACTOR * act / B * m) + budget.PRODUCT_PARAM_COPIES * P * item  # noqa: E731
    # everything fits: the whole chunk, whole mini-batches, every vector in one vmap
    big = plan_memory(num_params=P, itemsize=item, activation_bytes=act, chunk_size=16, sample_size=B, device="cpu",
                      memory_budget=10**9, available=2 * 10**9)
    assert (big.chunk_size, big.examples_per_product, big.vectors_per_product) == (16, B, 16)
    assert big.budget == 10**9 and big.estimated_peak <= big.budget
    # default budget: 60% of what is available
    assert plan_memory(num_params=P, itemsize=item, activation_bytes=act, chunk_size=4, sample_size=B, device="cpu",
                       available=10**8).budget == int(0.6 * 10**8)
    # tight: the chunk takes at most half, the mini-batch is split into the largest parts that fit the rest
    tight = 12 * pv + graph(B) // 2
    p = plan_memory(num_params=P, itemsize=item, activation_bytes=act, chunk_size=256, sample_size=B, device="cpu",
                    memory_budget=tight)
    assert p.chunk_size == (tight // 2) // pv
    room = tight - p.chunk_size * pv
    m = p.examples_per_product
    assert 1 <= m < B and graph(m) + prod(m) <= room < graph(m + 1) + prod(m + 1)
    assert p.vectors_per_product == max(1, min(p.chunk_size, (room - graph(m)) // prod(m)))
    assert p.estimated_peak <= tight
    # not one vector: refused before anything runs, with the numbers and the knobs
    with pytest.raises(LiSSAMemoryError, match=r"needs about .* for a single vector .* budget is .*P=1,000 .*params=.*"
                                               r"sample_size.*chunk_size.*memory_budget") as e:
        plan_memory(num_params=P, itemsize=item, activation_bytes=act, chunk_size=4, sample_size=B, device="cpu",
                    memory_budget=pv)
    assert isinstance(e.value, InsufficientMemoryError) and e.value.plan.num_params == P


def test_budgeted_run_carries_fewer_vectors_and_examples_and_scores_the_same():
    """A budget that forces small chunks, split mini-batches and one vector per vmap changes the
    memory, not the scores (float64, the same seeded mini-batches)."""
    model, ds, x, y = _problem(1)
    probe = [(torch.arange(N), (x, y))]
    opts = LiSSAOptions(sample_size=16, damping=0.3, scale=8.0, depth=6, tol=None, chunk_size=64)
    free = self_influence(model, probe, ds, opts)
    assert free.meta["memory"]["chunk_size"] == 64 and free.meta["memory"]["examples_per_product"] == 16
    assert len(free.meta["steps"]) == 1  # one chunk holds the whole probe
    P = free.meta["num_params"]
    tiny = budget.RESIDENT_COPIES * P * 8 * 7  # room for a few vectors only
    small = self_influence(model, probe, ds, dataclasses.replace(opts, memory_budget=tiny))
    mem = small.meta["memory"]
    assert mem["budget"] == tiny and mem["chunk_size"] < N and mem["examples_per_product"] < 16
    assert mem["vectors_per_product"] <= mem["chunk_size"]
    assert len(small.meta["steps"]) == math.ceil(N / mem["chunk_size"])
    torch.testing.assert_close(small.self_influence, free.self_influence, rtol=1e-10, atol=0)
    with pytest.raises(LiSSAMemoryError, match=r"memory_budget"):
        self_influence(model, probe, ds, dataclasses.replace(opts, memory_budget=P * 8))


def test_out_of_memory_in_a_product_is_reported_as_such_never_retried_in_a_loop(monkeypatch):
    model, ds, x, y = _problem(2)
    op = CurvatureOperator(model, ClassificationTask())
    v = torch.randn(3, op.num_params, dtype=torch.float64)
    expected = op.matvec((x, y), v)

    def oom_vmap(fn, *a, **k):
        def run(*args, **kwargs):
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried "
                               "to allocate 18574942208 bytes. Error code 12 (Cannot allocate memory)")
        return run

    monkeypatch.setattr(curvature, "vmap", oom_vmap)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "looping over vectors instead" warning
        with pytest.raises(LiSSAMemoryError, match=r"ran out of memory in the hessian curvature product of 3 vectors.*"
                                                   r"can't allocate memory.*params=.*memory_budget") as e:
            op.matvec((x, y), v)
        with pytest.raises(LiSSAMemoryError, match=r"ran out of memory in the per-example gradients"):
            op.per_example_grads((x, y))
    assert isinstance(e.value.__cause__, RuntimeError)

    # an operation vmap cannot batch (not memory) may still fall back to the loop, with a warning
    def unsupported_vmap(fn, *a, **k):
        def run(*args, **kwargs):
            raise RuntimeError("vmap: It looks like you're calling .item() on a Tensor")
        return run

    monkeypatch.setattr(curvature, "vmap", unsupported_vmap)
    curvature._WARNED.clear()
    with pytest.warns(RuntimeWarning, match="vmap is not supported by an operation"):
        looped = op.matvec((x, y), v)
    torch.testing.assert_close(looped, expected, rtol=1e-12, atol=1e-14)


def test_split_mini_batches_and_vector_blocks_give_the_same_products():
    model, ds, x, y = _problem(3)
    for curv in ("hessian", "ggn"):
        whole = CurvatureOperator(model, ClassificationTask(), curvature=curv)
        parts = CurvatureOperator(model, ClassificationTask(), curvature=curv, max_vectors=2, max_examples=7)
        v = torch.randn(5, whole.num_params, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        torch.testing.assert_close(parts.matvec((x, y), v), whole.matvec((x, y), v), rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(parts.per_example_grads((x, y)), whole.per_example_grads((x, y)), rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------ bounded work
def test_auto_estimate_is_bounded_and_time_budget_lowers_the_depth_for_every_chunk():
    model, ds, x, y = _problem(4)
    probe = [(torch.arange(N), (x, y))]
    opts = LiSSAOptions(sample_size=16, depth=12, tol=None, chunk_size=15)
    full = self_influence(model, probe, ds, opts)
    assert full.meta["depth"] == 12 and not full.meta["budget_limited"] and full.meta["steps"] == [12, 12, 12]
    assert full.meta["sample_size"] == 16 and not full.meta["sample_limited"]
    assert 3 * 2 <= full.meta["auto_products"] <= 3 * 8
    with pytest.warns(RuntimeWarning) as caught:
        cut = self_influence(model, probe, ds, dataclasses.replace(opts, time_budget=1e-6))
    said = [str(w.message) for w in caught]
    # first the mini-batch shrinks (before the auto estimate), then the depth is cut
    assert any(re.search(r"time_budget=1e-06 s cannot afford 10 steps for 40 probe examples at sample_size=16 .*each step "
                         r"draws 1 example instead.*Raise LiSSAOptions\(time_budget", m) for m in said), said
    assert any(re.search(r"time_budget=1e-06 s allows depth 1 of 12 .*Even depth 1 exceeds the budget: the run will take "
                         r"about .* s in all.*Raise LiSSAOptions\(time_budget", m) for m in said), said
    assert cut.meta["sample_size"] == 1 and cut.meta["sample_limited"]
    assert cut.meta["depth"] == 1 and cut.meta["budget_limited"] and cut.meta["steps"] == [1, 1, 1]
    assert cut.meta["auto_products"] == 2  # past the budget: one mini-batch, the minimum of 2 iterations
    # the cut run is exactly the depth-1, one-example-per-step estimator with the same damping and scale
    d1 = dataclasses.replace(opts, depth=1, sample_size=1, damping=cut.meta["damping"], scale=cut.meta["scale"])
    torch.testing.assert_close(cut.self_influence, self_influence(model, probe, ds, d1).self_influence, rtol=1e-12, atol=0)


def test_progress_bar_over_the_recursion_steps(capsys):
    model, ds, x, y = _problem(5)
    self_influence(model, [(torch.arange(N), (x, y))], ds, LiSSAOptions(sample_size=8, depth=3, tol=None, chunk_size=20),
                   progress=True)
    err = capsys.readouterr().err
    assert "LiSSA self-influence" in err and "step" in err


# ------------------------------------------------------------------------------ sign (issue 21)
def test_quadratic_recursion_is_a_non_negative_series_and_refuses_where_the_plain_one_turns_negative():
    """Without noise the quadratic recursion is the Neumann series of ``vᵀ(H + λI)⁻¹v`` to order
    ``2T − 1`` (dense reference), also for an indefinite ``H`` (whose negative directions get a
    positive weight). Where a mini-batch's curvature exceeds ``2s`` in a direction, the plain
    recursion's ``vᵀh`` alternates in sign and can end negative with no error; the quadratic
    recursion refuses with a suggested scale. Under heavy mini-batch noise it stays ``≥ 0``."""
    g = torch.Generator().manual_seed(0)
    P, s, lam = 12, 6.0, 0.01
    q = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=torch.float64))[0]
    eye = torch.eye(P, dtype=torch.float64)
    for evals in (torch.linspace(0.05, 1.0, P, dtype=torch.float64), torch.linspace(-0.3, 1.0, P, dtype=torch.float64)):
        H = q @ torch.diag(evals) @ q.T
        v = torch.randn(50, P, generator=g, dtype=torch.float64)
        got = lissa_quadratic(lambda h, step: h @ H, v, damping=lam, scale=s, depth=30)
        M, series, term = eye - (H + lam * eye) / s, torch.zeros(50, dtype=torch.float64), v.clone()
        for _ in range(2 * 30):
            series += (v * term).sum(1)
            term = term @ M
        torch.testing.assert_close(got.estimate, series / s, rtol=1e-10, atol=0)
        assert bool((got.estimate > 0).all())
        # iterating in the vectors' own storage (self_influence's memory saving) gives the same numbers
        w = v.clone()
        same = lissa_quadratic(lambda h, step: h @ H, w, damping=lam, scale=s, depth=30, tol=1e-3, overwrite=True)
        ref = lissa_quadratic(lambda h, step: h @ H, v, damping=lam, scale=s, depth=30, tol=1e-3)
        torch.testing.assert_close(same.estimate, ref.estimate, rtol=0, atol=0)
        assert not torch.equal(w, v)  # overwritten, as documented
        # flagged: vectors whose iterates met net negative curvature (only possible when H + λI is indefinite)
        assert bool(got.negative_curvature.any()) == bool(evals.min() < -lam)
    # one direction with curvature 2.1 s: the plain recursion's quadratic form alternates and ends negative
    H = q @ torch.diag(torch.cat([torch.tensor([2.1 * s]), torch.linspace(0.05, 1.0, P - 1)]).double()) @ q.T
    v = q[:, :1].T.clone()
    plain = float((v * lissa_recursion(lambda h, step: h @ H, v, damping=0.0, scale=s, depth=5).estimate).sum())
    assert plain < 0  # silently negative: the failure issue 21 reports
    with pytest.raises(LiSSADivergenceError, match=r"exceeds twice scale=6.0.*raise `scale` to at least") as e:
        lissa_quadratic(lambda h, step: h @ H, v, damping=0.0, scale=s, depth=5)
    assert e.value.parameter == "scale" and e.value.suggested_scale > 2 * s
    # heavy noise around a positive definite mean: every estimate >= 0
    H = q @ torch.diag(torch.linspace(0.001, 1.0, P, dtype=torch.float64)) @ q.T
    noise = [0.8 * (lambda e: (e + e.T) / 2)(torch.randn(P, P, generator=g, dtype=torch.float64)) for _ in range(64)]
    v = torch.randn(200, P, generator=g, dtype=torch.float64)
    noisy = lissa_quadratic(lambda h, step: h @ (H + noise[step % 64]), v, damping=0.0, scale=s, depth=30)
    assert bool((noisy.estimate >= 0).all())


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), hid=st.integers(2, 8), n=st.integers(8, 30), sample=st.integers(1, 8),
       curvature_=st.sampled_from(["hessian", "ggn"]), damping=st.sampled_from(["auto", 0.0, 1e-3]),
       depth=st.integers(1, 25))
def test_self_influence_is_non_negative_for_every_curvature(seed, hid, n, sample, curvature_, damping, depth):
    """Random tanh MLPs, small noisy mini-batches, no damping or auto damping, exact Hessian (often
    indefinite) or GGN: every returned score is finite and ≥ 0. The alternative outcome is a
    refusal, never a negative score: when a mini-batch's curvature exceeds twice the (auto)
    scale, the run raises ``LiSSADivergenceError`` naming a larger scale (seen with mini-batches
    of 1–8 examples, whose curvature the auto estimate from other mini-batches can miss)."""
    model, ds, x, y = _problem(seed, hid=hid, n=n)
    opts = LiSSAOptions(sample_size=min(sample, n), curvature=curvature_, damping=damping, depth=depth, seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the negative-curvature notice
        try:
            res = self_influence(model, [(torch.arange(n), (x, y))], ds, opts)
        except LiSSADivergenceError as e:
            assert e.parameter == "scale" and e.suggested_scale is not None and e.suggested_scale > e.scale, str(e)
            return
    assert res.self_influence.shape == (n,)
    assert bool(torch.isfinite(res.self_influence).all())
    assert bool((res.self_influence >= 0).all()), res.self_influence.min()
    if curvature_ == "ggn":
        assert res.meta["negative_curvature"] == 0


def test_callback_refuses_at_setup_when_one_vector_cannot_fit(tmp_path):
    """Pre-flight: the parameter copies of one vector exceed the budget: refused before step 0,
    with the callback's name, the parameter count and the knobs."""
    from torch.utils.data import DataLoader

    from lightning_influence import IndexedDataset, LiSSASelfInfluence
    from lightning_influence.demos import MLPClassifier, digits_dataset

    train = IndexedDataset(digits_dataset(seed=0)[0])
    model = MLPClassifier(hidden=8)
    P = sum(p.numel() for p in model.parameters())
    cb = LiSSASelfInfluence(probe=train, options=LiSSAOptions(memory_budget=budget.RESIDENT_COPIES * P * 4 - 1))
    t = quiet_trainer(tmp_path, [cb], max_epochs=1)
    with pytest.raises(LiSSAMemoryError, match=rf"LiSSASelfInfluence\(name='lissa'\): LiSSA needs about .*\(P={P:,} selected .*params="):
        t.fit(model, DataLoader(train, batch_size=64))
    assert t.global_step == 0
    # a budget that holds the vectors passes the pre-flight
    ok = LiSSASelfInfluence(probe=train, options=LiSSAOptions(memory_budget=100 * budget.RESIDENT_COPIES * P * 4))
    assert ok.preflight(t, model).chunk_size >= 1


def test_auto_scale_that_a_mini_batch_outgrows_restarts_every_chunk_with_the_suggested_scale(monkeypatch):
    """scale="auto" is estimated on a few mini-batches; when the recursion then diverges (here
    forced: the estimate's safety factor shrunk to 0.05, far below the top eigenvalue), every
    chunk restarts with the scale the divergence suggests instead of failing, so all scores come
    from one estimator: exactly the run with that scale given."""
    import importlib

    si = importlib.import_module("lightning_influence.lissa.self_influence")
    model, ds, x, y = _problem(5)
    probe = [(torch.arange(N), (x, y))]
    opts = LiSSAOptions(sample_size=16, depth=12, tol=None, chunk_size=15, curvature="ggn", time_budget=None)
    monkeypatch.setattr(si, "AUTO_SAFETY", 0.05)
    with pytest.warns(RuntimeWarning, match=r"diverged at step \d+ with the estimated scale .* restarting every chunk with scale"):
        got = self_influence(model, probe, ds, opts)
    assert 1 <= got.meta["scale_retries"] <= si.AUTO_SCALE_RETRIES
    fixed = dataclasses.replace(opts, scale=got.meta["scale"], damping=got.meta["damping"])
    want = self_influence(model, probe, ds, fixed)
    assert want.meta["scale_retries"] == 0
    torch.testing.assert_close(got.self_influence, want.self_influence, rtol=1e-12, atol=0)
    assert torch.equal(got.train_ids, want.train_ids) and got.meta["steps"] == want.meta["steps"]
    with pytest.raises(LiSSADivergenceError):  # a scale the user gave is never changed behind their back
        self_influence(model, probe, ds, dataclasses.replace(fixed, scale=got.meta["scale"] / 50))


def test_the_budget_rule_charges_a_products_fixed_cost_once_per_step():
    """``affordable_sample_size`` from the times of one product over one and over two examples:
    a fixed cost ``a`` and a per-example cost ``b``, ``steps · (a + b·m) ≤ seconds`` (worked by hand)."""
    from lightning_influence.lissa.self_influence import affordable_sample_size

    # small model: 1 ms a product whatever the examples; 2560 vector-steps fit 600 s at any size
    assert affordable_sample_size(1e-3, 1e-3, 2560, 600.0) >= 1 << 20
    # large model: 0.5 s an example, no fixed cost: 100 steps in 600 s afford 12 examples a step
    assert affordable_sample_size(0.5, 1.0, 100, 600.0) == 12
    # both: a = 0.25, b = 0.25; 10 steps in 50 s: 0.25 + 0.25·m ≤ 5 → m = 19
    assert affordable_sample_size(0.5, 0.75, 10, 50.0) == 19
    # the fixed cost alone exceeds the budget: at least one example
    assert affordable_sample_size(2.0, 2.0, 10, 5.0) == 1
    # (the old rule charged one example's time m times: 2560 vector-steps of 32 examples at 1 ms
    # each projected 82 s, and 128 ms a product projected 2.9 hours, for a run of seconds)
