"""EK-FAC core against explicit float64 references (no Lightning Trainer)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import IndexedDataset, select_layers
from lightning_influence.ekfac.fit import fit_covariances, fit_factors
from lightning_influence.ekfac.scorer import InfluenceScorer
from lightning_influence.ranking import StreamingTopK, top_k
from lightning_influence.task import CausalLMTask, ClassificationTask
from lightning_influence.demos import CausalLMModule, MLPClassifier, synthetic_token_dataset, tiny_causal_lm
from lightning_influence.data import lm_collate

from ekfac_reference import dense_preconditioner, per_example_param_grads



pytestmark = pytest.mark.usefixtures("float64_default")


def mlp_setup(n=24, bias=True, seed=0):
    torch.manual_seed(seed)
    model = MLPClassifier(d_in=5, hidden=4, n_classes=3, bias=bias).double()
    x = torch.randn(n, 5)
    y = torch.randint(0, 3, (n,))
    ds = IndexedDataset(TensorDataset(x, y))
    return model, x, y, ds


def lm_setup(arch, n=6, seed=0):
    model = CausalLMModule(tiny_causal_lm(arch, vocab_size=16, hidden=8, layers=1, heads=2, seed=seed)).double()
    seqs = synthetic_token_dataset(n, vocab_size=16, min_len=3, max_len=7, seed=seed)
    return model, IndexedDataset(seqs)


# ----------------------------------------------------------------------------------------------
def test_covariances_equal_explicit_sums_mlp_with_bias():
    model, x, y, ds = mlp_setup()
    layers = select_layers(model)
    task = ClassificationTask()
    covs = fit_covariances(model, DataLoader(ds, batch_size=7), layers, task)
    # explicit manual forward, independent of the hooks
    w0, b0 = model.net[0].weight, model.net[0].bias
    w1, b1 = model.net[2].weight, model.net[2].bias
    h = (x @ w0.T + b0).detach().requires_grad_()
    z = torch.tanh(h)
    out = z @ w1.T + b1
    out.retain_grad()
    F.cross_entropy(out, y, reduction="sum").backward()
    a0 = torch.cat([x, torch.ones(len(x), 1)], 1)
    a1 = torch.cat([z.detach(), torch.ones(len(x), 1)], 1)
    n = len(x)
    for layer, a, ds_ in ((layers[0], a0, h.grad), (layers[1], a1, out.grad)):
        acc = covs[layer.name]
        torch.testing.assert_close(acc.a_sum, a.T @ a, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(acc.s_sum, ds_.T @ ds_, rtol=1e-12, atol=1e-12)
        assert acc.a_tokens == n and acc.s_tokens == n and acc.examples == n
        A, S = acc.covariances()
        torch.testing.assert_close(A, a.T @ a / n)


def test_accumulators_merge_equals_union():
    model, x, y, ds = mlp_setup()
    layers = select_layers(model)
    task = ClassificationTask()
    whole = fit_covariances(model, DataLoader(ds, batch_size=24), layers, task)
    first = fit_covariances(model, DataLoader(torch.utils.data.Subset(ds, range(10)), batch_size=5), layers, task)
    second = fit_covariances(model, DataLoader(torch.utils.data.Subset(ds, range(10, 24)), batch_size=5), layers, task)
    for l in layers:
        merged = first[l.name].merge_(second[l.name])
        torch.testing.assert_close(merged.a_sum, whole[l.name].a_sum)
        torch.testing.assert_close(merged.s_sum, whole[l.name].s_sum)
        assert merged.a_tokens == whole[l.name].a_tokens and merged.examples == whole[l.name].examples


def test_float32_accumulation_of_low_precision_inputs():
    from lightning_influence.ekfac.covariance import CovarianceAccumulator

    acc = CovarianceAccumulator(3, 2)
    a = torch.randn(4, 5, 3).to(torch.bfloat16)
    acc.update_activations(a)
    assert acc.a_sum.dtype == torch.float32
    ref = a.float().reshape(-1, 3)
    torch.testing.assert_close(acc.a_sum, ref.T @ ref)


@pytest.mark.parametrize("arch", ["gpt_neox", "gpt2"])
def test_padding_is_invisible_to_covariances_and_lambdas(arch):
    """Padded batches give exactly the factors of the same sequences run one by one unpadded."""
    model, ds = lm_setup(arch)
    pats = {"gpt_neox": ["*mlp.*", "*attention.query_key_value"], "gpt2": ["*mlp.*", "*attn.c_attn"]}[arch]
    layers = select_layers(model, pats)
    task = CausalLMTask()
    padded = DataLoader(ds, batch_size=3, collate_fn=lm_collate)
    single = DataLoader(ds, batch_size=1, collate_fn=lm_collate)
    fa = fit_factors(model, padded, layers, task)
    covs_p = fit_covariances(model, padded, layers, task)
    covs_s = fit_covariances(model, single, layers, task)
    n_tokens = sum(len(s["input_ids"]) for _, s in ds)
    for l in layers:
        torch.testing.assert_close(covs_p[l.name].a_sum, covs_s[l.name].a_sum, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(covs_p[l.name].s_sum, covs_s[l.name].s_sum, rtol=1e-9, atol=1e-10)
        assert covs_p[l.name].a_tokens == n_tokens
    # Λ equals the brute-force per-example autograd loop projected on the eigenbases
    examples = [lm_collate([ds[i]]) for i in range(len(ds))]
    grads = per_example_param_grads(model, task, examples, layers)
    for l in layers:
        f = fa.layers[l.name]
        rot = f.q_s.T @ grads[l.name] @ f.q_a
        torch.testing.assert_close(f.lambdas, rot.pow(2).mean(0), rtol=1e-8, atol=1e-12)


def test_lambdas_equal_brute_force_mlp():
    model, x, y, ds = mlp_setup()
    factors = fit_factors(model, DataLoader(ds, batch_size=5))
    layers = select_layers(model)
    examples = [(torch.tensor([i]), (x[i : i + 1], y[i : i + 1])) for i in range(len(x))]
    grads = per_example_param_grads(model, ClassificationTask(), examples, layers)
    for l in layers:
        f = factors.layers[l.name]
        torch.testing.assert_close(f.lambdas, (f.q_s.T @ grads[l.name] @ f.q_a).pow(2).mean(0), rtol=1e-9, atol=1e-14)
        assert f.damping("mean") == pytest.approx(0.1 * float(f.lambdas.mean()))  # the 0.2 default; the new one: test_damping_default


def _dense_scores(model, factors, layers, task, q_examples, t_examples, damping):
    gq = per_example_param_grads(model, task, q_examples, layers, which="measurement")
    gt = per_example_param_grads(model, task, t_examples, layers)
    total = 0
    for l in layers:
        f = factors.layers[l.name]
        lam = factors.dampings(damping)[l.name]
        m = dense_preconditioner(f, lam)
        total = total + gq[l.name].reshape(len(q_examples), -1) @ m @ gt[l.name].reshape(len(t_examples), -1).T
    return total


@pytest.mark.parametrize("kind", ["mlp", "mlp_nobias", "gpt2", "gpt_neox"])
def test_preconditioning_pairwise_and_self_match_dense(kind):
    if kind.startswith("mlp"):
        model, x, y, ds = mlp_setup(bias=kind == "mlp")
        task = ClassificationTask()
        collate = None
        layers = select_layers(model)
    else:
        model, ds = lm_setup(kind)
        task = CausalLMTask()
        collate = lm_collate
        layers = select_layers(model, exclude="*lm_head*")
    loader = DataLoader(ds, batch_size=4, collate_fn=collate)
    factors = fit_factors(model, loader, layers, task)
    # explicit preconditioning of a random gradient
    for l in layers:
        f = factors.layers[l.name]
        g = torch.randn(2, *f.grad_shape)
        dense = dense_preconditioner(f, f.damping())
        torch.testing.assert_close(f.precondition(g), (g.reshape(2, -1) @ dense.T).reshape(g.shape), rtol=1e-9, atol=1e-9)
    scorer = InfluenceScorer(model, factors, task=task)
    q_idx, t_idx = [0, 3], list(range(len(ds)))
    col = collate or torch.utils.data.default_collate
    q_examples = [col([ds[i]]) for i in q_idx]
    t_examples = [col([ds[i]]) for i in t_idx]
    dense = _dense_scores(model, factors, layers, task, q_examples, t_examples, None)
    qloader = DataLoader(torch.utils.data.Subset(ds, q_idx), batch_size=2, collate_fn=collate)
    result = scorer.pairwise(qloader, loader, per_layer=True)
    scores = result.pairwise
    torch.testing.assert_close(scores, dense, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(sum(result.per_layer.values()), scores)
    assert sorted(result.per_layer) == sorted(l.name for l in layers)
    assert result.query_ids.tolist() == q_idx and result.train_ids.tolist() == t_idx
    self_scores = scorer.self_influence(loader, per_layer=True)
    full = scorer.pairwise(loader, loader).pairwise
    torch.testing.assert_close(self_scores.self_influence, torch.diagonal(full), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(sum(self_scores.per_layer.values()), self_scores.self_influence)
    assert (self_scores.self_influence > 0).all()
    # streaming top-k over training batches equals the dense top-k, both directions
    top = scorer.search(qloader, DataLoader(ds, batch_size=3, collate_fn=collate), k=3, opponents=True)
    ref_vals, ref_idx = torch.topk(dense, 3, dim=1)
    torch.testing.assert_close(top.scores, ref_vals, rtol=1e-8, atol=1e-10)
    assert top.ids.tolist() == ref_idx.tolist() and top.query_ids.tolist() == q_idx
    low_vals, low_idx = torch.topk(dense, 3, dim=1, largest=False)
    torch.testing.assert_close(top.opponent_scores, low_vals, rtol=1e-8, atol=1e-10)
    assert top.opponent_ids.tolist() == low_idx.tolist()


def test_explicit_damping_values():
    model, x, y, ds = mlp_setup()
    factors = fit_factors(model, DataLoader(ds, batch_size=8))
    d = factors.dampings(0.5)
    assert set(d.values()) == {0.5}
    with pytest.raises(ValueError, match="damping"):
        factors.dampings(-1.0)
    names = factors.layer_names
    with pytest.raises(ValueError, match="lacks layers"):
        factors.dampings({names[0]: 1.0})


def test_true_fisher_uses_sampled_labels():
    model, x, y, ds = mlp_setup(n=60)
    layers = select_layers(model)
    emp = fit_covariances(model, DataLoader(ds, batch_size=60), layers, ClassificationTask(), "empirical")
    true = fit_covariances(model, DataLoader(ds, batch_size=60), layers, ClassificationTask(), "true", seed=0)
    # same inputs; output-gradient covariance differs (labels sampled from the model) and is reproducible
    name = layers[1].name
    torch.testing.assert_close(emp[name].a_sum, true[name].a_sum)
    assert not torch.allclose(emp[name].s_sum, true[name].s_sum)
    again = fit_covariances(model, DataLoader(ds, batch_size=60), layers, ClassificationTask(), "true", seed=0)
    torch.testing.assert_close(true[name].s_sum, again[name].s_sum)
    # reference: S from explicitly sampled labels with the same generator stream
    gen = torch.Generator().manual_seed(0)
    logits = model(x).detach()
    ys = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen).squeeze(1)
    ds_ = torch.softmax(logits, -1) - F.one_hot(ys, 3)
    torch.testing.assert_close(true[name].s_sum, ds_.T @ ds_)


def test_sign_and_magnitude_against_reoptimisation():
    """Up-weighting the most helpful training example lowers the query loss, by -ε·score."""
    torch.manual_seed(0)
    n, d, l2 = 120, 3, 0.05
    x = torch.randn(n, d)
    w_true = torch.tensor([0.8, -0.5, 0.3])
    y = (torch.rand(n) < torch.sigmoid(x @ w_true)).long()
    model = nn.Linear(d, 2)
    task = ClassificationTask()
    weights = torch.ones(n) / n

    def optimise(wts):
        params = [model.weight, model.bias]
        for _ in range(30):  # Newton's method on mean CE + (l2/2)|θ|² (strictly convex)
            loss = (F.cross_entropy(model(x), y, reduction="none") * wts).sum() + 0.5 * l2 * sum(p.pow(2).sum() for p in params)
            g = torch.autograd.grad(loss, params, create_graph=True)
            flat_g = torch.cat([gi.reshape(-1) for gi in g])
            hess = torch.stack([torch.cat([h.reshape(-1) for h in torch.autograd.grad(gi, params, retain_graph=True)]) for gi in flat_g])
            step = torch.linalg.solve(hess, flat_g.detach())
            with torch.no_grad():
                model.weight -= step[: 2 * d].reshape(2, d)
                model.bias -= step[2 * d :]
        return flat_g.norm().item()

    assert optimise(weights) < 1e-10
    state = {k: v.clone() for k, v in model.state_dict().items()}
    xq, yq = torch.randn(1, d), torch.tensor([1])
    q_loss = lambda: F.cross_entropy(model(xq), yq).item()  # noqa: E731
    base = q_loss()
    # true Fisher of a linear softmax model = its Hessian; many sampled labels make it exact
    train = IndexedDataset(TensorDataset(x, y))
    many = DataLoader(torch.utils.data.ConcatDataset([train] * 200), batch_size=2000)
    factors = fit_factors(model, many, fisher="true")
    scorer = InfluenceScorer(model, factors, task=task, damping=l2)
    scores = scorer.pairwise(DataLoader(TensorDataset(xq, yq), batch_size=1), DataLoader(train, batch_size=64)).pairwise[0]
    best = int(scores.argmax())
    assert scores[best] > 0
    eps = 1e-3
    bumped = weights.clone()
    bumped[best] += eps
    optimise(bumped)
    actual = q_loss() - base
    predicted = -eps * float(scores[best])
    assert actual < 0
    assert actual == pytest.approx(predicted, rel=0.10)
    model.load_state_dict(state)


def test_top_k_helper_is_nan_safe_and_streaming_equals_dense():
    s = torch.tensor([[0.1, 0.9, -0.5, 0.3]])
    t = top_k(s, 2, ids=torch.tensor([10, 11, 12, 13]))
    assert t.ids.tolist() == [[11, 13]] and t.scores[0].tolist() == pytest.approx([0.9, 0.3])
    assert top_k(s[0], 1, largest=False).ids.tolist() == [2]
    # nan never ranks first, in either direction
    n = torch.tensor([float("nan"), 1.0, -1.0, float("nan"), 0.5])
    assert top_k(n, 3).ids.tolist() == [1, 4, 2]
    assert top_k(n, 3, largest=False).ids.tolist() == [2, 4, 1]
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(5, 103, generator=g, dtype=torch.float64)
    ids = torch.randperm(103, generator=g) + 1000
    for largest in (True, False):
        stream = StreamingTopK(5, 7, largest=largest)
        for start in range(0, 103, 10):
            stream.update(dense[:, start : start + 10], ids[start : start + 10])
        ref = top_k(dense, 7, ids, largest=largest)
        assert stream.result().ids.tolist() == ref.ids.tolist()
        assert torch.equal(stream.result().scores, ref.scores)


@pytest.mark.parametrize("tokens", [1, 3, 40])
def test_both_contraction_orders_agree(tokens):
    from lightning_influence.ekfac.capture import rotated_per_example_gradients

    g = torch.Generator().manual_seed(tokens)
    a, ds = torch.randn(4, tokens, 6, generator=g), torch.randn(4, tokens, 5, generator=g)
    q_a = torch.linalg.qr(torch.randn(6, 6, generator=g))[0]
    q_s = torch.linalg.qr(torch.randn(5, 5, generator=g))[0]
    dense = torch.stack([q_s.T @ sum(torch.outer(ds[b, t], a[b, t]) for t in range(tokens)) @ q_a for b in range(4)])
    torch.testing.assert_close(rotated_per_example_gradients(a, ds, q_a, q_s), dense)


def test_outputs_are_filled_in_place_and_unsized_loaders_agree():
    """Nothing is kept per training batch: outputs are one buffer, preallocated for sized loaders
    and grown geometrically otherwise, with the same numbers either way."""
    from lightning_influence.ekfac.scorer import ColumnBuffer

    g = torch.Generator().manual_seed(0)
    blocks = [torch.randn(3, int(c), generator=g) for c in torch.randint(1, 6, (12,), generator=g)]
    for hint in (None, 2, sum(b.shape[1] for b in blocks)):
        buf = ColumnBuffer(3, hint, torch.float64)
        vec = ColumnBuffer(None, hint, torch.long)
        for i, b in enumerate(blocks):
            buf.append(b)
            vec.append(torch.full((b.shape[1],), i))
        assert torch.equal(buf.tensor(), torch.cat(blocks, 1))
        assert torch.equal(vec.tensor(), torch.cat([torch.full((b.shape[1],), i) for i, b in enumerate(blocks)]))
    model, x, y, ds = mlp_setup(n=23)
    factors = fit_factors(model, DataLoader(ds, batch_size=5))
    scorer = InfluenceScorer(model, factors)
    sized, q = DataLoader(ds, batch_size=5), DataLoader(torch.utils.data.Subset(ds, [0, 4, 7]), batch_size=2)

    class Unsized:  # no dataset: no size hint
        def __iter__(self):
            return iter(sized)

    a, b = scorer.pairwise(q, sized, per_layer=True), scorer.pairwise(q, Unsized(), per_layer=True)
    assert torch.equal(a.pairwise, b.pairwise) and a.train_ids.tolist() == b.train_ids.tolist() == list(range(23))
    assert all(torch.equal(a.per_layer[n], b.per_layer[n]) for n in a.per_layer)
    # the sized result is the preallocated buffer itself, not a copy of a list of chunks
    assert a.pairwise.untyped_storage().nbytes() == a.pairwise.numel() * a.pairwise.element_size()
    sa, sb = scorer.self_influence(sized, per_layer=True), scorer.self_influence(Unsized(), per_layer=True)
    assert torch.equal(sa.self_influence, sb.self_influence) and sb.train_ids.tolist() == list(range(23))
    torch.testing.assert_close(sa.self_influence, torch.diagonal(scorer.pairwise(sized, sized).pairwise))
    with pytest.raises(ValueError, match="no batch"):
        scorer.self_influence(DataLoader(torch.utils.data.Subset(ds, []), batch_size=2))
