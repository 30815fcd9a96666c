"""The guard of an inner optimizer against non-finite gradients (private).

One policy, for :func:`cgf_optax.modulate_step` and the aliases that put
Adam or momentum after the CGFM/CEGM steps: when the gradient is not finite
the inner optimizer is given zeros instead, so one bad step cannot poison
its state (its moments decay as on a zero-gradient step), and the step
returned is NaN, so that :func:`optax.apply_if_finite` or the caller sees
the bad step as with any Optax optimizer.

The NaN is selected only where the gradient was not finite: no NaN array is
ever built for a finite step (``jax_debug_nans`` then stays silent).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from cgf_optax.transforms import _collectives as coll


def guarded_update(
    inner: optax.GradientTransformationExtraArgs,
    finite: jax.Array,
    factor: Any,
    updates: Any,
    state: Any,
    params: Any = None,
    *,
    per_leaf: bool = False,
    **extra_args: Any,
) -> tuple[Any, Any]:
  """``inner``'s step times ``factor`` (a scalar, or with ``per_leaf`` a tree
  of scalars shaped like the step) on ``updates`` if ``finite``; else
  ``inner`` steps on zeros and the step returned is NaN."""
  # A select on the input fuses into the inner update; a select between old
  # and new states would defeat in-place updates of donated buffers.
  safe = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)),
                      updates)
  out, state = inner.update(safe, state, params, **extra_args)
  if per_leaf:
    out = jax.tree.map(lambda u, f: _scaled_or_nan(u, f, finite), out, factor)
  else:
    out = jax.tree.map(lambda u: _scaled_or_nan(u, factor, finite), out)
  return out, state


def _scaled_or_nan(u: jax.Array, factor: Any, finite: jax.Array) -> jax.Array:
  return jnp.where(finite, u * factor, jnp.nan).astype(u.dtype)


def zero_nonfinite(
    inner: optax.GradientTransformation,
    axis_name: coll.LeafAxisName = None,
) -> optax.GradientTransformationExtraArgs:
  """Runs ``inner`` on zeros when the updates are not all finite (the step
  returned is then NaN). With ``axis_name`` (split axes inside
  ``shard_map``) every device takes the same decision."""
  inner = optax.with_extra_args_support(inner)
  axes_of = coll.leaf_axis_names("norm_axis_name", axis_name)

  def update_fn(updates, state, params=None, **extra_args):
    # One reduction over the updates: the price of opting into momentum.
    finite = jnp.isfinite(coll.tree_sq_norm(updates, axes_of))
    return guarded_update(inner, finite, 1.0, updates, state, params,
                          **extra_args)

  return optax.GradientTransformationExtraArgs(inner.init, update_fn)
