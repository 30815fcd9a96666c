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

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from cgf_optax import _validation as v
from cgf_optax.transforms._leaves import path_str

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


def _sq(x: Any) -> jax.Array:
  return sum((jnp.sum(jnp.square(leaf.astype(jnp.float32)))
              for leaf in jax.tree.leaves(x)), start=jnp.zeros([], jnp.float32))


def sq_norms(parts: Sequence[Any], paths: Sequence[str],
             axes_of: Callable[[str], tuple[str, ...]]) -> list[jax.Array]:
  """Squared norms (float32) of ``parts`` (arrays or sub-trees), each summed
  over the devices of its leaf's split axes; one ``psum`` per distinct set
  of axes."""
  local = [_sq(p) for p in parts]
  groups: dict[tuple[str, ...], list[int]] = {}
  for i, path in enumerate(paths):
    groups.setdefault(axes_of(path), []).append(i)
  out = list(local)
  for axes, idx in groups.items():
    if not axes:
      continue
    summed = jax.lax.psum(jnp.stack([local[i] for i in idx]), axes)
    for j, i in enumerate(idx):
      out[i] = summed[j]
  return out


def global_sq_norm(parts: Sequence[Any], paths: Sequence[str],
                   axes_of: Callable[[str], tuple[str, ...]]) -> jax.Array:
  """The squared norm of all ``parts`` together: one ``psum`` per distinct
  set of split axes (the leaves sharing it summed locally first)."""
  groups: dict[tuple[str, ...], jax.Array] = {}
  for part, path in zip(parts, paths, strict=True):
    axes = axes_of(path)
    groups[axes] = groups.get(axes, jnp.zeros([], jnp.float32)) + _sq(part)
  return sum((jax.lax.psum(s, axes) if axes else s
              for axes, s in groups.items()),
             start=jnp.zeros([], jnp.float32))


def leaves_with_paths(tree: Any, is_leaf: Any = None
                      ) -> tuple[list[Any], list[str]]:
  """The leaves of ``tree`` (or sub-trees at ``is_leaf``) and their paths."""
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
  return [x for _, x in flat], [path_str(p) for p, _ in flat]
