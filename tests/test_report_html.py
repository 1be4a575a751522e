"""The HTML report: examples shown as what they are (images decoded by an independent PNG
reader, tokens with their scores, table rows, given and predicted labels), a self-contained page,
and a real headless Chromium that loads it, decodes every image and lays out the text."""

from __future__ import annotations

import html
import io
import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from lightning_influence import IndexedDataset
from lightning_influence.data import find_examples
from lightning_influence.report.png import png_bytes
from lightning_influence.report.views import (
    ExampleView,
    ExampleViews,
    example_views,
    load_views,
    predicted_labels,
    save_views,
    view_example,
)
from lightning_influence.report import collect_report, html_report, write_html_report
from lightning_influence.scores import InfluenceScores, save_scores

from browser import chromium, run_chromium


def _decode(b64_or_bytes) -> np.ndarray:
    import base64

    data = base64.b64decode(b64_or_bytes) if isinstance(b64_or_bytes, str) else b64_or_bytes
    return np.asarray(Image.open(io.BytesIO(data)))


class FakeTokenizer:
    vocab = ["<pad>", "the", " cat", " sat", " on", " mat", "<tag>"]

    def decode(self, ids):
        return "".join(self.vocab[i] for i in ids)


# -- examples as what they are ------------------------------------------------------------------
def test_png_encoder_round_trips_through_an_independent_decoder():
    grey = np.arange(35, dtype=np.uint8).reshape(5, 7) * 7
    assert np.array_equal(_decode(png_bytes(grey)), grey)
    rgb = torch.rand(3, 6, 5, generator=torch.Generator().manual_seed(0))  # CHW floats in [0, 1]
    assert np.array_equal(_decode(png_bytes(rgb)), np.rint(rgb.permute(1, 2, 0).numpy() * 255).astype(np.uint8))
    z = torch.tensor([[-2.0, 0.0], [1.0, 2.0]]).repeat_interleave(3, 0).repeat_interleave(3, 1)  # other floats: min-max
    assert np.array_equal(np.unique(_decode(png_bytes(z))), np.array([0, 128, 191, 255]))
    with pytest.raises(ValueError, match="not an image"):
        png_bytes(torch.zeros(64))


def test_views_of_images_tokens_tables_and_text():
    img = torch.rand(1, 8, 8)
    v = view_example((img, torch.tensor(3)), 12, label_names=[f"class {c}" for c in range(10)])
    assert v.id == 12 and v.label == "class 3" and np.array_equal(_decode(v.image), np.rint(img[0].numpy() * 255))
    tok = FakeTokenizer()
    seq = {"input_ids": torch.tensor([1, 2, 3, 4, 5, 0, 0]), "attention_mask": torch.tensor([1, 1, 1, 1, 1, 0, 0]),
           "labels": torch.tensor([-100, -100, -100, 4, 5, -100, -100])}
    v = view_example(seq, 4, tokenizer=tok, token_scores=torch.tensor([0.5, -1.0, 2.0, 0.25]))
    assert v.tokens == ["the", " cat", " sat", " on", " mat"]  # padding dropped, decoded one token at a time
    assert v.targets == [False, False, False, True, True]
    assert v.token_scores == [None, 0.5, -1.0, 2.0, 0.25]  # T-1 scores: tokens 1..T-1 (causal-LM alignment)
    with pytest.raises(ValueError, match="token_scores has 3 entries for 5 tokens"):
        view_example(seq, 4, tokenizer=tok, token_scores=torch.ones(3))
    v = view_example((torch.arange(20.0), 1), 0)
    assert v.table[:2] == [("[0]", "0"), ("[1]", "1")] and v.table[-1] == ("…", "8 more of 20") and v.label == "1"
    assert view_example({"text": "a <b> c", "label": 2}, 1).text == "a <b> c"
    hooked = view_example((torch.arange(64.0), 5), 3, render=lambda ex: {"image": ex[0].reshape(8, 8), "note": "digit"})
    assert _decode(hooked.image).shape == (8, 8) and hooked.label == "5" and hooked.note == "digit"
    hf_image = view_example({"pixel_values": torch.rand(3, 16, 16), "labels": torch.tensor(7)}, 2)
    assert _decode(hf_image.image).shape == (16, 16, 3) and hf_image.label == "7"
    sentence = view_example({"input_ids": torch.tensor([1, 2, 3]), "labels": torch.tensor(1)}, 5, tokenizer=tok)
    assert sentence.tokens == ["the", " cat", " sat"] and sentence.label == "1" and sentence.targets is None
    qa = view_example({"prompt_ids": torch.tensor([1, 2]), "answer_ids": torch.tensor([3])}, 0, tokenizer=tok)
    assert qa.tokens == ["the", " cat", " sat"] and qa.targets == [False, False, True]


def test_find_examples_by_id_in_every_kind_of_source():
    base = TensorDataset(torch.arange(10.0)[:, None], torch.arange(10))
    indexed = IndexedDataset(base, offset=100)
    assert {i: int(ex[1]) for i, ex in find_examples(indexed, [103, 109, 5]).items()} == {103: 3, 109: 9}
    sub = Subset(IndexedDataset(base), [7, 2, 5])  # items carry their own ids
    assert {i: int(ex[1]) for i, ex in find_examples(DataLoader(sub), [5, 7]).items()} == {5: 5, 7: 7}
    plain = [("a", 0), ("b", 1), ("c", 2)]  # no ids: the position is the id
    assert find_examples(plain, [2, 0]) == {2: ("c", 2), 0: ("a", 0)}
    assert find_examples(IndexedDataset(base), [8], max_scan=3) == {8: base[8]}  # direct, no scan
    assert find_examples(Subset(IndexedDataset(base), range(10)), [8], max_scan=3)[8] == base[8]  # direct too
    assert find_examples(Subset(base, range(10)), [8], max_scan=3) == {}  # no ids: scanned, and the scan is capped


def test_predicted_labels_are_the_models_argmax():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x = torch.randn(9, 4)
    items = [(x[i], torch.tensor(i % 3)) for i in range(9)]
    with torch.no_grad():
        expected = [str(int(c)) for c in model(x).argmax(-1)]
    assert predicted_labels(model, items, batch_size=4) == expected
    views = example_views(IndexedDataset(items), [2, 5, 40], model=model)
    assert [views[i].predicted for i in (2, 5)] == [expected[2], expected[5]] and views[40].note == "not found in the given data"
    assert views[2].label == "2" and views[2].mislabeled == (expected[2] != "2")


def test_views_round_trip_as_an_artifact(tmp_path):
    views = ExampleViews(train={3: ExampleView(3, text="x", label="1", predicted="2", table=[("a", "b")])},
                         queries={0: ExampleView(0, tokens=["a", "b"], token_scores=[None, 1.5], targets=[False, True])},
                         meta={"callback": "ekfac"})
    back = load_views(save_views(views, tmp_path / "examples"))
    assert back.train == views.train and back.queries == views.queries and back.meta == {"callback": "ekfac"}


# -- the page ------------------------------------------------------------------------------------
def _image_run(tmp_path):
    """A run folder with self-influence over 40 8×8 'images' and the model that ranks them."""
    torch.manual_seed(0)
    x = torch.rand(40, 1, 8, 8)
    y = torch.arange(40) % 4
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 4))
    scores = torch.rand(40) * 10
    save_scores(InfluenceScores("lissa", torch.arange(40), self_influence=scores, meta={"callback": "lissa"}),
                tmp_path / "influence" / "lissa" / "self_influence")
    return IndexedDataset(TensorDataset(x, y)), model, scores


def _token_run(tmp_path):
    """Pairwise scores of 2 queries over 12 training sentences, with per-token scores."""
    g = torch.Generator().manual_seed(1)
    train = [{"input_ids": torch.randint(1, 6, (5,), generator=g)} for _ in range(12)]
    queries = [{"input_ids": torch.tensor([1, 2, 3, 6]), "labels": torch.tensor([-100, -100, -100, 6])},
               {"input_ids": torch.tensor([1, 4, 5, 6]), "labels": torch.tensor([-100, -100, -100, 6])}]
    pairwise = torch.randn(2, 12, generator=g)
    save_scores(InfluenceScores("ekfac", torch.arange(12), query_ids=torch.arange(2), pairwise=pairwise, meta={"callback": "posthoc"}),
                tmp_path / "influence" / "posthoc" / "answers")
    token_scores = {(q, i): torch.randn(4, generator=g) for q in range(2) for i in range(12)}
    return IndexedDataset(train), IndexedDataset(queries), pairwise, token_scores


def test_html_page_shows_each_ranking_and_is_self_contained(tmp_path):
    data, model, scores = _image_run(tmp_path)
    page = write_html_report(tmp_path, tmp_path / "r.html", datasets=data, model=model, top_k=5,
                             mark_ids=[int(torch.argmax(scores))], mark_label="known noisy").read_text()
    assert not re.search(r"(src|href)=\"(https?:|//)", page) and "<script" not in page and "<link" not in page
    ids = [str(int(i)) for i in torch.argsort(scores, descending=True)[:5]]
    cards = re.findall(r'<div class="card[^"]*" data-id="(\d+)">', page)
    assert cards == ids and page.count('src="data:image/png;base64,') == 5 + 1  # 5 examples + the histogram
    with torch.no_grad():
        top = int(ids[0])
        pred = int(model(data.dataset[top][0][None]).argmax())
    first = page.split(f'data-id="{top}">')[1].split('<div class="card')[0]
    assert f"label <b>{top % 4}</b>" in first and f"predicted <b>{pred}</b>" in first and "known noisy" in first
    assert "LiSSA self-influence" in page and "g·(H + λI)⁻¹·g" in page


def test_html_token_highlighting_and_escaping(tmp_path):
    train, queries, pairwise, token_scores = _token_run(tmp_path)
    page = write_html_report(tmp_path, tmp_path / "r.html", datasets={"train": train, "queries": queries},
                             tokenizer=FakeTokenizer(), token_scores=token_scores, top_k=3, plots=False).read_text()
    assert "&lt;tag&gt;" in page and "<tag>" not in page  # token text is escaped
    best = int(torch.argmax(pairwise[0]))
    card = page.split("<h3>Query 0</h3>")[1].split(f'data-id="{best}">')[1].split('<div class="card')[0]
    spans = re.findall(r'<span class="tok[^"]*"(?: style="background:rgba\((\d+,\d+,\d+),[\d.]+\)" title="([^"]+)")?>', card)
    assert len(spans) == 5 and spans[0] == ("", "")  # the first token predicts nothing
    for (rgb, title), s in zip(spans[1:], token_scores[(0, best)].tolist()):
        assert float(title) == pytest.approx(s, rel=1e-3) and rgb == ("46,160,67" if s > 0 else "214,39,40")
    query_card = page.split("<h3>Query 0</h3>")[1].split('<div class="card query"')[1].split("</div></div>")[0]
    assert query_card.count('class="tok tgt"') == 1  # the measured answer token


def test_html_without_data_says_how_to_get_examples(tmp_path):
    _image_run(tmp_path)
    reports = collect_report(tmp_path, top_k=3)
    page = html_report(reports, plots=False)
    assert "No rendered examples were saved" in page and page.count('data-id="') == 3


def test_a_callback_folder_given_as_dirpath_is_a_run(tmp_path):
    _image_run(tmp_path)
    custom = tmp_path / "elsewhere"
    shutil.move(str(tmp_path / "influence" / "lissa"), str(custom))  # EKFACInfluence(dirpath=...) layout: artifacts directly inside
    assert [r.artifact for r in collect_report(custom)] == [custom / "self_influence"]
    page = write_html_report(custom, plots=False)
    assert page == custom / "plots" / "report.html" and "Influence report: elsewhere" in page.read_text()


# -- a real browser ----------------------------------------------------------------------------------
PROBE = """<script>
window.addEventListener('load', () => {
  const r = {
    images: [...document.images].map(i => {
      const c = document.createElement('canvas'); c.width = i.naturalWidth; c.height = i.naturalHeight;
      const ctx = c.getContext('2d'); ctx.drawImage(i, 0, 0);
      const px = i.naturalWidth ? ctx.getImageData(0, 0, c.width, c.height).data : [];
      let opaque = 0, red = 0;
      for (let k = 0; k < px.length; k += 4) { opaque += px[k + 3] === 255; red += px[k]; }
      const n = Math.max(px.length / 4, 1);
      return [i.naturalWidth, i.naturalHeight, i.getBoundingClientRect().width, opaque / n, red / n];
    }),
    tokens: [...document.querySelectorAll('.tok')].map(t => [t.textContent, t.getBoundingClientRect().width]),
    cards: [...document.querySelectorAll('.card')].map(c => [c.dataset.id, c.getBoundingClientRect().height]),
    headings: [...document.querySelectorAll('h2')].map(h => h.textContent),
  };
  const pre = document.createElement('pre'); pre.id = 'probe'; pre.textContent = JSON.stringify(r);
  document.body.appendChild(pre);
});
</script></body>"""


@pytest.mark.slow
def test_chromium_loads_the_page_decodes_every_image_and_lays_out_the_text(tmp_path):
    exe = chromium()
    data, model, scores = _image_run(tmp_path / "images")
    write_html_report(tmp_path / "images", tmp_path / "images.html", datasets=data, model=model, top_k=6)
    train, queries, pairwise, token_scores = _token_run(tmp_path / "tokens")
    write_html_report(tmp_path / "tokens", tmp_path / "tokens.html", datasets={"train": train, "queries": queries},
                      tokenizer=FakeTokenizer(), token_scores=token_scores, top_k=3, queries=2)
    for name, n_images, n_tokens in (("images", 6 + 1, 0), ("tokens", 0, 2 * (1 + 6) * 5 - 2)):
        page = tmp_path / f"{name}.html"
        probed = tmp_path / f"{name}.probe.html"
        probed.write_text(page.read_text().replace("</body>", PROBE))
        dom = run_chromium(exe, probed, tmp_path, "--dump-dom", "--virtual-time-budget=5000")
        found = json.loads(html.unescape(re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S).group(1)))
        assert len(found["images"]) == n_images
        assert all(w > 0 and h > 0 and shown > 0 and opaque == 1.0 for w, h, shown, opaque, _ in found["images"])  # every pixel decoded
        if name == "images":  # the pixels the browser decoded are the example's (mean red channel, as PIL reads the PNG)
            srcs = re.findall(r'src="data:image/png;base64,([^"]+)"', page.read_text())
            for (_, _, _, _, red), src in zip(found["images"], srcs):
                assert red == pytest.approx(_decode(src)[..., 0].mean() if _decode(src).ndim == 3 else _decode(src).mean(), abs=0.6)
        assert len(found["tokens"]) == n_tokens and all(width > 0 for text, width in found["tokens"] if text.strip())
        assert all(height > 40 for _, height in found["cards"])
        shot = tmp_path / f"{name}.png"
        run_chromium(exe, page, tmp_path, f"--screenshot={shot}", "--window-size=1280,1600")
        assert Image.open(shot).size == (1280, 1600) and shot.stat().st_size > 20_000
    assert found["headings"] == ["EK-FAC train-test influence"]
    assert [t for t, _ in found["tokens"][:4]] == ["the", " cat", " sat", "<tag>"]  # query 0, decoded and unescaped
