"""CEGM step 3: normalise the entangled gradient to unit norm."""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from cgf_optax import _validation as v
from cgf_optax.transforms import _collectives as coll
from cgf_optax.transforms._state import map_per_leaf

__all__ = ["NormalizeScope", "NormalizeState", "normalize"]

NormalizeScope = Literal["leaf", "global"]
"""Normalise every leaf by its own norm, or the tree by its global norm."""
SCOPES = ("leaf", "global")


class NormalizeState(NamedTuple):
  """State of :func:`normalize`: the last norm ‖E‖ (telemetry).

  A float32 scalar for ``scope="global"``, a params-shaped tree of scalars for
  ``scope="leaf"``.
  """

  norm: Any


def normalize(
    scope: NormalizeScope = "leaf", eps: float | jax.Array = 1e-8, *,
    axis_name: coll.LeafAxisName = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Scales the updates to unit norm, :math:`\hat G = E / (\|E\|_2 + \epsilon)`.

  CEGM's Algorithm 1, line 10, with an :math:`\epsilon` that keeps a zero
  gradient at zero. ``scope="leaf"`` normalises every leaf by its own
  Frobenius norm (each layer's step then has length η, the "balance across
  layers" of the paper); ``scope="global"`` divides the whole tree by its
  global norm. Norms are computed in float32; the output keeps the input's
  dtype.

  Sharding: under :func:`jax.jit` on sharded updates the norms are of the
  whole leaves (XLA reduces across devices; nothing is gathered). Inside
  :func:`jax.shard_map`, ``axis_name`` names the mesh axes over which the
  leaves are *split* (FSDP or tensor-parallel blocks): each squared norm is
  ``psum``-ed over them (one collective per distinct set of axes). Data
  parallelism with gradients already averaged needs none (a whole gradient
  summed over the data axis would count once per device); for trees that
  mix split and replicated leaves give ``path -> axes`` (see
  :func:`cgf_optax.sharding.split_axes`).

  Args:
    scope: ``"leaf"`` or ``"global"``.
    eps: :math:`\epsilon \ge 0`.
    axis_name: inside :func:`jax.shard_map`, the mesh axis name(s) over which
      the leaves are split, or a function of the leaf path giving them
      (``None`` or ``()``: replicated); ``None``: no collective.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  Example:
    >>> import jax.numpy as jnp, cgf_optax
    >>> tx = cgf_optax.normalize(eps=0.0)
    >>> tx.update(jnp.array([3.0, 4.0]), tx.init(jnp.zeros(2)))[0]
    Array([0.6, 0.8], dtype=float32)

  References:
    Sisate et al., *Contextually Entangled Gradient Mapping for Optimized
    LLM Comprehension*,
    Section III.B, Algorithm 1 line 10.
  """
  scope = v.choice("scope", scope, SCOPES)
  eps = v.number("eps", eps, minimum=0.0)
  axes_of = coll.leaf_axis_names("axis_name", axis_name)

  def init_fn(params: Any) -> NormalizeState:
    if scope == "global":
      return NormalizeState(norm=jnp.zeros([], jnp.float32))
    v.real_float_leaves("normalize", params)
    return NormalizeState(
        norm=map_per_leaf(lambda _: jnp.zeros([], jnp.float32), params))

  def divide(u: jax.Array, n: jax.Array) -> jax.Array:
    d = n + eps
    # A zero leaf stays zero even with eps = 0 (u / 1 = 0, not 0 / 0); a
    # NaN norm still gives NaN.
    return (u / jnp.where(d == 0, 1.0, d)).astype(u.dtype)

  def keep_finite(new: jax.Array, old: jax.Array) -> jax.Array:
    # The norm of a non-finite step is not stored (the last finite one is
    # kept); the NaN/Inf reaches the output.
    return jnp.where(jnp.isfinite(new), new, old)

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    v.real_float_leaves("normalize", updates, "updates")
    if scope == "global":
      norm = jnp.sqrt(coll.tree_sq_norm(updates, axes_of))
      out = jax.tree.map(lambda u: divide(u, norm), updates)
      return out, NormalizeState(norm=keep_finite(norm, state.norm))
    norms = jax.tree.map(jnp.sqrt, coll.leaf_sq_norms(updates, axes_of))
    out = jax.tree.map(divide, updates, norms)
    return out, NormalizeState(
        norm=jax.tree.map(keep_finite, norms, state.norm))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
