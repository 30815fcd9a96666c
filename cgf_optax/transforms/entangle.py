"""CEGM step 1: entangle the gradient with its history, λ adapted from the loss."""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from cgf_optax import _validation as v
from cgf_optax.transforms import _collectives as coll

__all__ = ["EntangleState", "LossSignal", "entangle"]

_F32_TINY = float(jnp.finfo(jnp.float32).tiny)


LossSignal = Literal["relative", "log_ratio"]
"""The rules :func:`entangle` can adapt λ by (its ``loss_signal``)."""
LOSS_SIGNALS = ("relative", "log_ratio")


def _loss_signal(rule: str, prev: jax.Array, loss: jax.Array) -> jax.Array:
  """g(L), unclipped: ``(prev - loss) / |prev|`` or ``log(prev / loss)``.

  The log ratio needs two positive losses; otherwise it is 0 (λ unchanged).
  Its inputs are made safe first, so no NaN is ever computed from finite
  losses (``jax_debug_nans`` stays usable).
  """
  if rule == "relative":
    return (prev - loss) / jnp.maximum(jnp.abs(prev), 1e-12)
  pos = (prev > 0) & (loss > 0)
  safe = lambda x: jnp.maximum(jnp.where(pos, x, 1.0), _F32_TINY)
  ratio = jnp.log(safe(prev)) - jnp.log(safe(loss))
  return jnp.where(pos, ratio, 0.0)


class EntangleState(NamedTuple):
  """State of :func:`entangle`.

  Attributes:
    count: number of updates so far (int32).
    lam: the current entanglement coefficient λ (float32).
    prev: :math:`G_{t-1}`, the last entangled gradient (params-shaped).
    prev_loss: the last finite loss passed as ``value`` (float32; 0 before
      the first one).
    has_loss: whether ``prev_loss`` holds a loss yet (bool). "No loss yet"
      is this flag, not a NaN, so a fresh state is finite and runs under
      ``jax_debug_nans``.
  """

  count: jax.Array
  lam: jax.Array
  prev: Any
  prev_loss: jax.Array
  has_loss: jax.Array


def entangle(
    lam: float | jax.Array = 0.9,
    adapt_rate: float | jax.Array = 0.0,
    lam_bounds: tuple[float | jax.Array, float | jax.Array] = (0.05, 1.0),
    *,
    state_dtype: Any = None,
    axis_name: coll.AxisName = None,
    loss_signal: LossSignal = "log_ratio",
) -> optax.GradientTransformationExtraArgs:
  r"""Entangles the gradient with its history, :math:`\lambda G + (1-\lambda) G_{t-1}`.

  CEGM's Algorithm 1, line 7, exactly as the paper writes it, with
  :math:`G_0 = 0` (line 2) and :math:`G_{t-1}` kept in the state. Note that the
  paper weights the *current* gradient by λ: λ = 1 is the identity, small λ
  leans on history (an EMA of decay :math:`1-\lambda`, without bias
  correction).

  λ adapts from the loss (line 12), passed the Optax way as the extra
  argument ``value``: after the step,

  .. math::
    \lambda \leftarrow \mathrm{clip}\big(\lambda + \Delta\lambda\, g(L_t),
      \lambda_\text{lo}, \lambda_\text{hi}\big),\qquad
    g(L_t) = \mathrm{clip}\Big(\log\frac{L_{t-1}}{L_t}, -1, 1\Big),

  the log ratio of successive losses (default, ``loss_signal="log_ratio"``;
  0 unless both losses are positive): while the loss falls, λ grows and the
  step follows the fresh gradient; when it rises, λ shrinks and the step
  leans on the smoother history. The first loss only sets :math:`L_{t-1}`.
  The paper's "relative loss change" is also available,
  ``loss_signal="relative"``: :math:`g = \mathrm{clip}((L_{t-1} - L_t) /
  |L_{t-1}|, -1, 1)`. It is asymmetric: a doubling counts −1, a halving only
  +0.5, so a loss that oscillates without trending (Rosenbrock at a large
  step) pushes λ down to :math:`\lambda_\text{lo}`, whereas the log ratio of
  a period sums to 0 and leaves λ where it was. The two are equal to first
  order for small changes; the measurements behind the default are in
  ``docs/cegm.md`` ("The lambda rule"). Without
  ``value`` λ stays fixed; a NaN or infinite loss leaves λ and
  :math:`L_{t-1}` unchanged (λ is never NaN; a finite loss moves it even on a
  step whose gradient is not finite). Entries of a non-finite gradient do not
  enter :math:`G_{t-1}` (they pass through to the output), nor do entries too
  large for ``state_dtype`` (they keep their last value).

  Sharding: the mixing is element-wise, so :math:`G_{t-1}` is sharded like
  the params and nothing is communicated. Under :func:`jax.jit` the loss is
  the global one. Inside :func:`jax.shard_map`, where each device computes
  the loss of its own slice of the batch, ``axis_name`` names the mesh axes
  the batch is split over: the loss is averaged over them (``pmean``), so λ
  adapts to the loss of the whole batch, identically on every device (exact
  for equal slices; a loss already averaged is unchanged).

  Args:
    lam: initial λ, within ``lam_bounds``.
    adapt_rate: :math:`\Delta\lambda` (0 disables adaptation).
    lam_bounds: ``(lo, hi)`` with ``0 <= lo <= hi <= 1``.
    state_dtype: dtype of :math:`G_{t-1}` (default: the gradient's; bfloat16
      halves the state's memory traffic).
    axis_name: inside :func:`jax.shard_map`, the mesh axis name(s) over which
      the batch is split; the loss ``value`` is averaged over them.
    loss_signal: :math:`g`, ``"relative"`` (the relative loss decrease) or
      ``"log_ratio"`` (:math:`\log(L_{t-1}/L_t)`, symmetric), both clipped
      to :math:`[-1, 1]`.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` taking ``value=loss``.

  Example:
    >>> import jax.numpy as jnp, cgf_optax
    >>> tx = cgf_optax.entangle(lam=0.5)
    >>> state = tx.init(jnp.zeros(2))
    >>> g1, state = tx.update(jnp.array([2.0, 4.0]), state)    # 0.5 g + 0.5 * 0
    >>> g2, state = tx.update(jnp.array([0.0, 0.0]), state)    # 0.5 * 0 + 0.5 g1
    >>> g1, g2
    (Array([1., 2.], dtype=float32), Array([0.5, 1. ], dtype=float32))

  References:
    Sisate et al., *Contextually Entangled Gradient Mapping for Optimized
    LLM Comprehension*,
    Section III.B, Algorithm 1 lines 2, 7 and 12.
  """
  lam, lo, hi = _check_lam(lam, lam_bounds)
  adapt_rate = v.number("adapt_rate", adapt_rate, minimum=0.0)
  state_dtype = (None if state_dtype is None
                 else v.float_dtype("state_dtype", state_dtype))
  batch_axes = coll.axis_names("axis_name", axis_name)
  loss_signal = v.choice("loss_signal", loss_signal, LOSS_SIGNALS)

  def init_fn(params: Any) -> EntangleState:
    v.real_float_leaves("entangle", params)
    return EntangleState(
        count=jnp.zeros([], jnp.int32),
        lam=jnp.asarray(lam, jnp.float32),
        prev=optax.tree.zeros_like(params, dtype=state_dtype),
        prev_loss=jnp.zeros([], jnp.float32),
        has_loss=jnp.zeros([], jnp.bool_))

  def update_fn(updates, state, params=None, *, value=None, **extra_args):
    del params, extra_args
    v.real_float_leaves("entangle", updates, "updates")
    lam_t = state.lam

    def mix(g, prev):
      dt = jnp.promote_types(g.dtype, jnp.float32)
      lam_c = lam_t.astype(dt)
      return (lam_c * g.astype(dt) + (1 - lam_c) * prev.astype(dt)).astype(g.dtype)

    out = jax.tree.map(mix, updates, state.prev)

    def keep(g, p, o):
      o = o.astype(p.dtype)
      # isfinite(o) too: a finite entry may overflow a narrower state_dtype.
      return jnp.where(jnp.isfinite(g) & jnp.isfinite(o), o, p)

    prev = jax.tree.map(keep, updates, state.prev, out)

    new_lam, new_prev_loss, new_has_loss = lam_t, state.prev_loss, state.has_loss
    if value is not None:
      loss = _scalar_loss(value, batch_axes)
      ok = jnp.isfinite(loss)
      have_prev = state.has_loss
      rel = _loss_signal(loss_signal, state.prev_loss, loss)
      rel = jnp.where(ok & have_prev & jnp.isfinite(rel), rel, 0.0)
      rel = jnp.clip(rel, -1.0, 1.0)
      new_lam = jnp.clip(lam_t + adapt_rate * rel, lo, hi).astype(jnp.float32)
      # λ is never NaN, even with injected (traced, unchecked) hyper-params.
      new_lam = jnp.where(jnp.isfinite(new_lam), new_lam, lam_t)
      new_prev_loss = jnp.where(ok, loss, state.prev_loss)
      new_has_loss = state.has_loss | ok
    return out, EntangleState(
        count=optax.safe_increment(state.count), lam=new_lam, prev=prev,
        prev_loss=new_prev_loss, has_loss=new_has_loss)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_lam(lam: Any, lam_bounds: Any) -> tuple[Any, Any, Any]:
  """Checks λ and its bounds; returns ``(lam, lo, hi)``."""
  if not isinstance(lam_bounds, (tuple, list)) or len(lam_bounds) != 2:
    raise v.HyperparameterTypeError(
        f"`lam_bounds` must be a pair (lo, hi), got {lam_bounds!r}.")
  lo = v.number("lam_bounds[0]", lam_bounds[0], minimum=0.0, maximum=1.0)
  hi = v.number("lam_bounds[1]", lam_bounds[1], minimum=0.0, maximum=1.0)
  if not v.is_traced(lo) and not v.is_traced(hi) and float(lo) > float(hi):
    raise ValueError(f"`lam_bounds` must have lo <= hi, got {lam_bounds!r}.")
  lam = v.number("lam", lam, minimum=0.0, maximum=1.0)
  # λ is float32, and XLA flushes float32 subnormals to zero: a bound (or λ)
  # in (0, 1.2e-38) would silently act as 0.
  for name, x in (("lam_bounds[0]", lo), ("lam_bounds[1]", hi), ("lam", lam)):
    if not v.is_traced(x) and 0.0 < float(x) < _F32_TINY:
      raise ValueError(
          f"`{name}`={float(x)!r} is below float32's smallest normal number "
          f"({_F32_TINY:.3g}); λ is computed in float32, where it would flush "
          "to 0: use 0.0 or a normal value.")
  if not any(map(v.is_traced, (lam, lo, hi))) and not (
      float(lo) <= float(lam) <= float(hi)):
    raise ValueError(f"`lam`={float(lam)} must lie within `lam_bounds`="
                     f"{tuple(lam_bounds)}.")
  return lam, lo, hi


def _scalar_loss(value: Any, batch_axes: tuple[str, ...]) -> jax.Array:
  """The loss passed as ``value``, float32, averaged over ``batch_axes``."""
  try:
    loss = jnp.asarray(value, jnp.float32)
  except (TypeError, ValueError) as e:
    raise ValueError(
        f"entangle: `value` must be the scalar loss, got {value!r} ({e})."
    ) from None
  if loss.shape != ():
    raise ValueError(
        f"entangle: `value` must be the scalar loss, got shape {loss.shape}.")
  if batch_axes:
    loss = jax.lax.pmean(loss, batch_axes)
  return loss
