"""Helpers for per-leaf optimizer state (private).

`optax.tree.map_params` finds the parts of a state that are copies of the
parameter tree by calling ``init`` with a leafless placeholder for the params:
whatever ``init`` builds by mapping over the params then comes out as a
placeholder and is treated as params-shaped. States that are *per leaf but not
params-shaped* (bases, context EMAs, per-leaf norms) must not be mistaken for
copies of the params, so on the placeholder ``init`` returns :data:`NOT_PARAMS`
for them instead (the same workaround `optax.masked` uses).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

try:  # optax >= 0.2.5
  from optax.tree_utils._state_utils import _ParamsPlaceholder
except ImportError:  # pragma: no cover
  _ParamsPlaceholder = None


def is_placeholder(params: Any) -> bool:
  """True when ``init`` is called by `optax.tree.map_params`."""
  return _ParamsPlaceholder is not None and isinstance(params, _ParamsPlaceholder)


def not_params() -> Any:
  """A leaf that marks a per-leaf, non-params-shaped state field."""
  return jnp.zeros([], jnp.int32)
