"""Helpers for per-leaf optimizer state (private).

`optax.tree.map_params` finds the parts of a state that are copies of the
parameter tree by calling ``init`` with a leafless placeholder for the params:
whatever ``init`` builds by mapping over the params then comes out as a
placeholder and is treated as params-shaped. States that are *per leaf but not
params-shaped* (bases, context EMAs, per-leaf norms) must not be mistaken for
copies of the params, so :func:`map_per_leaf` returns a scalar marker for
them on the placeholder instead (the workaround `optax.masked` uses).

The placeholder is recognised by its shape, a leafless pytree node that is
not a standard container, rather than by Optax's private class.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def is_placeholder(params: Any) -> bool:
  """True when ``init`` is called by `optax.tree.map_params`."""
  if params is None or isinstance(params, (dict, list, tuple)):
    return False
  treedef = jax.tree.structure(params)
  return treedef.num_leaves == 0 and treedef.num_nodes == 1


def not_params() -> jax.Array:
  """The marker of a per-leaf, non-params-shaped state field."""
  return jnp.zeros([], jnp.int32)


def map_per_leaf(fn: Callable[..., Any], params: Any, **kwargs: Any) -> Any:
  """``jax.tree.map(fn, params)`` for per-leaf state that is not shaped like
  the params; a scalar marker on `optax.tree.map_params`'s placeholder."""
  if is_placeholder(params):
    return not_params()
  return jax.tree.map(fn, params, **kwargs)
