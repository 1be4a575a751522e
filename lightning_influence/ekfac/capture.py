"""Hooks that read tracked layers' inputs and output gradients.

:class:`LayerCapture` registers a forward hook on every tracked layer. For each forward call
whose output requires grad it keeps the (detached, storage-sharing) input and registers a hook
on the output tensor; when the output's gradient arrives it calls
``on_gradient(layer, a, ds, mask)`` with

* ``a``: ``Tensor[B, T, a_dim]`` input rows with the bias column appended and padding rows zeroed,
* ``ds``: ``Tensor[B, T, d_out]`` output-gradient rows with padding rows zeroed,
* ``mask``: ``BoolTensor[B, T]`` (True = real token) or ``None``,

where the layer's own class turns raw tensors into rows (:meth:`TrackedLayer.rows
<lightning_influence.layers.TrackedLayer.rows>`): tokens for linear layers (``T = 1`` for
non-sequence inputs; inputs of rank > 3 flattened into ``T``), output positions with unfolded
input patches for convolutions.

Under ``torch.compile`` the recording part of the forward hook is excluded from the graph
(``torch.compiler.disable``): while the capture is enabled each tracked layer ends a graph
(a graph break) and its tensors are recorded eagerly, exactly as without compilation; while
it is disabled the compiled graph has no break (the compiler guards on ``enabled``).

Nothing is counted for a forward whose output never receives a gradient (validation, no-grad
passes, the no-grad first forward of reentrant activation checkpointing), and a recomputation
under checkpointing is counted once because only the outputs that autograd differentiates
receive gradients. In ``collect`` mode (the post-hoc passes, which differentiate the outputs they
collected) a layer inside a *reentrant* checkpoint that is active during the pass has no
differentiable output in the forward: :meth:`LayerCapture.collected` then says so and how to
fix it (non-reentrant checkpointing, or checkpointing off for scoring) instead of failing
obscurely; non-reentrant checkpointing works as without it.

``collect=True`` instead stores ``(a, ds)`` per layer for the caller (used by the offline
fitter and the scorer, which call :func:`torch.autograd.grad` on the captured outputs).
"""

from __future__ import annotations

import time
from typing import Callable, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from ..layers import TrackedLayer, in_backward_pass

__all__ = ["LayerCapture", "LayerIO", "per_example_gradients", "rotated_per_example_gradients", "rotated_square_sums"]


class LayerIO(NamedTuple):
    """One layer's captured data for a batch.

    Attributes:
        a: ``Tensor[B, T, a_dim]`` inputs with the bias column, padding rows zeroed.
        ds: ``Tensor[B, T, d_out]`` output gradients, padding rows zeroed.
        mask: ``BoolTensor[B, T]`` (True = real token) when this layer's tokens are the batch's
            sequence positions and some are padding, else ``None``.
    """

    a: Tensor
    ds: Tensor
    mask: Optional[Tensor]

GradientCallback = Callable[[TrackedLayer, Tensor, Tensor, Optional[Tensor]], None]


class LayerCapture:
    """Context manager that hooks tracked layers.

    Args:
        layers: layers from :func:`lightning_influence.select_layers`.
        on_gradient: called when a gradient arrives (streaming mode).
        collect: keep ``(a, ds)`` per layer (offline mode); read with :meth:`collected`.
    """

    def __init__(
        self,
        layers: Sequence[TrackedLayer],
        on_gradient: Optional[GradientCallback] = None,
        collect: bool = False,
    ) -> None:
        self.layers = list(layers)
        self.on_gradient = on_gradient
        self.collect = collect
        self.enabled = True
        self.mask: Optional[Tensor] = None
        self.seconds = 0.0  # wall time spent inside this capture's hooks (incl. on_gradient)
        self._handles: list = []
        self._outputs: dict[str, list[tuple[Tensor, Tensor]]] = {}
        self._grads: dict[str, list[tuple[Tensor, Tensor]]] = {}
        self._no_grad: set[str] = set()  # collect mode: layers that ran with an output that does not require grad

    # -- lifecycle --------------------------------------------------------------------------
    def attach(self) -> "LayerCapture":
        if self._handles:
            return self
        for layer in self.layers:
            self._handles.append(layer.module.register_forward_hook(self._make_forward_hook(layer)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.clear()

    def __enter__(self) -> "LayerCapture":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def clear(self) -> None:
        """Forget captured outputs and gradients (call between batches)."""
        self._outputs.clear()
        self._grads.clear()
        self._no_grad.clear()

    # -- hooks ------------------------------------------------------------------------------
    def _make_forward_hook(self, layer: TrackedLayer):
        @torch.compiler.disable
        def record(module, inputs, output):
            if not isinstance(output, Tensor) or not output.requires_grad:
                if self.collect and isinstance(output, Tensor):
                    self._no_grad.add(layer.name)
                return
            t0 = time.perf_counter()
            a = layer.forward_input(inputs).detach()
            mask = self.mask
            if self.collect and not in_backward_pass():
                # outputs are differentiated by the caller; a recomputation during that backward
                # (activation checkpointing) must not add a second entry
                self._outputs.setdefault(layer.name, []).append((a, output))
            if self.on_gradient is not None:

                def grad_hook(ds: Tensor, a=a, mask=mask) -> None:
                    if self.enabled:
                        t1 = time.perf_counter()
                        aa, dd, m = self.prepare(layer, a, ds.detach(), mask)
                        self.on_gradient(layer, aa, dd, m)
                        self.seconds += time.perf_counter() - t1

                output.register_hook(grad_hook)
            self.seconds += time.perf_counter() - t0

        def hook(module, inputs, output):
            # Under torch.compile this test is traced (a guard on `enabled`: one graph for
            # enabled, one for disabled) and `record` runs eagerly outside the graph (one graph
            # break per tracked layer, only while enabled), so the compiler never drops it.
            if self.enabled:
                record(module, inputs, output)

        return hook

    @staticmethod
    def prepare(layer: TrackedLayer, a: Tensor, ds: Tensor, mask: Optional[Tensor]) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """Raw ``(input, output grad)`` → rows with the bias column and the padding mask applied
        (see :meth:`TrackedLayer.rows <lightning_influence.layers.TrackedLayer.rows>`)."""
        return layer.rows(a, ds, mask)

    # -- offline mode -----------------------------------------------------------------------
    def outputs(self) -> list[Tensor]:
        """Every captured output tensor, in a stable order (for :func:`torch.autograd.grad`)."""
        return [out for layer in self.layers for _, out in self._outputs.get(layer.name, [])]

    def collected(self, output_grads: Sequence[Optional[Tensor]]) -> dict[str, LayerIO]:
        """Pair the gradients of :meth:`outputs` with the inputs: layer name → :class:`LayerIO`.

        Several calls of one layer are concatenated along the token axis (their masks too, when
        every call has one).
        """
        result: dict[str, LayerIO] = {}
        it = iter(output_grads)
        for layer in self.layers:
            parts = []
            for a, out in self._outputs.get(layer.name, []):
                g = next(it)
                if g is None:
                    g = torch.zeros_like(out)
                parts.append(LayerIO(*self.prepare(layer, a, g, self.mask)))
            if not parts and layer.name in self._no_grad:
                raise RuntimeError(
                    f"layer {layer.name!r} ran, but its output did not require grad, so it has no gradient to collect: "
                    "under a no-grad context, or inside a reentrant activation checkpoint (use_reentrant=True runs its "
                    "first forward without grad) that is active during this pass. Use torch.utils.checkpoint with "
                    "use_reentrant=False, or turn checkpointing off for scoring (transformers: "
                    "model.gradient_checkpointing_disable(); its checkpointing is off in eval mode anyway)"
                )
            if not parts:
                raise RuntimeError(f"layer {layer.name!r} was not called in the forward pass")
            if len(parts) == 1:
                result[layer.name] = parts[0]
            else:
                masks = [p.mask for p in parts]
                mask = torch.cat(masks, 1) if all(m is not None for m in masks) else None
                result[layer.name] = LayerIO(torch.cat([p.a for p in parts], 1), torch.cat([p.ds for p in parts], 1), mask)
        return result


def per_example_gradients(a: Tensor, ds: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """``Tensor[B, d_out, a_dim]``: ``sum_t ds[b, t] a[b, t]^T`` (no autograd over parameters)."""
    dtype = dtype or torch.promote_types(a.dtype, torch.float32)
    return torch.einsum("bto,bti->boi", ds.to(dtype), a.to(dtype))


def rotated_per_example_gradients(a: Tensor, ds: Tensor, q_a: Tensor, q_s: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """``Tensor[B, d_out, a_dim]``: ``Q_Sᵀ (sum_t ds_t a_tᵀ) Q_A`` per example.

    Two contraction orders give the same result: rotating the token vectors first costs about
    ``B·T·(a² + o²)`` multiply-adds, forming the gradients first ``B·o·a·(o + a)``; the cheaper
    one is used (short sequences favour the first, long ones the second).
    """
    dtype = dtype or torch.promote_types(a.dtype, torch.float32)
    t, o, i = a.shape[1], ds.shape[-1], a.shape[-1]
    q_a, q_s = q_a.to(dtype), q_s.to(dtype)
    if t * (i * i + o * o) <= o * i * (o + i):
        return torch.einsum("bto,bti->boi", ds.to(dtype) @ q_s, a.to(dtype) @ q_a)
    return q_s.T @ per_example_gradients(a, ds, dtype) @ q_a


LOOP_MIN_ELEMENTS = 1 << 16
"""Above this many entries (``d_out · a_dim``) per example, :func:`rotated_square_sums` loops
over the examples instead of materialising ``Tensor[B, d_out, a_dim]``."""


def rotated_square_sums(a: Tensor, ds: Tensor, q_a: Tensor, q_s: Tensor, dtype: Optional[torch.dtype] = None,
                        fourth: bool = False) -> tuple[Tensor, Optional[Tensor]]:
    """``(Σ_b R_b², Σ_b R_b⁴)`` (elementwise powers, ``Tensor[d_out, a_dim]`` each; the second
    only with ``fourth=True``) for ``R_b = Q_Sᵀ (Σ_t ds_bt a_btᵀ) Q_A``, the rotated per-example
    gradients of :func:`rotated_per_example_gradients`, without keeping all of them at once.

    * One token per example (``T = 1``): ``R_b = u_b v_bᵀ`` with ``u = ds Q_S``, ``v = a Q_A``, so
      ``Σ_b R_b² = (u²)ᵀ (v²)``: one matrix product, no per-example matrix at all.
    * Wide layers (``d_out · a_dim`` above :data:`LOOP_MIN_ELEMENTS`): one ``R_b`` at a time in
      a reused buffer, squared and added in place (``B`` small products instead of one batched
      product whose ``B · d_out · a_dim`` result is written, squared and summed in memory).
    * Otherwise: the batched product, squared and summed.

    The rotation order (tokens first, or per-example gradients first) is the cheaper one, as in
    :func:`rotated_per_example_gradients`. Non-finite inputs give non-finite sums.
    """
    dtype = dtype or torch.promote_types(a.dtype, torch.float32)
    b, t, o, i = a.shape[0], a.shape[1], ds.shape[-1], a.shape[-1]
    q_a, q_s = q_a.to(dtype), q_s.to(dtype)
    if t == 1:
        u, v = (ds[:, 0].to(dtype) @ q_s).square_(), (a[:, 0].to(dtype) @ q_a).square_()
        return u.T @ v, (u.square().T @ v.square() if fourth else None)
    if o * i < LOOP_MIN_ELEMENTS:
        rot = rotated_per_example_gradients(a, ds, q_a, q_s, dtype).square_()
        return rot.sum(0), ((rot * rot).sum(0) if fourth else None)
    tokens_first = t * (i * i + o * o) <= o * i * (o + i)
    if tokens_first:
        u, v = ds.to(dtype) @ q_s, a.to(dtype) @ q_a
    else:
        u, v = ds.to(dtype), a.to(dtype)
    sum2 = torch.zeros(o, i, dtype=dtype, device=a.device)
    sum4 = torch.zeros(o, i, dtype=dtype, device=a.device) if fourth else None
    buf = torch.empty(o, i, dtype=dtype, device=a.device)
    for k in range(b):
        torch.mm(u[k].T, v[k], out=buf)
        r = buf if tokens_first else q_s.T @ buf @ q_a
        r.square_()
        sum2.add_(r)
        if sum4 is not None:
            sum4.addcmul_(r, r)
    return sum2, sum4
