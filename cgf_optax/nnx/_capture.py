"""Capture the inputs of a Flax nnx model's linear layers during its forward pass."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from cgf_optax import _paths

_LOCK = threading.RLock()
_INHERITED = object()


# ``{kernel path: activations}``: keys are the kernel's parameter path,
# ``'blocks/0/attn/qkv/kernel'``, as :func:`cgf_optax.context_align` expects
# them. A layer called several times in one forward pass gets its inputs
# stacked on a new leading (token) axis. A plain dict, so a valid pytree.
Captured = dict[str, jax.Array]


@dataclasses.dataclass
class _Active:
  """The innermost open capture: what :func:`remat_call` needs."""
  paths: dict[int, str]
  records: dict[str, list[jax.Array]]
  types: tuple[type, ...]
  stop_gradient: bool
  dtype: Any


_ACTIVE: contextvars.ContextVar[_Active | None] = contextvars.ContextVar(
    "cgf_optax_capture", default=None)


def _module_paths(model: nnx.Module) -> dict[int, str]:
  return {id(m): _paths.join(*path) for path, m in nnx.iter_modules(model)}


def _einsum_fan_in_first(einsum_str: str | None) -> bool:
  """True when the input's last axis is contracted with the kernel's first.

  E.g. ``'btd,dhk->bthk'`` or ``'...i,ij->...j'``: the kernel is then a linear
  map of the input's feature axis, laid out ``[fan_in, ...]``.
  """
  if not einsum_str or "->" not in einsum_str:
    return False
  operands, out = einsum_str.replace(" ", "").split("->")
  terms = operands.split(",")
  if len(terms) != 2 or not terms[0] or not terms[1]:
    return False
  x, k = terms
  letter = x[-1]
  return letter == k[0] and letter not in out and k.count(letter) == 1


def _single_input_axis(module: Any, args: tuple[Any, ...],
                       kwargs: dict[str, Any]) -> bool:
  if isinstance(module, nnx.Linear):
    return True
  if isinstance(module, nnx.LinearGeneral):
    axis = module.axis
    return isinstance(axis, int) or len(tuple(axis)) == 1
  if isinstance(module, nnx.Einsum):
    einsum_str = kwargs.get("einsum_str", args[0] if args else None)
    return _einsum_fan_in_first(einsum_str or module.einsum_str)
  return False


@contextlib.contextmanager
def capture_context(
    model: nnx.Module,
    *,
    types: Sequence[type] = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum),
    stop_gradient: bool = True,
    dtype: Any = None,
) -> Iterator[Captured]:
  """Records, during the forward pass inside the block, each linear layer's input.

  Use it inside the function you differentiate, around the model call, and
  return the result as an auxiliary output: the context is then captured in
  the same forward pass that computes the loss, with no second pass::

    def loss_fn(model, x, y):
      with cgf_optax.nnx.capture_context(model) as ctx:
        logits = model(x)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return loss, dict(ctx)

    (loss, ctx), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, x, y)
    optimizer.update(model, grads, context=ctx, value=loss)

  It works under :func:`flax.nnx.jit` and :func:`jax.jit` (it records the
  traced values of the function it is used in). Layers captured: instances
  of ``types`` found in ``model`` whose kernel is a linear map of the input's
  last (feature) axis laid out ``[fan_in, ...]``: ``nnx.Linear``;
  ``nnx.LinearGeneral`` with a single input axis (e.g. the query/key/value
  projections of ``nnx.MultiHeadAttention``; its output projection, which
  contracts two input axes, is skipped); ``nnx.Einsum`` whose equation
  contracts the input's last axis with the kernel's first (``'btd,dhk->bthk'``).
  They are keyed by the path of their ``kernel`` (``'blocks/0/qkv/kernel'``),
  which is how the transforms name that gradient leaf, whether the gradient
  is a raw ``nnx.State`` (as from ``nnx.split``/``jax.grad``) or pure arrays
  (as ``nnx.Optimizer`` passes it).

  While the block is open, the ``__call__`` of those classes is wrapped
  (process-wide, under a lock; restored on exit), so keep the block around
  the forward pass only.

  Args:
    model: the model whose layers to watch (the object the forward pass uses).
    types: the layer classes to capture.
    stop_gradient: detach the captured activations (they are optimizer
      inputs, not part of the loss).
    dtype: cast the captured activations (e.g. ``jnp.bfloat16`` to halve their
      memory); ``None`` keeps the layer input's dtype.

  Yields:
    A dict ``{kernel path: activations}``, filled when the block exits.
  """
  paths = _module_paths(model)
  records: dict[str, list[jax.Array]] = {}
  captured: Captured = {}

  def wrap(cls: type) -> Any:
    original = cls.__call__  # resolved through the MRO

    def call(self: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
      path = paths.get(id(self))
      if path is not None and _single_input_axis(self, args, kwargs):
        x = jax.lax.stop_gradient(inputs) if stop_gradient else inputs
        if dtype is not None:
          x = x.astype(dtype)
        key = _paths.join(path, "kernel")
        records.setdefault(key, []).append(x)
      return original(self, inputs, *args, **kwargs)

    return call

  token = _ACTIVE.set(_Active(paths, records, tuple(types), stop_gradient,
                               dtype))
  with _LOCK:
    patched: dict[type, Any] = {}
    for cls in types:
      if cls not in patched:
        # The class's own __call__ if it defines one (restored on exit), else
        # a sentinel meaning "inherited" (the override is deleted on exit).
        patched[cls] = cls.__dict__.get("__call__", _INHERITED)
        cls.__call__ = wrap(cls)
    try:
      yield captured
    finally:
      for cls, own in patched.items():
        if own is _INHERITED:
          del cls.__call__
        else:
          cls.__call__ = own
      _ACTIVE.reset(token)
  for key, xs in records.items():
    captured[key] = xs[0] if len(xs) == 1 else jnp.stack(xs)


def remat_call(module: nnx.Module, *args: Any, **kwargs: Any) -> Any:
  """``module(*args, **kwargs)`` under :func:`flax.nnx.remat`, visible to
  :func:`capture_context`.

  ``nnx.remat`` runs a copy of the module inside :func:`jax.checkpoint`, so
  a capture opened outside sees none of its layers (and could not take
  values out of the checkpointed trace anyway). Call rematerialised blocks
  through this instead: when a capture is open and ``module`` belongs to
  its model, the block's layers are captured inside the checkpointed
  function and returned as an extra output, under the same keys as without
  remat (``'blocks/0/attn/qkv/kernel'``); otherwise it is plain
  ``nnx.remat``. The captured inputs are outputs of the rematerialised
  function, so they stay in memory until the optimizer has used them, as
  they do without remat.

  Example::

    class Model(nnx.Module):
      def __call__(self, x):
        for block in self.blocks:
          x = cgf_optax.nnx.remat_call(block, x)
        return self.head(x)
  """
  active = _ACTIVE.get()
  prefix = None if active is None else active.paths.get(id(module))
  if prefix is None:
    return nnx.remat(lambda m, *a, **k: m(*a, **k))(module, *args, **kwargs)

  def inner(m: nnx.Module, *a: Any, **k: Any) -> tuple[Any, Captured]:
    with capture_context(m, types=active.types,
                         stop_gradient=active.stop_gradient,
                         dtype=active.dtype) as ctx:
      out = m(*a, **k)
    return out, dict(ctx)

  out, ctx = nnx.remat(inner)(module, *args, **kwargs)
  for key, x in ctx.items():
    active.records.setdefault(_paths.join(prefix, key), []).append(x)
  return out
