"""CGFM step 3: curvature-aware step-size modulation by the gradient norm."""

from __future__ import annotations

import functools
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from cgf_optax import _arguments
from cgf_optax import _validation as v
from cgf_optax.transforms import _collectives as coll
from cgf_optax.transforms._guard import guarded_update
from cgf_optax.transforms._scales import is_scales
from cgf_optax.transforms._state import map_per_leaf

__all__ = ["ModulateState", "ModulateStepState", "ModulateReference", "ModulateScope",
           "modulate_by_gradient_norm", "modulate_step"]

ModulateReference = Literal["first", "ema"]
"""The reference norm of the modulation: the first step's, or an EMA."""
ModulateScope = Literal["global", "leaf"]
"""One norm for the whole tree, or one per leaf."""
REFERENCES = ("first", "ema")
SCOPES = ("global", "leaf")


class ModulateState(NamedTuple):
  """State of :func:`modulate_by_gradient_norm`.

  With ``scope="global"`` every field but ``count`` is a float32 scalar; with
  ``scope="leaf"`` they are trees of scalars shaped like the params.

  Attributes:
    count: number of updates so far (int32).
    reference: ``"first"``: the reference norm :math:`\\|\\nabla\\theta_0\\|`
      (0 until the first finite, non-zero gradient); ``"ema"``: the EMA
      accumulator of the norm (not bias-corrected).
    ref_steps: number of finite norms folded into ``reference``.
    norm: the last gradient norm :math:`\\|\\nabla_\\text{adj}\\|` (telemetry).
    factor: the last modulation factor (telemetry, and what
      :func:`modulate_step` applies).
    finite: whether the last gradient norm was finite (bool).
  """

  count: jax.Array
  reference: Any
  ref_steps: Any
  norm: Any
  factor: Any
  finite: Any


def modulate_by_gradient_norm(
    reference: ModulateReference = "first",
    max_factor: float | jax.Array | None = None,
    scope: ModulateScope = "global",
    eps: float | jax.Array = 1e-12,
    *,
    ema_decay: float | jax.Array = 0.99,
    axis_name: coll.LeafAxisName = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Multiplies the updates by :math:`1 + \|\nabla_\text{adj}\| / \|\nabla\theta_0\|`.

  CGFM's Algorithm 1, line 14 ("curvature-aware step size modulation"):

  .. math::
    \eta_\text{adj} = \eta \cdot \Big(1 + \frac{\|\nabla_\text{adj}\|}
      {\|\nabla\theta_0\|}\Big),

  with :math:`\|\nabla\theta_0\|` the norm of the first step's gradient, kept
  in the state. In an SGD chain, scaling the step size is scaling the
  gradient, which this transform does. Before an adaptive method (Adam) the
  factor would be normalised away: use :func:`modulate_step` (as
  :func:`cgf_optax.cgfm_adamw` does) to apply it to the inner optimizer's
  output instead.

  Options beyond the paper: ``reference="ema"`` divides by a bias-corrected
  EMA of the norm (decay ``ema_decay``) instead of the first norm; ``scope=
  "leaf"`` uses each leaf's own norm and reference; ``max_factor`` bounds the
  factor. Norms are computed in float32.

  Edge cases, chosen so the factor is always finite and :math:`\ge 1`: the
  reference is the first *finite, non-zero* norm (while none has been seen the
  factor is 1); a denominator below ``eps`` is replaced by ``eps``; a
  non-finite norm leaves the reference untouched (the updates, already
  non-finite, pass through multiplied by the factor computed as if the norm
  were 0, i.e. 1).

  Sharding: under :func:`jax.jit` on sharded updates the norms are global
  (XLA reduces across devices; no whole leaf is gathered) and the state is a
  few replicated scalars. Inside :func:`jax.shard_map`, ``axis_name`` names
  the mesh axes over which the updates' leaves are *split* (each device
  holds a different block, as FSDP or tensor-parallel params do): every
  leaf's squared norm is ``psum``-ed over them (one collective per distinct
  set of axes), so the factor is the unsharded one on every device. Data
  parallelism with gradients already averaged (``pmean``) needs no
  ``axis_name``: the gradient is whole on every device, and summing it over
  the data axis would count it once per device. For trees that mix split and
  replicated leaves (FSDP with replicated biases), give a function
  ``path -> axes`` (see :func:`cgf_optax.sharding.split_axes`).

  Args:
    reference: ``"first"`` (the paper) or ``"ema"``.
    max_factor: upper bound of the factor (>= 1), or ``None``.
    scope: ``"global"`` (one norm for the whole tree) or ``"leaf"``.
    eps: lower bound of the denominator.
    ema_decay: decay of the norm EMA for ``reference="ema"``.
    axis_name: inside :func:`jax.shard_map`, the mesh axis name(s) over which
      the updates' leaves are split, or a function of the leaf path
      (``'blocks/0/qkv/kernel'``) giving them (``None`` or ``()`` for a
      replicated leaf); ``None``: no collective.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  Example:
    >>> import jax.numpy as jnp, cgf_optax
    >>> tx = cgf_optax.modulate_by_gradient_norm()
    >>> state = tx.init(jnp.zeros(2))
    >>> u, state = tx.update(jnp.array([3.0, 4.0]), state)  # ‖g₀‖ = 5
    >>> u, state = tx.update(jnp.array([0.0, 10.0]), state)
    >>> state.factor  # 1 + 10 / 5
    Array(3., dtype=float32)

  References:
    Quillington et al., *Contextual Gradient Flow Modeling for Large
    Language Model Generalization in Multi-Scale Feature Spaces*,
    Section 3.3, Algorithm 1 line 14.
  """
  reference = v.choice("reference", reference, REFERENCES)
  scope = v.choice("scope", scope, SCOPES)
  if max_factor is not None:
    max_factor = v.number("max_factor", max_factor, minimum=1.0)
  eps = v.number("eps", eps, minimum=0.0)
  ema_decay = v.number("ema_decay", ema_decay, minimum=0.0, maximum=1.0)
  if not v.is_traced(ema_decay) and float(ema_decay) >= 1:
    raise ValueError(f"`ema_decay` must be < 1, got {float(ema_decay)}.")
  axes_of = coll.leaf_axis_names("axis_name", axis_name)

  def scalars(params: Any, value: float, dtype: Any) -> Any:
    if scope == "global":
      return jnp.full([], value, dtype)
    return map_per_leaf(lambda _: jnp.full([], value, dtype), params,
                        is_leaf=is_scales)

  def init_fn(params: Any) -> ModulateState:
    v.real_float_leaves("modulate_by_gradient_norm", params)
    return ModulateState(
        count=jnp.zeros([], jnp.int32),
        reference=scalars(params, 0.0, jnp.float32),
        ref_steps=scalars(params, 0, jnp.int32),
        norm=scalars(params, 0.0, jnp.float32),
        factor=scalars(params, 1.0, jnp.float32),
        finite=scalars(params, True, jnp.bool_))

  step = functools.partial(_factor_step, reference=reference,
                           max_factor=max_factor, eps=eps, ema_decay=ema_decay)

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    v.real_float_leaves("modulate_by_gradient_norm", updates, "updates")
    if scope == "global":
      norm = jnp.sqrt(coll.tree_sq_norm(updates, axes_of, is_scales))
      factor, ref, steps, norm, finite = step(norm, state.reference,
                                              state.ref_steps)
      out = jax.tree.map(lambda u: (u * factor).astype(u.dtype), updates)
    else:
      norms = jax.tree.map(jnp.sqrt,
                           coll.leaf_sq_norms(updates, axes_of, is_scales))
      res = jax.tree.map(step, norms, state.reference, state.ref_steps)
      treedef = jax.tree.structure(norms)
      flat = treedef.flatten_up_to(res)   # [(factor, ref, ...) per leaf]
      factor, ref, steps, norm, finite = (
          jax.tree.unflatten(treedef, xs)
          for xs in (zip(*flat, strict=True) if flat else [()] * 5))
      out = jax.tree.map(
          lambda u, f: jax.tree.map(lambda x: (x * f).astype(x.dtype), u),
          updates, factor, is_leaf=is_scales)
    return out, ModulateState(
        count=optax.safe_increment(state.count), reference=ref,
        ref_steps=steps, norm=norm, factor=factor, finite=finite)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _factor_step(norm: jax.Array, ref: jax.Array, ref_steps: jax.Array, *,
                 reference: str, max_factor: Any, eps: Any, ema_decay: Any
                 ) -> tuple[jax.Array, ...]:
  """One norm's factor, and its new reference, reference count, norm and
  finiteness (the norm is stored as 0 when it is not finite)."""
  ok = jnp.isfinite(norm)
  if reference == "first":
    take = ok & (ref_steps == 0) & (norm > 0)
    new_ref = jnp.where(take, norm, ref)
    new_steps = ref_steps + take.astype(jnp.int32)
    denom = new_ref
  else:
    new_ref = jnp.where(ok, ema_decay * ref + (1 - ema_decay) * norm, ref)
    new_steps = ref_steps + ok.astype(jnp.int32)
    denom = new_ref / (1 - ema_decay ** new_steps.astype(jnp.float32))
    denom = jnp.where(new_steps > 0, denom, 0.0)
  ratio = jnp.where(ok & (denom > 0), norm / jnp.maximum(denom, eps), 0.0)
  factor = 1.0 + ratio
  if max_factor is not None:
    factor = jnp.minimum(factor, max_factor)
  factor = factor.astype(jnp.float32)
  return (factor, new_ref.astype(jnp.float32), new_steps,
          jnp.where(ok, norm, 0.0).astype(jnp.float32), ok)


class ModulateStepState(NamedTuple):
  """State of :func:`modulate_step`: the modulation's and the inner's."""

  modulation: ModulateState
  inner: Any


@_arguments.with_shared(
    _arguments.of(modulate_by_gradient_norm,
                  ("reference", "max_factor", "scope", "eps"), positional=True),
    _arguments.of(modulate_by_gradient_norm, ("ema_decay", "axis_name")))
def modulate_step(
    inner: optax.GradientTransformation,
    **modulation: Any,
) -> optax.GradientTransformationExtraArgs:
  r"""Runs ``inner`` and scales its output by the factor of its *input*'s norm.

  The factor :math:`1 + \|g\| / \|g_0\|` of :func:`modulate_by_gradient_norm`
  is computed from the gradient :math:`g` entering ``inner`` (e.g. Adam) and
  multiplies ``inner``'s output, so that it modulates the step size as CGFM
  prescribes instead of being normalised away by the adaptive method.

  When the gradient is not finite (its norm is not), ``inner`` is given zeros
  instead, so one bad step cannot poison Adam's moments for ever (they decay
  as on a zero-gradient step), and the step returned is NaN, so that
  :func:`optax.apply_if_finite` or the caller sees the bad step as they would
  with any Optax optimizer.

  Inside :func:`jax.shard_map`, ``axis_name`` names the axes the leaves are
  split over, as for :func:`modulate_by_gradient_norm`; the finiteness check
  then agrees on every device. ``inner`` must be element-wise (Adam is) or
  do its own reductions.

  Args:
    inner: the transformation whose step is modulated (e.g.
      :func:`optax.scale_by_adam`).
    {shared_args}

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` with state
    :class:`ModulateStepState`; the factor is in ``state.modulation.factor``.

  Example:
    >>> import jax.numpy as jnp, optax, cgf_optax
    >>> tx = cgf_optax.modulate_step(optax.scale_by_sign())
    >>> state = tx.init(jnp.zeros(2))
    >>> u, state = tx.update(jnp.array([3.0, -4.0]), state)
    >>> u  # sign(g) * (1 + 5 / 5)
    Array([ 2., -2.], dtype=float32)

  References:
    Quillington et al., *Contextual Gradient Flow Modeling for Large
    Language Model Generalization in Multi-Scale Feature Spaces*,
    Section 3.3, Algorithm 1 line 14.
  """
  inner = optax.with_extra_args_support(v.transformation("inner", inner))
  per_leaf = modulation["scope"] == "leaf"
  modulation = modulate_by_gradient_norm(**modulation)

  def init_fn(params: Any) -> ModulateStepState:
    return ModulateStepState(modulation=modulation.init(params),
                             inner=inner.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    _, mod_state = modulation.update(updates, state.modulation, params)
    flags = jax.tree.leaves(mod_state.finite)
    finite = jnp.all(jnp.stack(flags)) if flags else jnp.array(True)
    # A non-finite gradient (seen through its norm, already computed) must not
    # poison the inner optimizer's state.
    out, inner_state = guarded_update(
        inner, finite, mod_state.factor, updates, state.inner, params,
        per_leaf=per_leaf, **extra_args)
    return out, ModulateStepState(modulation=mod_state, inner=inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
