"""The ``"mean"`` and ``"temporal"`` strategies (stateless and EMA splits)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from cgf_optax.transforms._leaves import MatrixView
from cgf_optax.transforms._scales import Scales


def mean_split(g: jax.Array, view: MatrixView | None, num_scales: int) -> Scales:
  """Gradient centralization: the mean over the fan-in axis is global (with
  three scales: the matrix mean is global, the column means intermediate)."""
  if view is None:  # scalar or vector sent to "mean" by an override
    glob = jnp.broadcast_to(jnp.mean(g), g.shape).astype(g.dtype)
    return Scales(local=g - glob, global_=glob)
  gm = view.to_matrix(g)
  col = jnp.mean(gm, axis=1, keepdims=True)
  if num_scales == 2:
    glob = view.from_matrix(col).astype(g.dtype)
    return Scales(local=(g - glob).astype(g.dtype), global_=glob)
  total = jnp.mean(col, axis=2, keepdims=True)
  glob = view.from_matrix(total).astype(g.dtype)
  colb = view.from_matrix(col)
  return Scales(local=(g - colb).astype(g.dtype),
                intermediate=(colb - glob).astype(g.dtype),
                global_=glob)


def _ema(m: jax.Array, g: jax.Array, decay: Any, ok: jax.Array) -> jax.Array:
  new = optax.tree.update_moment(g.astype(m.dtype), m, decay, 1).astype(m.dtype)
  # `ok` (the gradient entry is finite) is not enough when the EMA's dtype is
  # narrower than the gradient's (float16): a finite entry may overflow it.
  return jnp.where(ok & jnp.isfinite(new), new, m)


def temporal_split(g: jax.Array, slow: jax.Array, fast: jax.Array | None,
                   count: jax.Array, slow_decay: Any, fast_decay: Any
                   ) -> tuple[Scales, jax.Array, jax.Array | None]:
  """Scales in time: bias-corrected slow (global) and, when ``fast`` is
  given (three scales), fast EMAs of ``g``; ``count`` is the step number
  after this one. Returns the parts and the new EMAs."""
  ok = jnp.isfinite(g)
  slow = _ema(slow, g, slow_decay, ok)
  s_hat = optax.tree.bias_correction(slow, slow_decay, count)
  if fast is None:
    return (Scales(local=(g - s_hat).astype(g.dtype),
                   global_=s_hat.astype(g.dtype)), slow, None)
  fast = _ema(fast, g, fast_decay, ok)
  f_hat = optax.tree.bias_correction(fast, fast_decay, count)
  return (Scales(local=(g - f_hat).astype(g.dtype),
                 intermediate=(f_hat - s_hat).astype(g.dtype),
                 global_=s_hat.astype(g.dtype)), slow, fast)
