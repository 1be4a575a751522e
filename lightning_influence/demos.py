"""Small models and data for tests, examples and benchmarks (no downloads).

* :func:`digits_dataset` — scikit-learn's bundled 8×8 digits (1,797 examples, 64 features,
  10 classes), standardised, optionally with a fraction of labels flipped.
* :class:`MLPClassifier` — a LightningModule MLP for those features; :class:`DigitsClassifier`
  the same, drawing its examples as 8×8 images for the HTML report (the quickstart's model).
* :class:`CNNClassifier` — a LightningModule CNN (``nn.Conv2d`` layers) on the same digits as
  ``1 × 8 × 8`` images.
* :func:`tiny_causal_lm` — a transformers causal LM built from a small config with random
  weights: GPT-NeoX, GPT-2 (``Conv1D``), Llama, Qwen2, Mistral or Gemma;
  :func:`tiny_sequence_classifier` (BERT, RoBERTa, Llama) and :func:`tiny_image_classifier`
  (ViT, whose patch embedding is an ``nn.Conv2d``); :class:`CausalLMModule` and
  :class:`HFClassifierModule` wrap them for Lightning.
* :func:`synthetic_token_dataset` — generated token sequences of varying length;
  :func:`synthetic_sequence_classification` (collate with :func:`lightning_influence.data.classification_collate`) — labelled ones;
  :class:`DigitsImages` — the digits as ``1 × 8 × 8`` image dicts.
"""

from __future__ import annotations

from typing import Literal, Optional

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

__all__ = [
    "digits_dataset",
    "MLPClassifier",
    "DigitsClassifier",
    "CNNClassifier",
    "tiny_causal_lm",
    "tiny_sequence_classifier",
    "tiny_image_classifier",
    "CausalLMModule",
    "HFClassifierModule",
    "synthetic_token_dataset",
    "synthetic_sequence_classification",
    "DigitsImages",
]


def digits_dataset(
    flip_fraction: float = 0.0, seed: int = 0, dtype: torch.dtype = torch.float32, standardize: bool = True
) -> tuple[TensorDataset, TensorDataset, Tensor]:
    """Standardised digits split 80/20 into ``(train, test, flipped_mask)``.

    ``flipped_mask`` is ``BoolTensor[n_train]``: True where the training label was replaced by a
    different random class (ground truth for mislabel detection). With ``standardize=False`` the
    features are the raw pixel intensities ``0 … 16`` (same order and labels: for drawing).
    """
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    x, y = x[order], y[order]
    if standardize:
        x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    n_train = int(0.8 * len(y))
    xtr, ytr, xte, yte = x[:n_train], y[:n_train].copy(), x[n_train:], y[n_train:]
    flipped = np.zeros(n_train, dtype=bool)
    if flip_fraction > 0:
        idx = rng.choice(n_train, size=int(round(flip_fraction * n_train)), replace=False)
        ytr[idx] = (ytr[idx] + rng.integers(1, 10, size=len(idx))) % 10
        flipped[idx] = True
    t = lambda a, d: torch.tensor(a, dtype=d)  # noqa: E731
    return (
        TensorDataset(t(xtr, dtype), t(ytr, torch.long)),
        TensorDataset(t(xte, dtype), t(yte, torch.long)),
        torch.from_numpy(flipped),
    )


class MLPClassifier(L.LightningModule):
    """``Linear(d_in, hidden) → Tanh → Linear(hidden, n_classes)`` trained with mean cross-entropy.

    Batches are ``(x, y)`` or ``(ids, (x, y))``.
    """

    def __init__(self, d_in: int = 64, hidden: int = 32, n_classes: int = 10, lr: float = 0.05, bias: bool = True) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(d_in, hidden, bias=bias), nn.Tanh(), nn.Linear(hidden, n_classes, bias=bias))
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    @staticmethod
    def _xy(batch):
        if len(batch) == 2 and isinstance(batch[1], (tuple, list)):
            return batch[1]
        return batch

    def training_step(self, batch, batch_idx):
        x, y = self._xy(batch)
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=False)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = self._xy(batch)
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class DigitsClassifier(MLPClassifier):
    """:class:`MLPClassifier` that shows its examples as what they are: the 64 standardised
    features of :func:`digits_dataset` are an 8×8 image of ink levels 0…16. The influence
    callbacks call ``render_example`` at the end of fit to save pictures of the top examples for
    the HTML report (and ``lightning-influence query`` to describe them)."""

    _pixel_stats: Optional[tuple[np.ndarray, np.ndarray]] = None

    @classmethod
    def pixel_stats(cls) -> tuple[np.ndarray, np.ndarray]:
        """Mean and standard deviation per pixel that :func:`digits_dataset` standardised with."""
        if cls._pixel_stats is None:
            from sklearn.datasets import load_digits

            pixels = load_digits().data
            cls._pixel_stats = (pixels.mean(0), pixels.std(0) + 1e-6)
        return cls._pixel_stats

    def render_example(self, example):
        """``(x, y)`` → the digit, dark ink on white, ``8 × 8`` values in ``[0, 1]``."""
        x, _ = example
        mean, std = self.pixel_stats()
        ink = x.double().numpy() * std + mean  # undo digits_dataset's standardisation
        return 1.0 - (ink / 16.0).clip(0, 1).reshape(8, 8)


class CNNClassifier(MLPClassifier):
    """A small CNN for the ``1 × 8 × 8`` digits images, trained with mean cross-entropy:
    ``Conv2d(1, c1, 3, padding=1) → ReLU → MaxPool(2) → Conv2d(c1, c2, 3, padding=1) → ReLU →
    flatten (c2 · 4 · 4) → Linear(·, n_classes)``.

    Inputs are ``Tensor[B, 64]`` features (reshaped to images) or ``Tensor[B, 1, 8, 8]``;
    batches are ``(x, y)`` or ``(ids, (x, y))`` as for :class:`MLPClassifier`, so
    :func:`digits_dataset` feeds both. The modules are ``net.0`` (conv), ``net.3`` (conv) and
    ``net.6`` (linear head).
    """

    def __init__(self, channels: tuple[int, int] = (8, 16), n_classes: int = 10, lr: float = 0.05, bias: bool = True) -> None:
        L.LightningModule.__init__(self)
        self.save_hyperparameters()
        c1, c2 = channels
        self.net = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1, bias=bias), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1, bias=bias), nn.ReLU(), nn.Flatten(),
            nn.Linear(c2 * 4 * 4, n_classes, bias=bias),
        )
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            x = x.view(-1, 1, 8, 8)
        return self.net(x)


CAUSAL_LM_ARCHS = ("gpt_neox", "gpt2", "llama", "qwen2", "mistral", "gemma")


def _decoder_config(arch: str, vocab_size: int, hidden: int, layers: int, heads: int, max_len: int):
    """A small transformers config of a decoder-only architecture (dropout off)."""
    import transformers

    common = dict(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  intermediate_size=2 * hidden, max_position_embeddings=max_len, pad_token_id=0,
                  bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1)
    kv_heads = 1 if heads % 2 == 0 and heads > 1 else heads  # grouped-query attention where possible
    if arch == "gpt_neox":
        return transformers.GPTNeoXConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                                          num_attention_heads=heads, intermediate_size=4 * hidden,
                                          max_position_embeddings=max_len, hidden_dropout=0.0, attention_dropout=0.0)
    if arch == "gpt2":
        return transformers.GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=max_len,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                       bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1)
    if arch == "llama":  # rotary embeddings, RMSNorm, SwiGLU, grouped-query attention
        return transformers.LlamaConfig(**common, num_key_value_heads=kv_heads, head_dim=hidden // heads)
    if arch == "qwen2":  # as Llama, with biases on the q/k/v projections
        return transformers.Qwen2Config(**common, num_key_value_heads=kv_heads)
    if arch == "mistral":  # as Llama, with sliding-window attention
        return transformers.MistralConfig(**common, num_key_value_heads=kv_heads, head_dim=hidden // heads,
                                          sliding_window=max(4, max_len // 4))
    if arch == "gemma":  # tied input/output embeddings, GeGLU, scaled embeddings
        return transformers.GemmaConfig(**common, num_key_value_heads=kv_heads, head_dim=hidden // heads)
    raise ValueError(f"arch must be one of {CAUSAL_LM_ARCHS}, got {arch!r}")


def _from_config(auto_class, cfg, seed: int, attn_implementation: Optional[str]) -> nn.Module:
    """``auto_class.from_config(cfg)`` with its weights drawn after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    attn = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    return auto_class.from_config(cfg, **attn)


def tiny_causal_lm(
    arch: Literal["gpt_neox", "gpt2", "llama", "qwen2", "mistral", "gemma"] = "gpt_neox",
    vocab_size: int = 64,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 2,
    max_len: int = 64,
    seed: int = 0,
    attn_implementation: Optional[str] = None,
) -> nn.Module:
    """A randomly initialised transformers causal LM from a small config (no download).

    Args:
        arch: ``"gpt_neox"`` (``nn.Linear``, fused QKV), ``"gpt2"`` (transformers ``Conv1D``,
            fused QKV, tied embeddings), ``"llama"``, ``"qwen2"``, ``"mistral"`` (rotary
            embeddings, grouped-query attention, SwiGLU) or ``"gemma"`` (as Llama, tied embeddings).
        vocab_size: vocabulary size (token 0 is the padding id, the last one BOS/EOS).
        hidden: hidden width (``heads`` must divide it).
        layers: transformer blocks.
        heads: attention heads (the Llama family uses one key/value head when ``heads`` is even).
        max_len: maximum sequence length.
        seed: ``torch.manual_seed`` before the weights are drawn.
        attn_implementation: transformers' attention implementation (``None``: its default,
            ``"sdpa"``).

    Returns:
        The ``*ForCausalLM`` model with ``use_cache=False``.
    """
    import transformers

    cfg = _decoder_config(arch, vocab_size, hidden, layers, heads, max_len)
    model = _from_config(transformers.AutoModelForCausalLM, cfg, seed, attn_implementation)
    model.config.use_cache = False
    return model


def tiny_sequence_classifier(
    arch: Literal["bert", "roberta", "llama"] = "bert",
    n_classes: int = 3,
    vocab_size: int = 64,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 2,
    max_len: int = 64,
    seed: int = 0,
    attn_implementation: Optional[str] = None,
) -> nn.Module:
    """A randomly initialised transformers ``*ForSequenceClassification`` (no download).

    Args:
        arch: ``"bert"`` or ``"roberta"`` (encoders: pooled first token → classifier) or
            ``"llama"`` (decoder: the last real token's state → ``score``).
        n_classes: number of labels.
        vocab_size: vocabulary size (token 0 is the padding id).
        hidden, layers, heads, max_len, seed, attn_implementation: as for :func:`tiny_causal_lm`.
    """
    import transformers

    if arch in ("bert", "roberta"):
        cls = transformers.BertConfig if arch == "bert" else transformers.RobertaConfig
        # RoBERTa numbers positions from pad_token_id + 1
        cfg = cls(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  intermediate_size=2 * hidden, max_position_embeddings=max_len + 2, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0, classifier_dropout=0.0, pad_token_id=0 if arch == "bert" else 1,
                  type_vocab_size=1)
    elif arch == "llama":
        cfg = _decoder_config(arch, vocab_size, hidden, layers, heads, max_len)
    else:
        raise ValueError(f"arch must be 'bert', 'roberta' or 'llama', got {arch!r}")
    cfg.num_labels = n_classes
    cfg.problem_type = "single_label_classification"
    return _from_config(transformers.AutoModelForSequenceClassification, cfg, seed, attn_implementation)


def tiny_image_classifier(
    n_classes: int = 10,
    image_size: int = 8,
    patch_size: int = 4,
    channels: int = 1,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 2,
    seed: int = 0,
    attn_implementation: Optional[str] = None,
) -> nn.Module:
    """A randomly initialised transformers ``ViTForImageClassification`` (no download); its
    patch embedding is an ``nn.Conv2d`` (kernel = stride = ``patch_size``). The defaults fit the
    ``1 × 8 × 8`` digits images (four 4 × 4 patches plus the class token).

    Args:
        n_classes: number of labels.
        image_size: image height and width.
        patch_size: patch height and width.
        channels: image channels.
        hidden, layers, heads, seed, attn_implementation: as for :func:`tiny_causal_lm`.
    """
    import transformers

    cfg = transformers.ViTConfig(image_size=image_size, patch_size=patch_size, num_channels=channels, hidden_size=hidden,
                                 num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=2 * hidden,
                                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=n_classes)
    cfg.problem_type = "single_label_classification"
    return _from_config(transformers.AutoModelForImageClassification, cfg, seed, attn_implementation)


class _TransformersModule(L.LightningModule):
    """LightningModule around a transformers model trained on its own loss with AdamW; batches
    are dicts, optionally ``(ids, dict)``. Subclasses say how a batch's fields call the model
    (:meth:`_model_output`)."""

    def __init__(self, model: nn.Module, lr: float) -> None:
        super().__init__()
        self.model = model
        self.lr = lr

    def _model_output(self, fields: dict[str, Tensor]):
        raise NotImplementedError

    def _loss(self, batch) -> Tensor:
        fields = batch[1] if isinstance(batch, (tuple, list)) else batch
        return self._model_output(fields).loss

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


class HFClassifierModule(_TransformersModule):
    """LightningModule around a transformers ``*ForSequenceClassification`` or
    ``*ForImageClassification``; batches are dicts ``{..., "labels": LongTensor[B]}``
    (optionally ``(ids, dict)``). The training loss is the model's own batch-mean cross-entropy,
    so :class:`~lightning_influence.task.SequenceClassificationTask` /
    :class:`~lightning_influence.task.ImageClassificationTask` read its batches as they are.

    Args:
        model: the transformers model.
        lr: AdamW learning rate.
    """

    def __init__(self, model: nn.Module, lr: float = 1e-3) -> None:
        super().__init__(model, lr)

    def forward(self, **inputs: Tensor) -> Tensor:
        return self.model(**inputs).logits

    def _model_output(self, fields):
        return self.model(**fields)


class CausalLMModule(_TransformersModule):
    """LightningModule around a transformers causal LM; batches are dicts (optionally ``(ids, dict)``).

    The training loss is the model's own token-mean loss (``labels`` with ``-100`` ignored).
    """

    def __init__(self, model: Optional[nn.Module] = None, lr: float = 1e-3, **lm_kwargs) -> None:
        super().__init__(model if model is not None else tiny_causal_lm(**lm_kwargs), lr)

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def _model_output(self, fields):
        return self.model(input_ids=fields["input_ids"], attention_mask=fields.get("attention_mask"), labels=fields["labels"])


def _chain_sequence(chain: Tensor, min_len: int, max_len: int, vocab_size: int, g: torch.Generator) -> Tensor:
    """A random length in ``[min_len, max_len]``, a random first token in ``[1, vocab_size)``,
    then tokens drawn from the bigram chain ``chain[previous]`` (``Tensor[V, V]``, rows sum to 1)."""
    length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
    seq = [int(torch.randint(1, vocab_size, (1,), generator=g))]
    for _ in range(length - 1):
        seq.append(int(torch.multinomial(chain[seq[-1]], 1, generator=g)))
    return torch.tensor(seq)


def synthetic_token_dataset(
    n: int = 64, vocab_size: int = 64, min_len: int = 4, max_len: int = 12, seed: int = 0
) -> list[dict[str, Tensor]]:
    """Sequences from a random bigram chain, of random lengths (a list of unpadded dicts)."""
    g = torch.Generator().manual_seed(seed)
    trans = torch.softmax(3 * torch.randn(vocab_size, vocab_size, generator=g), dim=-1)
    return [{"input_ids": _chain_sequence(trans, min_len, max_len, vocab_size, g)} for _ in range(n)]


def synthetic_sequence_classification(
    n: int = 64, n_classes: int = 3, vocab_size: int = 64, min_len: int = 4, max_len: int = 12, seed: int = 0
) -> list[dict[str, Tensor]]:
    """Sequences labelled by the bigram chain that generated them (one chain per class), of
    random lengths: a list of unpadded ``{"input_ids": LongTensor[T], "labels": LongTensor[]}``
    (collate with :func:`lightning_influence.data.classification_collate`). Token 0 (padding) never occurs."""
    g = torch.Generator().manual_seed(seed)
    chains = torch.softmax(3 * torch.randn(n_classes, vocab_size, vocab_size, generator=g), dim=-1)
    chains[..., 0] = 0.0
    out = []
    for _ in range(n):
        label = int(torch.randint(n_classes, (1,), generator=g))
        out.append({"input_ids": _chain_sequence(chains[label], min_len, max_len, vocab_size, g), "labels": torch.tensor(label)})
    return out


class DigitsImages(torch.utils.data.Dataset):
    """A digits split as image dicts ``{"pixel_values": Tensor[1, 8, 8], "labels": LongTensor[]}``
    (the layout of transformers' image classifiers).

    Args:
        data: a ``(features[N, 64], labels[N])`` dataset such as one from :func:`digits_dataset`.
    """

    def __init__(self, data: TensorDataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        x, y = self.data[i]
        return {"pixel_values": x.reshape(1, 8, 8), "labels": y}


class DigitsIndexed(torch.utils.data.Dataset):
    """Digits split as a config-constructible dataset whose items are ``(id, (x, y))``.

    Args:
        split: ``"train"`` or ``"test"``.
        flip_fraction: fraction of training labels flipped (see :func:`digits_dataset`).
        limit: keep only the first ``limit`` examples.
        seed: split/flip seed.
    """

    def __init__(self, split: Literal["train", "test"] = "train", flip_fraction: float = 0.0, limit: Optional[int] = None, seed: int = 0) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"DigitsIndexed(split=...) must be 'train' or 'test', got {split!r}")
        train, test, flipped = digits_dataset(flip_fraction, seed)
        self.data = train if split == "train" else test
        self.n = len(self.data) if limit is None else min(limit, len(self.data))
        self.flipped = flipped[: self.n] if split == "train" else torch.zeros(self.n, dtype=torch.bool)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return i, self.data[i]


class DigitsDataModule(L.LightningDataModule):
    """Digits with ids, for LightningCLI configs (``data: class_path: ...DigitsDataModule``)."""

    def __init__(self, batch_size: int = 64, flip_fraction: float = 0.1, limit: Optional[int] = None, seed: int = 0) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.train = DigitsIndexed("train", flip_fraction, limit, seed)
        self.test = DigitsIndexed("test", 0.0, None if limit is None else max(1, limit // 4), seed)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.train, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(self.test, batch_size=256)
