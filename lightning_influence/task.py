"""How the library reads a batch: example ids, per-example losses, sampled-label losses,
query measurements, padding masks and the scale of the training loss.

Every influence method talks to batches only through an :class:`InfluenceTask`. Defaults ship
for ``(x, y)`` / ``(ids, (x, y))`` batches (:class:`ClassificationTask`) and for Hugging Face
dict batches: causal LM (:class:`CausalLMTask`), sequence classification
(:class:`SequenceClassificationTask`) and image classification (:class:`ImageClassificationTask`);
:func:`default_task_for` picks one by the batch's layout. A LightningModule overrides any
piece by defining a method of the same name that takes ``batch`` (see :class:`ModuleTask`), and
a user may pass any object that implements the contract, :data:`TASK_CONTRACT` (which methods
every method needs, which only some features need, and the defaults :class:`InfluenceTask`
supplies); :func:`resolve_task` checks it once, when a method is set up.

Conventions:
    * per-example losses are **summed** over tokens/outputs, one value per example
      (``Tensor[B]``), never averaged over the batch;
    * ``gradient_scale(batch)`` is the factor ``c`` with ``training_loss = c * sum_b loss_b``
      (``1/B`` for a batch-mean loss, ``1/n_tokens`` for a token-mean LM loss, ``1`` for a sum):
      output gradients seen during training are divided by it.
"""

from __future__ import annotations

from typing import Any, Iterable, Literal, NamedTuple, Optional, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .batches import describe, leading_size
from .errors import InfluenceError

__all__ = [
    "TASK_CONTRACT",
    "TaskMethod",
    "InfluenceTask",
    "TaskLike",
    "ClassificationTask",
    "CausalLMTask",
    "SequenceClassificationTask",
    "ImageClassificationTask",
    "ModuleTask",
    "resolve_task",
    "default_task_for",
    "split_ids",
    "example_count",
    "MissingExampleIdsError",
]

class TaskMethod(NamedTuple):
    """One method of the task contract (:data:`TASK_CONTRACT`)."""

    signature: str
    purpose: str
    needed_by: str
    """``EVERY_METHOD``, or the features that call it (a caller names these in ``resolve_task(needs=...)``)."""
    default: str
    """What :class:`InfluenceTask` does when a subclass does not define it; ``""``: no default."""


EVERY_METHOD = "every method"

TASK_CONTRACT: dict[str, TaskMethod] = {
    "example_ids": TaskMethod(
        "example_ids(batch) -> LongTensor[B] | None", "the ids of the batch's examples (None: the batch has none)",
        EVERY_METHOD, "read by split_ids: (ids, example) pairs and dicts with an index/ids/idx entry",
    ),
    "per_example_loss": TaskMethod(
        "per_example_loss(model, batch) -> Tensor[B]", "each example's training loss, summed over tokens/outputs",
        EVERY_METHOD, "",
    ),
    "measurement": TaskMethod(
        "measurement(model, batch) -> Tensor[B]", "what a query measures, m(x)", EVERY_METHOD, "the per-example loss",
    ),
    "padding_mask": TaskMethod(
        "padding_mask(batch) -> BoolTensor[B, T] | None", "True at real tokens of sequence batches",
        EVERY_METHOD, "None (no padding)",
    ),
    "gradient_scale": TaskMethod(
        "gradient_scale(batch) -> float", "c with training_loss = c * sum_b per_example_loss_b", EVERY_METHOD, "1.0",
    ),
    "sampled_loss": TaskMethod(
        "sampled_loss(model, batch, generator=None) -> Tensor[B]",
        "each example's loss for labels sampled from the model's predictive distribution",
        "EK-FAC with fisher='true'", "",
    ),
    "logits": TaskMethod(
        "logits(model, batch) -> Tensor[B, C] | Tensor[B, T, V]", "the model outputs the loss is a function of",
        "LiSSA's curvature='ggn' and its logit/feature samplers; predicted labels in the examples view", "",
    ),
    "targets": TaskMethod(
        "targets(batch) -> Tensor[B]", "each example's class (sequences: the first target token)",
        "LiSSA's logit sampler", "",
    ),
    "loss_from_outputs": TaskMethod(
        "loss_from_outputs(outputs, batch) -> Tensor[B]", "the per-example loss as a function of logits(model, batch)",
        "LiSSA's curvature='ggn'; Z0-Inf (losses from the training forward's outputs)", "",
    ),
}
"""The whole task contract: every method any part of the library calls on a task. The methods
needed by :data:`EVERY_METHOD` are checked by :func:`resolve_task` always, the others when a
caller names them in ``needs``; a task that passes is never asked for another method."""

REQUIRED_METHODS = tuple(name for name, m in TASK_CONTRACT.items() if m.needed_by == EVERY_METHOD)


class MissingExampleIdsError(InfluenceError, ValueError):
    """A batch carries no example ids where the method needs them."""


@runtime_checkable
class TaskLike(Protocol):
    """The methods every task provides (structural type: any object with these methods works);
    some features need more (:data:`TASK_CONTRACT`: ``sampled_loss``, ``logits``, ``targets``,
    ``loss_from_outputs``)."""

    def example_ids(self, batch: Any) -> Optional[Tensor]: ...
    def per_example_loss(self, model: nn.Module, batch: Any) -> Tensor: ...
    def measurement(self, model: nn.Module, batch: Any) -> Tensor: ...
    def padding_mask(self, batch: Any) -> Optional[Tensor]: ...
    def gradient_scale(self, batch: Any) -> float: ...


def example_count(task: TaskLike, batch: Any) -> int:
    """Examples in ``batch``: the number of ids when it carries them, else the leading size of
    its first tensor."""
    ids = task.example_ids(batch)
    return int(ids.numel()) if ids is not None else leading_size(batch)


class InfluenceTask:
    """Base class with the contract's defaults (:data:`TASK_CONTRACT`): ``example_ids``,
    ``measurement``, ``padding_mask`` and ``gradient_scale``. A subclass defines
    ``per_example_loss`` and whichever of ``sampled_loss``, ``logits``, ``targets`` and
    ``loss_from_outputs`` the features it is used with need; :func:`resolve_task` names any
    that is missing."""

    def example_ids(self, batch: Any) -> Optional[Tensor]:
        """``LongTensor[B]`` of example ids, or ``None`` when the batch has none."""
        ids, _ = split_ids(batch)
        return ids

    def require_ids(self, batch: Any) -> Tensor:
        """Like :meth:`example_ids` but raise :class:`MissingExampleIdsError` when absent."""
        ids = self.example_ids(batch)
        if ids is None:
            raise MissingExampleIdsError(
                "this batch carries no example ids; wrap the dataset in "
                "lightning_influence.IndexedDataset (items become (index, example)), or define "
                "`example_ids(batch)` on your LightningModule or task"
            )
        return ids

    def measurement(self, model: nn.Module, batch: Any) -> Tensor:
        """Query measurement m(x) per example, ``Tensor[B]``; default: the per-example loss."""
        return self.per_example_loss(model, batch)

    def padding_mask(self, batch: Any) -> Optional[Tensor]:
        """``BoolTensor[B, T]`` (True = real token) for sequence batches, else ``None``."""
        return None

    def gradient_scale(self, batch: Any) -> float:
        """``c`` with ``training_loss = c * sum_b per_example_loss_b`` (see module docstring)."""
        return 1.0


class ClassificationTask(InfluenceTask):
    """``(x, y)`` or ``(ids, (x, y))`` batches; ``model(x)`` returns ``Tensor[B, C]`` logits.

    Args:
        loss: ``"cross_entropy"`` (logits, integer labels) or ``"mse"`` (per-example loss is the
            *sum* of squared errors over output dimensions; sampled labels are ``out + N(0, 1/2)``,
            the Gaussian whose negative log-likelihood is that loss up to a constant).
        training_reduction: how the LightningModule reduces its training loss over the batch:
            ``"mean"`` (PyTorch's default, also the mean over all elements for ``mse``) or ``"sum"``.
    """

    def __init__(
        self,
        loss: Literal["cross_entropy", "mse"] = "cross_entropy",
        training_reduction: Literal["mean", "sum"] = "mean",
    ) -> None:
        if loss not in ("cross_entropy", "mse"):
            raise ValueError(f"ClassificationTask(loss=...) must be 'cross_entropy' or 'mse', got {loss!r}")
        if training_reduction not in ("mean", "sum"):
            raise ValueError(
                f"ClassificationTask(training_reduction=...) must be 'mean' or 'sum', got {training_reduction!r}"
            )
        self.loss = loss
        self.training_reduction = training_reduction

    @staticmethod
    def inputs_targets(batch: Any) -> tuple[Any, Tensor]:
        """Return ``(x, y)`` from any supported batch layout."""
        _, example = split_ids(batch)
        if isinstance(example, (tuple, list)) and len(example) == 2:
            return example[0], example[1]
        raise ValueError(
            "ClassificationTask expects batches (x, y) or (ids, (x, y)); got "
            f"{describe(batch)}. Pass a custom task or define per_example_loss(batch) on the module."
        )

    def logits(self, model: nn.Module, batch: Any) -> Tensor:
        """Model outputs ``Tensor[B, C]``."""
        x, _ = self.inputs_targets(batch)
        return _output_tensor(model(x))

    def targets(self, batch: Any) -> Tensor:
        """Labels ``Tensor[B]`` (or ``Tensor[B, D]`` for ``mse``)."""
        return self.inputs_targets(batch)[1]

    def loss_for_targets(self, out: Tensor, y: Tensor) -> Tensor:
        """Per-example loss ``Tensor[B]`` of outputs ``out`` for targets ``y``."""
        if self.loss == "cross_entropy":
            return F.cross_entropy(out, y, reduction="none")
        if y.shape != out.shape and y.numel() == out.numel():
            y = y.reshape(out.shape)  # one regression target per example: labels [B], outputs [B, 1]
        diff = (out - y.to(out.dtype)).reshape(out.shape[0], -1)
        return diff.pow(2).sum(dim=1)

    def loss_from_outputs(self, outputs: Tensor, batch: Any) -> Tensor:
        return self.loss_for_targets(outputs, self.targets(batch))

    def per_example_loss(self, model: nn.Module, batch: Any) -> Tensor:
        return self.loss_for_targets(self.logits(model, batch), self.targets(batch))

    def sample_targets(self, out: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """Labels drawn from the model's predictive distribution (no gradient)."""
        out = out.detach()
        if self.loss == "cross_entropy":
            probs = torch.softmax(out.float(), dim=-1)
            return torch.multinomial(probs, 1, generator=generator).squeeze(1)
        noise = torch.randn(out.shape, generator=generator, device=out.device, dtype=out.dtype)
        return out + noise * (0.5 ** 0.5)

    def sampled_loss(self, model: nn.Module, batch: Any, generator: Optional[torch.Generator] = None) -> Tensor:
        out = self.logits(model, batch)
        return self.loss_for_targets(out, self.sample_targets(out, generator))

    def gradient_scale(self, batch: Any) -> float:
        if self.training_reduction == "sum":
            return 1.0
        y = self.targets(batch)
        n = y.shape[0]
        if self.loss == "mse":
            n = y.numel()
        return 1.0 / max(n, 1)


class _DictClassificationTask(ClassificationTask):
    """Classification of Hugging Face style dict batches: the model is called with the batch's
    ``input_keys`` as keyword arguments and returns logits ``Tensor[B, C]`` (a tensor, a dict or
    an object with ``.logits``); ``labels`` holds one class per example, ``LongTensor[B]``.
    Training reduction ``"mean"`` is transformers' default (``loss`` of ``*ForSequenceClassification``
    / ``*ForImageClassification``)."""

    input_keys: tuple[str, ...] = ()
    required_key: str = ""

    def fields(self, batch: Any) -> dict[str, Tensor]:
        """The batch's dict of tensors, without the ids."""
        _, example = split_ids(batch)
        if not isinstance(example, dict) or self.required_key not in example or "labels" not in example:
            raise ValueError(
                f"{type(self).__name__} expects a dict batch with {self.required_key!r} and 'labels' (optionally "
                f"under ids), got {describe(batch)}"
            )
        return example

    def inputs_targets(self, batch: Any) -> tuple[dict[str, Tensor], Tensor]:  # type: ignore[override]
        """``(model keyword arguments, labels)``."""
        f = self.fields(batch)
        return {k: f[k] for k in self.input_keys if k in f}, f["labels"]

    def logits(self, model: nn.Module, batch: Any) -> Tensor:
        """Logits ``Tensor[B, C]`` of ``model(**inputs)``."""
        inputs, _ = self.inputs_targets(batch)
        return _output_tensor(model(**inputs))


class SequenceClassificationTask(_DictClassificationTask):
    """Sequence classification dict batches ``{"input_ids", "attention_mask", "labels"}`` with
    one label per sequence (``labels: LongTensor[B]``), e.g. for ``*ForSequenceClassification``.

    The model is called as ``model(input_ids=..., attention_mask=..., [token_type_ids=...])``
    (the keys the batch has). The per-example loss is the cross-entropy of the sequence's label
    (``loss="mse"``: squared error, for ``num_labels=1`` regression); the padding mask is
    ``attention_mask``, so padding tokens never enter the factors of token-wise layers.

    Args:
        loss: ``"cross_entropy"`` or ``"mse"`` (see :class:`ClassificationTask`).
        training_reduction: ``"mean"`` over the batch (transformers' default) or ``"sum"``.
    """

    input_keys = ("input_ids", "attention_mask", "token_type_ids")
    required_key = "input_ids"

    def padding_mask(self, batch: Any) -> Optional[Tensor]:
        mask = self.fields(batch).get("attention_mask")
        return None if mask is None else mask.bool()


class ImageClassificationTask(_DictClassificationTask):
    """Image classification dict batches ``{"pixel_values": Tensor[B, C, H, W], "labels": LongTensor[B]}``,
    e.g. for ``*ForImageClassification``; the model is called as ``model(pixel_values=...)``.

    Args:
        loss: ``"cross_entropy"`` or ``"mse"`` (see :class:`ClassificationTask`).
        training_reduction: ``"mean"`` over the batch (transformers' default) or ``"sum"``.
    """

    input_keys = ("pixel_values",)
    required_key = "pixel_values"


class CausalLMTask(InfluenceTask):
    """Hugging Face causal-LM dict batches: ``input_ids``, optional ``attention_mask`` and
    ``labels`` (``-100`` ignored; defaults to ``input_ids`` with padding ignored).

    The model is called as ``model(input_ids=..., attention_mask=...)`` and must return logits
    ``Tensor[B, T, V]`` (a tensor, a dict or an object with ``.logits``). Targets are shifted:
    position ``t`` predicts ``labels[t + 1]``. The per-example loss is the **sum** of token
    losses; the default training reduction is the token mean used by transformers.

    Args:
        training_reduction: ``"token_mean"`` (transformers' default), ``"mean"`` (mean over
            examples of summed token losses) or ``"sum"``.
    """

    def __init__(self, training_reduction: Literal["token_mean", "mean", "sum"] = "token_mean") -> None:
        if training_reduction not in ("token_mean", "mean", "sum"):
            raise ValueError(
                "CausalLMTask(training_reduction=...) must be 'token_mean', 'mean' or 'sum', "
                f"got {training_reduction!r}"
            )
        self.training_reduction = training_reduction

    @staticmethod
    def fields(batch: Any) -> dict[str, Tensor]:
        """The batch's dict of tensors (``input_ids``, ...), without the ids."""
        _, example = split_ids(batch)
        if not isinstance(example, dict) or "input_ids" not in example:
            raise ValueError(
                f"CausalLMTask expects a dict batch with 'input_ids' (optionally under ids), got {describe(batch)}"
            )
        return example

    def shifted_labels(self, batch: Any) -> Tensor:
        """``LongTensor[B, T-1]``: the target of each position, ``-100`` where ignored."""
        f = self.fields(batch)
        labels = f.get("labels")
        if labels is None:
            labels = f["input_ids"].clone()
            mask = f.get("attention_mask")
            if mask is not None:
                labels = labels.masked_fill(mask == 0, -100)
        return labels[:, 1:]

    def logits(self, model: nn.Module, batch: Any) -> Tensor:
        """Logits ``Tensor[B, T, V]``."""
        f = self.fields(batch)
        kwargs = {"input_ids": f["input_ids"]}
        if "attention_mask" in f:
            kwargs["attention_mask"] = f["attention_mask"]
        return _output_tensor(model(**kwargs))

    def targets(self, batch: Any) -> Tensor:
        """Per-example class for samplers: the first non-ignored target token, ``LongTensor[B]``."""
        labels = self.shifted_labels(batch)
        valid = labels != -100
        first = valid.float().argmax(dim=1)
        return labels.gather(1, first[:, None]).squeeze(1).clamp_min(0)

    @staticmethod
    def summed_token_losses(logits: Tensor, labels: Tensor) -> Tensor:
        """``Tensor[B]``: token cross-entropies of ``logits[:, :-1]`` against shifted ``labels``
        (``LongTensor[B, T-1]``, ``-100`` ignored), summed over tokens."""
        logits = logits[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="none")
        return loss.view(labels.shape).sum(dim=1)

    def loss_from_outputs(self, outputs: Tensor, batch: Any) -> Tensor:
        return self.summed_token_losses(outputs, self.shifted_labels(batch))

    def per_example_loss(self, model: nn.Module, batch: Any) -> Tensor:
        return self.summed_token_losses(self.logits(model, batch), self.shifted_labels(batch))

    def sampled_loss(self, model: nn.Module, batch: Any, generator: Optional[torch.Generator] = None) -> Tensor:
        logits = self.logits(model, batch)
        labels = self.shifted_labels(batch)
        probs = torch.softmax(logits[:, :-1].detach().float(), dim=-1)
        sampled = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator).view(labels.shape)
        sampled = sampled.masked_fill(labels == -100, -100)
        return self.summed_token_losses(logits, sampled)

    def padding_mask(self, batch: Any) -> Optional[Tensor]:
        mask = self.fields(batch).get("attention_mask")
        return None if mask is None else mask.bool()

    def gradient_scale(self, batch: Any) -> float:
        if self.training_reduction == "sum":
            return 1.0
        labels = self.shifted_labels(batch)
        if self.training_reduction == "mean":
            return 1.0 / max(labels.shape[0], 1)  # an empty batch contributes nothing, whatever the scale
        n = int((labels != -100).sum())
        return 1.0 / max(n, 1)


class ModuleTask(InfluenceTask):
    """A task whose methods come from a LightningModule where it defines them.

    For each method of :data:`TASK_CONTRACT`, a method ``module.<name>(...)`` taking the same
    arguments minus ``model`` (``sampled_loss`` also takes ``generator=``; ``loss_from_outputs``
    takes ``(outputs, batch)``) replaces the default; the rest fall back to ``default`` (chosen
    from the first batch when ``None`` by :func:`default_task_for`).

    A module that defines its own ``per_example_loss`` changes what the loss is, so the
    default's ``measurement``, ``sampled_loss`` and ``loss_from_outputs`` no longer describe it:
    ``measurement`` then follows the module's loss, and ``loss_from_outputs`` must be defined by
    the module too where it is needed (:func:`resolve_task` checks).
    """

    def __init__(self, module: Optional[nn.Module] = None, default: Optional[TaskLike] = None) -> None:
        self.module = module
        self.default = default

    def default_for(self, batch: Any) -> TaskLike:
        """The fallback task (fixed by the first batch seen when not given)."""
        if self.default is None:
            self.default = default_task_for(batch)
        return self.default

    def own(self, name: str) -> Optional[Any]:
        """The module's bound method ``name`` when the module's class defines it, else ``None``."""
        if self.module is None or not callable(getattr(type(self.module), name, None)):
            return None
        return getattr(self.module, name)

    def example_ids(self, batch: Any) -> Optional[Tensor]:
        own = self.own("example_ids")
        return own(batch) if own else self.default_for(batch).example_ids(batch)

    def per_example_loss(self, model: nn.Module, batch: Any) -> Tensor:
        own = self.own("per_example_loss")
        return own(batch) if own else self.default_for(batch).per_example_loss(model, batch)

    def sampled_loss(self, model: nn.Module, batch: Any, generator: Optional[torch.Generator] = None) -> Tensor:
        own = self.own("sampled_loss")
        return own(batch, generator=generator) if own else self.default_for(batch).sampled_loss(model, batch, generator)

    def measurement(self, model: nn.Module, batch: Any) -> Tensor:
        own = self.own("measurement")
        if own:
            return own(batch)
        if self.own("per_example_loss"):
            return self.per_example_loss(model, batch)
        return self.default_for(batch).measurement(model, batch)

    def padding_mask(self, batch: Any) -> Optional[Tensor]:
        own = self.own("padding_mask")
        return own(batch) if own else self.default_for(batch).padding_mask(batch)

    def gradient_scale(self, batch: Any) -> float:
        own = self.own("gradient_scale")
        return float(own(batch)) if own else self.default_for(batch).gradient_scale(batch)

    def logits(self, model: nn.Module, batch: Any) -> Tensor:
        own = self.own("logits")
        return own(batch) if own else self.default_for(batch).logits(model, batch)

    def targets(self, batch: Any) -> Tensor:
        own = self.own("targets")
        return own(batch) if own else self.default_for(batch).targets(batch)

    def loss_from_outputs(self, outputs: Tensor, batch: Any) -> Tensor:
        own = self.own("loss_from_outputs")
        if own:
            return own(outputs, batch)
        if self.own("per_example_loss"):
            raise NotImplementedError(
                "the loss as a function of the model outputs is needed here (Gauss-Newton curvature), but the "
                "module defines its own per_example_loss(batch); also define loss_from_outputs(outputs, batch) "
                "-> Tensor[B] on the module, or use curvature='hessian'"
            )
        return self.default_for(batch).loss_from_outputs(outputs, batch)


def default_task_for(batch: Any) -> InfluenceTask:
    """The default task for a batch layout.

    * a dict with ``pixel_values`` and ``labels`` → :class:`ImageClassificationTask`;
    * a dict with ``input_ids`` and ``labels`` holding one label per sequence (``labels`` of
      rank 1, ``[B]``) → :class:`SequenceClassificationTask`;
    * any other dict with ``input_ids`` (``labels`` absent or ``[B, T]``) → :class:`CausalLMTask`;
    * anything else → :class:`ClassificationTask` (``(x, y)`` batches).
    """
    _, example = split_ids(batch)
    if isinstance(example, dict):
        labels = example.get("labels")
        if "pixel_values" in example and labels is not None:
            return ImageClassificationTask()
        if "input_ids" in example:
            if isinstance(labels, Tensor) and labels.dim() == 1:
                return SequenceClassificationTask()
            return CausalLMTask()
    return ClassificationTask()


def resolve_task(module: Optional[nn.Module] = None, task: Optional[TaskLike] = None, needs: Iterable[str] = ()) -> TaskLike:
    """The task to use, checked once and completely against :data:`TASK_CONTRACT`: ``task`` if
    given, else a :class:`ModuleTask` over ``module`` (defaults by batch layout when ``module``
    is ``None``).

    Args:
        module: the model whose own methods (``per_example_loss(batch)``, ...) override the defaults.
        task: a task object; it must have every method needed by :data:`EVERY_METHOD` plus ``needs``.
        needs: the other contract methods the caller will use (e.g. ``("sampled_loss",)`` for
            EK-FAC with ``fisher="true"``).

    Raises:
        InvalidArgumentError: ``task`` lacks a method it needs (all are named), ``needs`` names a
            method outside the contract, or ``module`` can compute no loss: it defines neither
            ``forward`` nor ``per_example_loss`` (or lacks one of ``needs`` the defaults would
            compute with ``forward``, or ``loss_from_outputs`` next to its own ``per_example_loss``).
    """
    from .validation import InvalidArgumentError

    needs = tuple(needs)
    unknown = [n for n in needs if n not in TASK_CONTRACT]
    if unknown:
        raise InvalidArgumentError(f"resolve_task(needs=...) names {unknown}, which are not in the task contract {list(TASK_CONTRACT)}")
    wanted = [n for n in TASK_CONTRACT if n in REQUIRED_METHODS or n in needs]
    if task is not None:
        missing = [n for n in wanted if not callable(getattr(task, n, None))]
        if missing:
            raise InvalidArgumentError(
                f"task={type(task).__name__} lacks required method(s) {missing}: "
                + "; ".join(f"{TASK_CONTRACT[n].signature}: {TASK_CONTRACT[n].purpose} (needed by {TASK_CONTRACT[n].needed_by})" for n in missing)
                + ". Subclass lightning_influence.InfluenceTask (or ClassificationTask, CausalLMTask, ...) for the defaults"
            )
        return task
    resolved = ModuleTask(module)
    if module is not None:
        _check_module(resolved, needs)
    return resolved


# the methods a ModuleTask computes with the default task, i.e. by calling ``module.forward``
_USES_FORWARD = ("per_example_loss", "sampled_loss", "logits")


def _check_module(task: "ModuleTask", needs: tuple[str, ...]) -> None:
    """Refuse now a module the defaults cannot compute with (see :func:`resolve_task`)."""
    from .validation import InvalidArgumentError

    name = type(task.module).__name__
    own_loss = task.own("per_example_loss") is not None
    if not own_loss and not _defines_forward(task.module):
        raise InvalidArgumentError(
            f"{name} defines neither forward nor per_example_loss, so the library cannot compute a per-example loss "
            f"(it calls the model on each batch's inputs); define forward(...) on {name} (the default tasks call "
            "model(x) or model(**inputs)) or per_example_loss(batch) -> Tensor[B], or pass task=..."
        )
    missing = []
    if not _defines_forward(task.module):
        missing += [n for n in needs if n in _USES_FORWARD and task.own(n) is None]
    if own_loss and "loss_from_outputs" in needs and task.own("loss_from_outputs") is None:
        missing.append("loss_from_outputs")
    if missing:
        raise InvalidArgumentError(
            f"{name} defines its own per_example_loss{'' if _defines_forward(task.module) else ' and no forward'}, so these "
            f"task methods cannot come from the defaults; define them on {name}: "
            + "; ".join(f"{TASK_CONTRACT[n].signature} (needed by {TASK_CONTRACT[n].needed_by})" for n in missing)
        )


def _defines_forward(module: nn.Module) -> bool:
    """Whether ``module``'s class defines ``forward`` (not torch's or Lightning's placeholder)."""
    fn = getattr(type(module), "forward", None)
    qualname = getattr(fn, "__qualname__", "")
    return fn is not None and qualname != "_forward_unimplemented" and qualname != "LightningModule.forward"


# --------------------------------------------------------------------------------------------
def _is_id_tensor(t: Any) -> bool:
    return isinstance(t, Tensor) and t.dim() == 1 and not t.is_floating_point() and not t.is_complex()


def split_ids(batch: Any) -> tuple[Optional[Tensor], Any]:
    """Split a batch into ``(ids, example_batch)``: ``(ids, example)`` / ``(ids, x, y)`` pairs and
    dicts with an ``index``/``ids``/``idx`` entry carry ids; anything else gives ``(None, batch)``."""
    if isinstance(batch, dict):
        for key in ("index", "ids", "idx"):
            if key in batch and _is_id_tensor(batch[key]):
                return batch[key], {k: v for k, v in batch.items() if k != key}
        return None, batch
    if isinstance(batch, (tuple, list)):
        if len(batch) == 2 and _is_id_tensor(batch[0]) and isinstance(batch[1], (tuple, list, dict)):
            return batch[0], batch[1]
        if len(batch) == 3 and _is_id_tensor(batch[0]):
            return batch[0], (batch[1], batch[2])
    return None, batch


def _output_tensor(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, dict) and "logits" in out:
        return out["logits"]
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(f"cannot find logits in model output of type {type(out).__name__}")
