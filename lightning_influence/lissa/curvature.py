"""Batched curvature-vector products and per-example gradients on a parameter subset (torch.func).

Everything here works on a *flat* parameter vector ``theta`` of length ``P``: the selected
parameters, each flattened, concatenated in ``model.named_parameters()`` order. Vectors are
``Tensor[K, P]`` in the dtype and on the device of the parameters.

The curvature ``H`` of a mini-batch is that of the **mean** per-example loss over the batch,
``L(theta) = (1/B) * sum_b loss_b(theta)``, where each ``loss_b`` is the task's per-example loss
(summed over tokens/outputs). Two kinds:

* ``"hessian"``: the exact Hessian ``d^2 L / d theta^2`` (reverse-over-reverse:
  one forward/backward per step, then a ``vmap``-ed vector-Jacobian product of the gradient,
  valid because the Hessian is symmetric);
* ``"ggn"``: the generalised Gauss-Newton ``J^T H_out J`` with ``J`` the Jacobian of the model
  outputs (``task.logits(model, batch)``) and ``H_out`` the Hessian, with respect to those
  outputs, of the mean of ``task.loss_from_outputs(outputs, batch)`` (positive semi-definite for
  cross-entropy and squared error).

Parameters outside the subset are held fixed (detached). Tied parameters (one tensor registered
under several names, e.g. GPT-2's ``lm_head.weight`` and ``transformer.wte.weight``) are one
tensor: it is differentiated once, through every place it is used (``functional_call`` with
``tie_weights=True`` substitutes it under all its names), whichever of its names selected it.

Memory: ``max_vectors`` bounds how many vectors one product maps over at once (the rest go in
further blocks through the same forward/backward graph); an allocation failure inside a
product raises :class:`~lightning_influence.lissa.budget.LiSSAMemoryError`, never a slower retry.
No Lightning import here.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Literal, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_map

from .. import validation as check
from ..batches import leading_size
from .budget import LiSSAMemoryError, is_out_of_memory
from ..params import select_parameters
from ..task import TaskLike

__all__ = ["CurvatureOperator", "CURVATURES"]

CURVATURES = ("hessian", "ggn")
_WARNED: set[str] = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def slice_batch(batch: Any, start: int, stop: int) -> Any:
    """Examples ``start:stop`` of a batch (every tensor with a leading dimension sliced)."""
    return tree_map(lambda x: x[start:stop] if isinstance(x, Tensor) and x.dim() else x, batch)


class _Call(nn.Module):
    """``forward(batch) = fn(model, batch)``, so that ``functional_call`` can swap parameters."""

    def __init__(self, model: nn.Module, fn: Callable[[nn.Module, Any], Tensor]) -> None:
        super().__init__()
        self.model = model
        self._fn = fn

    def forward(self, batch: Any) -> Tensor:
        return self._fn(self.model, batch)


class CurvatureOperator:
    """Curvature-vector products, gradients and per-example gradients on a parameter subset.

    Args:
        model: the model (``nn.Module``; a LightningModule works).
        task: how to read batches (see :mod:`lightning_influence.task`).
        params: the subset (see :func:`lightning_influence.params.select_parameters`: ``None``
            for all trainable parameters, ``"last_layer"``, or glob pattern(s) over parameter
            names). Memory is ``O(K * P)`` for ``K`` vectors, so restricting to, e.g., the last
            layers bounds it on larger models.
        curvature: ``"hessian"`` or ``"ggn"`` (see module docstring); ``"ggn"`` needs the
            task's ``logits(model, batch)`` and ``loss_from_outputs(outputs, batch)``.
        vectorize: use ``torch.func.vmap`` over vectors and examples (falls back to a Python
            loop, with a warning, if the model has an operation ``vmap`` does not support; an
            out-of-memory error is never retried that way but raised as
            :class:`~lightning_influence.lissa.budget.LiSSAMemoryError`).
        max_vectors: the most vectors (and examples, for per-example gradients) one ``vmap``
            carries at once; ``None``: all of them. Set from a memory budget by
            :func:`~lightning_influence.lissa.self_influence`.
        max_examples: the most mini-batch examples one curvature product differentiates in one
            pass: a larger mini-batch's product is the example-weighted sum of its parts'
            (the same value, less memory); ``None``: the whole mini-batch.
        owner: who asks, for error messages (e.g. ``"LiSSAOptions"`` when the options came from there).

    Raises:
        InvalidArgumentError: unknown ``curvature``, or ``"ggn"`` with a task that lacks
            ``logits`` / ``loss_from_outputs``.
        PatternError: a ``params`` pattern matches no trainable parameter.
    """

    def __init__(
        self,
        model: nn.Module,
        task: TaskLike,
        params: Optional[str | Sequence[str]] = None,
        curvature: Literal["hessian", "ggn"] = "hessian",
        vectorize: bool = True,
        owner: str = "CurvatureOperator",
        max_vectors: Optional[int] = None,
        max_examples: Optional[int] = None,
    ) -> None:
        check.choice(owner, "curvature", curvature, CURVATURES)
        if curvature == "ggn":
            missing = [m for m in ("logits", "loss_from_outputs") if not callable(getattr(task, m, None))]
            if missing:
                raise check.InvalidArgumentError(
                    f"{owner}(curvature='ggn') needs the task's model outputs and the loss as a function of them, "
                    f"but task {type(task).__name__} lacks {missing}; define logits(model, batch) and "
                    "loss_from_outputs(outputs, batch) -> Tensor[B], or use curvature='hessian'"
                )
        self.model = model
        self.task = task
        self.curvature = curvature
        self.vectorize = vectorize
        self.max_vectors = check.positive_int(owner, "max_vectors", max_vectors, allow_none=True)
        self.max_examples = check.positive_int(owner, "max_examples", max_examples, allow_none=True)
        selected, seen = {}, set()
        for n, p in select_parameters(model, params, owner=owner).items():
            if id(p) not in seen:  # a tied tensor selected under two names is one parameter
                seen.add(id(p))
                selected[n] = p
        self.names = list(selected)
        self.shapes = [tuple(p.shape) for p in selected.values()]
        self.numels = [p.numel() for p in selected.values()]
        # frozen: every other tensor, by identity (a tied alias of a selected tensor is the selected
        # one: functional_call's tie_weights substitutes it under every name)
        self._frozen = {"model." + n: p.detach() for n, p in model.named_parameters() if id(p) not in seen}
        self.tied = {n: [a for a, q in model.named_parameters(remove_duplicate=False) if q is p and a != n]
                     for n, p in selected.items()}
        self.tied = {n: a for n, a in self.tied.items() if a}
        self._params = list(selected.values())
        self._outputs_checked = False
        self._loss_mod = _Call(model, lambda m, b: task.per_example_loss(m, b))
        self._logit_mod = _Call(model, lambda m, b: task.logits(m, b))

    # ---------------------------------------------------------------------------- layout
    @property
    def num_params(self) -> int:
        """``P``, the length of the flat parameter vector."""
        return sum(self.numels)

    @property
    def dtype(self) -> torch.dtype:
        return self._params[0].dtype

    @property
    def device(self) -> torch.device:
        return self._params[0].device

    def flat_params(self) -> Tensor:
        """Current values of the subset, ``Tensor[P]`` (detached)."""
        return torch.cat([p.detach().reshape(-1) for p in self._params])

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """``Tensor[..., P]`` → ``{name: Tensor[..., *shape]}`` (views; differentiable)."""
        lead = flat.shape[:-1]
        parts = torch.split(flat, self.numels, dim=-1)
        return {n: t.reshape(lead + s) for n, t, s in zip(self.names, parts, self.shapes)}

    def _call(self, module: _Call, theta: Tensor, batch: Any) -> Tensor:
        params = {"model." + n: t for n, t in self.unflatten(theta).items()}
        # the math attention kernel: the fused CPU/GPU kernels have no double backward or
        # forward-mode derivative, which Hessian- and GGN-vector products need
        with sdpa_kernel(SDPBackend.MATH):
            return functional_call(module, {**self._frozen, **params}, (batch,), tie_weights=True)

    # ---------------------------------------------------------------------------- losses
    def per_example_loss(self, theta: Tensor, batch: Any) -> Tensor:
        """``Tensor[B]`` per-example losses at ``theta`` (summed over tokens)."""
        return self._call(self._loss_mod, theta, batch)

    def mean_loss(self, theta: Tensor, batch: Any) -> Tensor:
        """Mean over the batch of the per-example losses: the loss whose curvature is used."""
        return self.per_example_loss(theta, batch).mean()

    def gradient(self, batch: Any) -> Tensor:
        """Gradient of the mean loss, ``Tensor[P]``."""
        return grad(self.mean_loss)(self.flat_params(), batch)

    # ---------------------------------------------------------------------------- products
    def matvec(self, batch: Any, vectors: Tensor) -> Tensor:
        """``H_batch @ v`` for each row of ``vectors`` (``Tensor[K, P]`` → ``Tensor[K, P]``).

        ``H_batch`` is the Hessian (or GGN) of the *mean* per-example loss over ``batch``.
        One forward/backward of the batch serves all ``K`` vectors (mapped over ``max_vectors``
        at a time).

        Raises:
            LiSSAMemoryError: an allocation failed (the message names the knobs).
        """
        try:
            n = leading_size(batch)
            m = self.max_examples
            if m is None or n <= m:
                return self._matvec(batch, vectors)
            out: Optional[Tensor] = None  # H of the mean over n = Σ_parts (n_part / n) H of the part's mean
            for i in range(0, n, m):
                part = slice_batch(batch, i, min(n, i + m))
                r = self._matvec(part, vectors).mul_(min(n, i + m) - i).div_(n)
                out = r if out is None else out.add_(r)
            return out  # type: ignore[return-value]
        except Exception as e:
            if is_out_of_memory(e) and not isinstance(e, LiSSAMemoryError):
                raise self._oom(e, f"the {self.curvature} curvature product of {vectors.shape[0]} vectors") from e
            raise

    def _matvec(self, batch: Any, vectors: Tensor) -> Tensor:
        theta = self.flat_params()
        vectors = vectors.to(dtype=theta.dtype)
        if self.curvature == "hessian":
            g = grad(lambda t: self.mean_loss(t, batch))
            _, vjp_fn = vjp(g, theta)
            return self._map(lambda v: vjp_fn(v)[0], vectors, "hessian")
        f = lambda t: self._call(self._logit_mod, t, batch)  # noqa: E731
        out, vjp_f = vjp(f, theta)
        out = out.detach()
        if not self._outputs_checked:  # once, outside vmap: a task that cannot raises its own error here
            self.task.loss_from_outputs(out, batch)
            self._outputs_checked = True
        g_out = grad(lambda o: self.task.loss_from_outputs(o, batch).mean())
        jv = self._map(lambda v: jvp(f, (theta,), (v,))[1], vectors, "ggn-jvp")
        hjv = self._map(lambda u: jvp(g_out, (out,), (u,))[1], jv, "ggn-hout")
        return self._map(lambda u: vjp_f(u)[0], hjv, "ggn-vjp")

    def _map(self, fn: Callable[[Tensor], Tensor], xs: Tensor, key: str) -> Tensor:
        """``fn`` over the rows of ``xs``, ``max_vectors`` rows per ``vmap``."""
        step = self.max_vectors or max(1, xs.shape[0])
        if xs.shape[0] > step:
            return torch.cat([self._map(fn, xs[i : i + step], key) for i in range(0, xs.shape[0], step)])
        try:
            if self.vectorize:
                try:
                    return vmap(fn)(xs)
                except Exception as e:  # noqa: BLE001 - depends on the model's ops
                    if is_out_of_memory(e):
                        raise
                    _warn_once(key, f"vmap is not supported by an operation of this model for the {key} product "
                                    f"({type(e).__name__}: {e}); looping over vectors instead (slower)")
            return torch.stack([fn(x) for x in xs])
        except Exception as e:
            if is_out_of_memory(e) and not isinstance(e, LiSSAMemoryError):
                raise self._oom(e, f"the {key} curvature product of {xs.shape[0]} vectors") from e
            raise

    def _oom(self, error: BaseException, what: str) -> LiSSAMemoryError:
        return LiSSAMemoryError(
            f"LiSSA ran out of memory in {what} (P={self.num_params:,} selected parameters, "
            f"max_vectors={self.max_vectors}): {type(error).__name__}: {str(error)[:300]}. Pass LiSSAOptions(params=...) to "
            "select fewer parameters, a smaller sample_size (fewer activations per product), a smaller chunk_size, or "
            "a smaller memory_budget (bytes) so fewer vectors are carried at once")

    def activation_bytes(self, batch: Any) -> int:
        """Bytes of the tensors one forward pass over ``batch`` saves for backward (parameters
        excluded, each storage counted once): what a curvature product's memory scales with,
        per vector it maps over."""
        params = {t.untyped_storage().data_ptr() for t in self.model.parameters()}
        seen: set[int] = set()
        total = 0

        def pack(t: Tensor) -> Tensor:
            nonlocal total
            try:
                storage = t.untyped_storage()
            except (RuntimeError, NotImplementedError):  # e.g. a tensor subclass without storage
                return t
            ptr = storage.data_ptr()
            if ptr not in params and ptr not in seen:
                seen.add(ptr)
                total += storage.nbytes()
            return t

        theta = self.flat_params().requires_grad_(True)
        params.add(theta.untyped_storage().data_ptr())
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            self.mean_loss(theta, batch)
        return int(total)

    def per_example_grads(self, batch: Any) -> Tensor:
        """Gradients of each example's (summed) loss, ``Tensor[B, P]`` (not divided by ``B``)."""
        theta = self.flat_params()

        def single(t: Tensor, example: Any) -> Tensor:
            one = tree_map(lambda x: x.unsqueeze(0) if isinstance(x, Tensor) else x, example)
            return self.per_example_loss(t, one).sum()

        g = grad(single)
        n = leading_size(batch)
        step = self.max_vectors or max(1, n)
        if n > step:  # in blocks of max_vectors examples
            return torch.cat([self.per_example_grads(slice_batch(batch, i, i + step)) for i in range(0, n, step)])
        try:
            if self.vectorize:
                in_dims = tree_map(lambda x: 0 if isinstance(x, Tensor) else None, batch)
                try:
                    return vmap(g, in_dims=(None, in_dims))(theta, batch)
                except Exception as e:  # noqa: BLE001 - depends on the model's ops
                    if is_out_of_memory(e):
                        raise
                    _warn_once("per-example", f"vmap is not supported by an operation of this model for per-example "
                                              f"gradients ({type(e).__name__}: {e}); looping instead (slower)")
            rows = []
            for i in range(n):
                one = tree_map(lambda x: x[i : i + 1] if isinstance(x, Tensor) else x, batch)
                rows.append(grad(lambda t: self.per_example_loss(t, one).sum())(theta))
            return torch.stack(rows)
        except Exception as e:
            if is_out_of_memory(e) and not isinstance(e, LiSSAMemoryError):
                raise self._oom(e, f"the per-example gradients of {n} examples") from e
            raise

