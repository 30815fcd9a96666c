"""Reductions across devices inside ``jax.shard_map`` (private).

The transforms that reduce across leaves or tokens take an ``axis_name``:
the names of the ``shard_map`` mesh axes their reduction must also run
over. Two kinds exist, and each transform's docstring says which it takes:

* **split axes** (:func:`cgf_optax.modulate_by_gradient_norm`,
  :func:`cgf_optax.normalize`): each device holds a *different block* of the
  leaf (FSDP or tensor-parallel params inside ``shard_map``), so a squared
  norm is the ``psum`` of the blocks' squared norms. A leaf *replicated* over
  an axis must not be summed over it (it would count once per device): give
  a function of the leaf's path for trees that mix the two
  (:func:`cgf_optax.sharding.split_axes` builds it from the params'
  partition specs).
* **batch axes** (:func:`cgf_optax.entangle`, :func:`cgf_optax.context_align`):
  the batch (its tokens, its loss) is split over them (data parallel). Their
  reductions are ratios or means (``pmean`` of the loss; softmax pooling as
  a ``psum`` of numerator and denominator, a ``pmax`` of the scores), so a
  value already reduced (replicated) gives the same result.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from cgf_optax import _paths
from cgf_optax import _validation as v

__all__ = ["AxisName", "LeafAxisName"]

AxisName = str | tuple[str, ...] | None
"""Mesh axis name(s) of a ``shard_map``: one name, a tuple of names, or
``None`` (no collective)."""

LeafAxisName = AxisName | Callable[[str], AxisName]
"""Axis name(s) for every leaf, or a function of the leaf's path
(``'blocks/0/qkv/kernel'``) returning them (``None`` or ``()``: replicated)."""


def _names(name: str, value: Any) -> tuple[str, ...]:
  if value is None:
    return ()
  if isinstance(value, str):
    if not value:
      raise ValueError(f"`{name}` must be a non-empty axis name, got ''.")
    return (value,)
  if isinstance(value, (tuple, list)) and all(
      isinstance(a, str) and a for a in value):
    if len(set(value)) != len(value):
      raise ValueError(f"`{name}` repeats an axis name: {tuple(value)!r}.")
    return tuple(value)
  raise v.HyperparameterTypeError(
      f"`{name}` must be a mesh axis name, a tuple of them or None, got "
      f"{type(value).__name__} {value!r}.")


def axis_names(name: str, value: Any) -> tuple[str, ...]:
  """Validates a batch-axes ``axis_name``; returns it as a tuple."""
  return _names(name, value)


def leaf_axis_names(name: str, value: Any) -> Callable[[str], tuple[str, ...]]:
  """Validates a split-axes ``axis_name``; returns ``path -> axes``."""
  if callable(value):
    def axes(path: str) -> tuple[str, ...]:
      return _names(f"{name}({path!r})", value(path))
    return axes
  names = _names(name, value)
  return lambda path: names


def sq_norm(tree: Any) -> jax.Array:
  """The squared norm of all leaves of ``tree``, summed in float32 (on this
  device: no collective)."""
  return sum((jnp.sum(jnp.square(leaf.astype(jnp.float32)))
              for leaf in jax.tree.leaves(tree)),
             start=jnp.zeros([], jnp.float32))


def _no_axes(path: str) -> tuple[str, ...]:
  del path
  return ()


def leaf_sq_norms(tree: Any, axes_of: Callable[[str], tuple[str, ...]] = _no_axes,
                  is_leaf: Any = None) -> Any:
  """The squared norm (float32) of every leaf of ``tree`` (or sub-tree at
  ``is_leaf``), each summed over the devices of its leaf's split axes: a
  tree of scalars, one ``psum`` per distinct set of axes (none without)."""
  parts, paths, treedef = _paths.flatten(tree, is_leaf)
  out = [sq_norm(p) for p in parts]
  groups: dict[tuple[str, ...], list[int]] = {}
  for i, path in enumerate(paths):
    groups.setdefault(axes_of(path), []).append(i)
  for axes, idx in groups.items():
    if not axes:
      continue
    summed = jax.lax.psum(jnp.stack([out[i] for i in idx]), axes)
    for j, i in enumerate(idx):
      out[i] = summed[j]
  return jax.tree_util.tree_unflatten(treedef, out)


def tree_sq_norm(tree: Any, axes_of: Callable[[str], tuple[str, ...]] = _no_axes,
                 is_leaf: Any = None) -> jax.Array:
  """The squared norm (float32) of the whole ``tree``: its leaves summed
  locally per distinct set of split axes, then one ``psum`` per set (none
  without axes)."""
  parts, paths, _ = _paths.flatten(tree, is_leaf)
  groups: dict[tuple[str, ...], jax.Array] = {}
  for part, path in zip(parts, paths, strict=True):
    axes = axes_of(path)
    acc = groups.get(axes, jnp.zeros([], jnp.float32))
    for leaf in jax.tree.leaves(part):
      acc = acc + jnp.sum(jnp.square(leaf.astype(jnp.float32)))
    groups[axes] = acc
  return sum((jax.lax.psum(s, axes) if axes else s
              for axes, s in groups.items()),
             start=jnp.zeros([], jnp.float32))
