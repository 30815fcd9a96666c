r"""Activation-level gradient flow: CGFM's decomposition of hidden states.

CGFM's Algorithm 1 computes hidden states :math:`\mathbf h = f_\theta(B)`,
splits them into local and global parts (lines 7-8) and reweights the
gradients of the two (lines 10-12). Read literally, this is a model-side
operation: an identity layer whose backward pass splits the cotangent
:math:`g = \partial L/\partial\mathbf h` of the hidden states
``[batch, seq, features]`` along the sequence axis,

.. math::
  g = \underbrace{(g - Pg)}_{\text{local}} + \underbrace{Pg}_{\text{global}},
  \qquad
  \tilde g = \lambda_\text{local}\,(g - Pg) + \lambda_\text{global}\,Pg,

with :math:`P` a low-pass over positions (``mode``), and passes
:math:`\tilde g` on to the layers below. The forward value is untouched.

* :func:`gradient_flow` is the layer (a :func:`jax.custom_vjp`);
* :func:`split_cotangent` is the split itself, for analysis and tests;
* :func:`depth_schedule` gives per-layer :math:`(\lambda_\text{local},
  \lambda_\text{global})` (the paper's "hierarchical, per-depth adjustment");
* :func:`init_probes` and :func:`read_probes` read the norms of the two parts
  in the same backward pass (no second one).

This module knows only jax; it does not depend on Flax, and nothing in the
optimizer transforms depends on it.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from cgf_optax import flow
  >>> h = jnp.arange(6.0).reshape(1, 3, 2)          # [batch, seq, features]
  >>> loss = lambda h: jnp.sum(flow.gradient_flow(h, 1.0, 0.0, mode="mean") ** 2) / 2
  >>> jax.grad(loss)(h)[0]      # dL/dh = h, its sequence mean removed
  Array([[-2., -2.],
         [ 0.,  0.],
         [ 2.,  2.]], dtype=float32)
"""

from __future__ import annotations

import functools
import numbers
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cgf_optax import _validation as v

__all__ = [
    "MODES",
    "PROBE_SIZE",
    "DepthSchedule",
    "FlowMode",
    "FlowSplit",
    "FlowTelemetry",
    "depth_schedule",
    "gradient_flow",
    "init_probes",
    "read_probes",
    "split_cotangent",
]

FlowMode = Literal["mean", "causal", "window"]
"""The low-pass :math:`P` of :func:`gradient_flow` and :func:`split_cotangent`."""

MODES = ("mean", "causal", "window")
"""The values of ``mode``: the low-pass :math:`P` that defines the global part."""

PROBE_SIZE = 3
"""Length of a telemetry probe: ``[‖local‖², ‖global‖², ⟨local, global⟩]``."""

_SCHEDULE_KINDS = ("constant", "linear", "cosine")


class FlowSplit(NamedTuple):
  r"""The two parts of a cotangent, from :func:`split_cotangent`.

  Attributes:
    local: :math:`g - Pg`, the per-position deviation.
    global_: :math:`Pg`, the low-passed part.
  """

  local: jax.Array
  global_: jax.Array


class DepthSchedule(NamedTuple):
  r"""Per-layer weights, from :func:`depth_schedule`.

  Unpacks as ``lambda_local, lambda_global = schedule``.

  Attributes:
    local: :math:`\lambda_\text{local}` of each layer, shape ``[num_layers]``.
    global_: :math:`\lambda_\text{global}` of each layer, shape
      ``[num_layers]``.
  """

  local: jax.Array
  global_: jax.Array


class FlowTelemetry(NamedTuple):
  r"""Norms of the cotangent's parts, from :func:`read_probes`.

  Each field has the probes' leading shape (``[num_layers]`` for the probes of
  ``init_probes(num_layers)``). The norms are of the cotangent *arriving* at
  the layer, before the weights :math:`\lambda` are applied.

  Attributes:
    local_norm: :math:`\|g - Pg\|`.
    global_norm: :math:`\|Pg\|`.
    total_norm: :math:`\|g\|`, recovered as
      :math:`\sqrt{\|g-Pg\|^2 + \|Pg\|^2 + 2\langle g-Pg, Pg\rangle}`.
  """

  local_norm: jax.Array
  global_norm: jax.Array
  total_norm: jax.Array


class _Config(NamedTuple):
  """The static part of one :func:`gradient_flow` call (hashable)."""

  mode: str
  window: int | None
  axis: int
  identity: bool
  probe_dtype: Any


# ---------------------------------------------------------------------------
# Argument checks.


def _check_array(h: Any) -> jax.Array:
  if not hasattr(h, "shape") or not hasattr(h, "dtype"):
    h = jnp.asarray(h)
  if h.ndim < 2:
    raise ValueError(
        "`h` must have rank >= 2 ([..., seq, features], e.g. "
        f"[batch, seq, features]); got shape {tuple(h.shape)}.")
  if not jnp.issubdtype(h.dtype, jnp.floating):
    raise ValueError(
        f"`h` must have a floating dtype to carry gradients; got {h.dtype}.")
  return h


def _check_axis(seq_axis: Any, ndim: int) -> int:
  axis = v.static_int("seq_axis", seq_axis)
  if not -ndim <= axis < ndim:
    raise ValueError(
        f"`seq_axis` must index an axis of `h` (rank {ndim}), i.e. lie in "
        f"[{-ndim}, {ndim}); got {axis}.")
  return axis % ndim


def _check_mode(mode: Any, window: Any) -> tuple[str, int | None]:
  mode = v.choice("mode", mode, MODES)
  if window is None:
    if mode == "window":
      raise ValueError(
          '`window` is required with mode="window" (an int >= 1).')
    return mode, None
  if mode == "mean":
    raise ValueError(
        '`window` must be None with mode="mean" (the mean is over the whole '
        'sequence); use mode="window" or mode="causal" for a finite window. '
        f"Got window={window!r}.")
  return mode, v.static_int("window", window, minimum=1)


def _check_lambda(name: str, value: Any, shape: tuple[int, ...]) -> Any:
  """A real number or a real array broadcastable to ``shape``."""
  if isinstance(value, bool) or value is None:
    raise v.HyperparameterTypeError(
        f"`{name}` must be a real number or array, got "
        f"{type(value).__name__} {value!r}.")
  if isinstance(value, numbers.Real):
    if not np.isfinite(float(value)):
      raise ValueError(f"`{name}` must be finite, got {value}.")
    return float(value)
  if not isinstance(value, (np.ndarray, np.generic, jax.Array)):
    raise v.HyperparameterTypeError(
        f"`{name}` must be a real number or array, got "
        f"{type(value).__name__} {value!r}.")
  dtype = np.dtype(value.dtype)
  if not (jnp.issubdtype(dtype, jnp.floating)
          or jnp.issubdtype(dtype, jnp.integer)):
    raise v.HyperparameterTypeError(
        f"`{name}` must have a real dtype, got {dtype}.")
  try:
    out_shape = np.broadcast_shapes(np.shape(value), shape)
  except ValueError:
    out_shape = None
  if out_shape != tuple(shape):
    raise ValueError(
        f"`{name}` of shape {np.shape(value)} does not broadcast to the shape "
        f"of `h`, {tuple(shape)}.")
  if isinstance(value, (np.ndarray, np.generic)):
    if not np.all(np.isfinite(value)):
      raise ValueError(f"`{name}` must be finite, got {value}.")
  return value


def _is_one(value: Any) -> bool:
  """True for a concrete (Python or NumPy) weight that is 1 everywhere."""
  if isinstance(value, float):
    return value == 1.0
  if isinstance(value, (np.ndarray, np.generic)):
    return bool(np.all(value == 1))
  return False  # a jax.Array, concrete or traced: decided at run time


def _as_weight(value: Any) -> jax.Array:
  w = jnp.asarray(value)
  if not jnp.issubdtype(w.dtype, jnp.floating):
    w = w.astype(jnp.float32)
  return w


def _check_probe(probe: Any) -> Any:
  if probe is None:
    return None
  if not hasattr(probe, "shape") or not hasattr(probe, "dtype"):
    probe = jnp.asarray(probe)
  if tuple(probe.shape) != (PROBE_SIZE,):
    raise ValueError(
        f"`probe` must have shape ({PROBE_SIZE},) (see init_probes); got "
        f"{tuple(probe.shape)}.")
  if not jnp.issubdtype(probe.dtype, jnp.floating):
    raise ValueError(f"`probe` must have a floating dtype, got {probe.dtype}.")
  return probe


# ---------------------------------------------------------------------------
# The split.


def _bounds(mode: str, window: int | None, length: int) -> tuple[int, int]:
  """Position t's global part averages positions [t - lo, t + hi] (clipped)."""
  last = max(length - 1, 0)
  if mode == "mean":
    return last, last
  if mode == "causal":
    return 0, last if window is None else min(window - 1, last)
  assert window is not None
  return min((window - 1) // 2, last), min(window // 2, last)


def _global_part(x: jax.Array, mode: str, window: int | None,
                 axis: int) -> jax.Array:
  """:math:`Px`, in ``x``'s dtype (call it with an accumulation dtype)."""
  length = x.shape[axis]
  lo, hi = _bounds(mode, window, length)
  last = max(length - 1, 0)
  if lo == last and hi == last:  # the whole sequence at every position
    return jnp.broadcast_to(jnp.mean(x, axis=axis, keepdims=True), x.shape)
  t = np.arange(length)
  counts = np.minimum(t + hi + 1, length) - np.maximum(t - lo, 0)
  counts = jnp.asarray(counts.reshape((length,) + (1,) * (x.ndim - axis - 1)),
                       x.dtype)
  if lo == 0 and hi == last:  # a running mean to the end: one reverse cumsum
    return jax.lax.cumsum(x, axis=axis, reverse=True) / counts
  # Window sums as differences of suffix sums S_t = sum_{s >= t} x_s, taken
  # of x minus its mean: the differences then cancel less when x has a large
  # common part.
  mean = jnp.mean(x, axis=axis, keepdims=True)
  suffix = jax.lax.cumsum(x - mean, axis=axis, reverse=True)
  # ext[k] = S[clip(k - lo, 0, T)], with S_T = 0: lo copies of S_0 in front,
  # hi + 1 zeros behind (built along the sequence axis only, so that a
  # sharded batch or feature axis is never sliced).
  parts = [suffix]
  if lo:
    first = jax.lax.slice_in_dim(suffix, 0, 1, axis=axis)
    shape = list(x.shape)
    shape[axis] = lo
    parts.insert(0, jnp.broadcast_to(first, shape))
  ext = jnp.concatenate(parts, axis=axis) if lo else suffix
  config = [(0, 0, 0)] * x.ndim
  config[axis] = (0, hi + 1, 0)
  ext = jax.lax.pad(ext, jnp.zeros((), ext.dtype), config)
  start = jax.lax.slice_in_dim(ext, 0, length, axis=axis)
  stop = jax.lax.slice_in_dim(ext, lo + hi + 1, lo + hi + 1 + length,
                              axis=axis)
  return (start - stop) / counts + mean


def _acc_dtype(dtype: Any) -> Any:
  return jnp.promote_types(dtype, jnp.float32)


def split_cotangent(
    cotangent: jax.Array,
    *,
    mode: FlowMode = "causal",
    window: int | None = None,
    seq_axis: int = -2,
) -> FlowSplit:
  r"""Splits ``cotangent`` into its local and global parts along the sequence.

  The split that :func:`gradient_flow` applies in its backward pass, as a
  plain function: ``global_`` :math:`= Pg` with :math:`P` the low-pass of
  ``mode``, and ``local`` :math:`= g - Pg`. With :math:`T` positions and
  :math:`t` the position:

  * ``"mean"``: :math:`(Pg)_t = \frac1T\sum_{s} g_s`, the sequence mean
    (an orthogonal projection: the parts are orthogonal).
  * ``"causal"``: :math:`(Pg)_t = \frac1{|W_t|}\sum_{s\in W_t} g_s` with
    :math:`W_t = [t, \min(t + w, T))`: the mean of the cotangents of
    position :math:`t` and the positions *after* it (all of them when
    ``window`` is None, else ``window`` positions). See
    :func:`gradient_flow` for why this direction.
  * ``"window"``: the same with a centred window
    :math:`W_t = [t - \lfloor (w-1)/2\rfloor,\ t + \lfloor w/2\rfloor]`
    clipped to the sequence: a moving average of width ``window`` (which
    then must be given).

  Every :math:`P` has unit gain on constants (a cotangent equal at every
  position is all global). Costs are :math:`O(T)` per feature: a mean, or
  a reverse cumulative sum (windows: differences of suffix sums, taken after
  subtracting the sequence mean). The parts are computed in at least
  float32 and returned in ``cotangent``'s dtype; ``local + global_`` equals
  ``cotangent`` up to rounding.

  Args:
    cotangent: an array of rank >= 2, e.g. ``[batch, seq, features]``.
    mode: ``"mean"``, ``"causal"`` or ``"window"``.
    window: width of the window (``int >= 1``): optional with ``"causal"``,
      required with ``"window"``, not allowed with ``"mean"``.
    seq_axis: the sequence axis of ``cotangent``.

  Returns:
    A :class:`FlowSplit` ``(local, global_)``.

  Example:
    >>> import jax.numpy as jnp
    >>> from cgf_optax import flow
    >>> g = jnp.array([[1.0], [2.0], [6.0]])          # [seq, features]
    >>> flow.split_cotangent(g, mode="causal").global_[:, 0]   # suffix means
    Array([3., 4., 6.], dtype=float32)
    >>> flow.split_cotangent(g, mode="mean").local[:, 0]
    Array([-2., -1.,  3.], dtype=float32)
  """
  cotangent = _check_array(cotangent)
  axis = _check_axis(seq_axis, cotangent.ndim)
  mode, window = _check_mode(mode, window)
  x = cotangent.astype(_acc_dtype(cotangent.dtype))
  glob = _global_part(x, mode, window, axis)
  return FlowSplit(local=(x - glob).astype(cotangent.dtype),
                   global_=glob.astype(cotangent.dtype))


# ---------------------------------------------------------------------------
# The layer.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flow(cfg: _Config, h: jax.Array, lambda_local: jax.Array,
          lambda_global: jax.Array, probe: jax.Array | None) -> jax.Array:
  del cfg, lambda_local, lambda_global, probe
  return h


def _flow_fwd(cfg: _Config, h: jax.Array, lambda_local: jax.Array,
              lambda_global: jax.Array, probe: jax.Array | None):
  del cfg, probe
  return h, (lambda_local, lambda_global)


def _flow_bwd(cfg: _Config, res: tuple[jax.Array, jax.Array], g: jax.Array):
  # jnp.asarray: under jax.checkpoint, constant residuals may come back as
  # typed Python scalars.
  lambda_local, lambda_global = map(jnp.asarray, res)
  acc = _acc_dtype(g.dtype)
  need_split = not cfg.identity or cfg.probe_dtype is not None
  if need_split:
    x = g.astype(acc)
    glob = _global_part(x, cfg.mode, cfg.window, cfg.axis)
  if cfg.identity:
    dh = g
  else:
    w_local = lambda_local.astype(acc)
    w_global = lambda_global.astype(acc)
    mixed = w_local * x + (w_global - w_local) * glob
    # Exact identity at run time when both weights are 1 (traced weights).
    dh = jnp.where((w_local == 1) & (w_global == 1), x, mixed).astype(g.dtype)
  dprobe = None
  if cfg.probe_dtype is not None:
    local = x - glob
    dprobe = jnp.stack([jnp.sum(local * local), jnp.sum(glob * glob),
                        jnp.sum(local * glob)]).astype(cfg.probe_dtype)
  return (dh, jnp.zeros_like(lambda_local), jnp.zeros_like(lambda_global),
          dprobe)


_flow.defvjp(_flow_fwd, _flow_bwd)


def gradient_flow(
    h: jax.Array,
    lambda_local: float | jax.Array = 1.0,
    lambda_global: float | jax.Array = 1.0,
    *,
    mode: FlowMode = "causal",
    window: int | None = None,
    seq_axis: int = -2,
    probe: jax.Array | None = None,
) -> jax.Array:
  r"""Identity on ``h``; reweights the local and global parts of its gradient.

  The forward pass returns ``h`` unchanged. The backward pass receives the
  cotangent :math:`g = \partial L/\partial h` and passes on

  .. math::
    \tilde g = \lambda_\text{local}\,(g - Pg) + \lambda_\text{global}\,Pg
      = \lambda_\text{local}\,g
        + (\lambda_\text{global} - \lambda_\text{local})\,Pg,

  computed as the right-hand side, in at least float32, and cast to ``h``'s
  dtype. :math:`P` is the low-pass of ``mode`` over the sequence axis (see
  :func:`split_cotangent`): ``"mean"`` (the sequence mean, the paper's
  literal global part), ``"causal"`` (the default: the mean over this
  position and the later ones, optionally within ``window`` positions), or
  ``"window"`` (a centred moving average of width ``window``). Placed
  between the blocks of a model, it is CGFM's Algorithm 1, lines 7-12,
  applied to the hidden states :math:`\mathbf h = f_\theta(B)`.

  **Why "causal" averages the later positions.** In a causal decoder,
  :math:`h_t` influences only the losses at positions :math:`\ge t`. The
  cotangent :math:`g_s` of a position :math:`s \ge t` holds gradients of
  losses at positions :math:`\ge s \ge t`, all of which :math:`h_t` can
  change; :math:`g_s` for :math:`s < t` holds gradients of earlier losses,
  which :math:`h_t` cannot change. So the global part of position :math:`t`
  averages :math:`g_t, g_{t+1}, \dots` (a reverse cumulative sum, the same
  operation as the VJP of a forward causal running sum). Equivalently,
  :math:`P^\top` is lower-triangular: :math:`\tilde g` is the gradient one
  would get by inserting the *causal* linear mixing
  :math:`h \mapsto \lambda_\text{local} h + (\lambda_\text{global} -
  \lambda_\text{local})P^\top h` into the backward pass only. Consequences:
  at the first position the global part is the sequence mean; at the last
  it is the whole cotangent (its local part is 0). ``"mean"`` and
  ``"window"`` are not causal (suited to encoders, or as the paper's
  literal reading).

  **Exactness.** With :math:`\lambda_\text{local} = \lambda_\text{global} =
  1` the gradients are bit-identical to those of the model without this
  layer:

  * when both are Python numbers or NumPy arrays equal to 1 (and no
    ``probe``), the call returns ``h`` itself, with no custom VJP at all;
  * otherwise (JAX arrays, possibly traced, e.g. a schedule inside
    :func:`jax.jit`; or a ``probe``), the backward pass selects the incoming
    cotangent unchanged wherever both weights are 1 (a ``jnp.where`` on the
    weights), so the claim holds at run time too. The split is still
    computed then (it is cheap and fused); pass Python ``1.0`` to skip it.

  With equal weights :math:`\lambda` (not 1), :math:`\tilde g = \lambda g`
  up to the sign of zeros. ``local + global`` is the cotangent up to one
  rounding (floating point), which is why the identity case is special-cased
  rather than recomputed.

  **Weights.** Python numbers or real arrays (possibly traced) that
  broadcast to ``h``'s shape: a scalar per layer (:func:`depth_schedule`),
  or e.g. ``[features]``. The forward pass does not depend on them, so their
  gradient is zero. Negative weights are allowed (they reverse a part).

  **Telemetry** (``probe``): pass a zero array of shape
  ``[PROBE_SIZE] = [3]`` (:func:`init_probes`) and differentiate with
  respect to it too. The forward pass ignores the probe, so its true
  gradient is zero; the custom VJP sets it instead to
  :math:`[\|g - Pg\|^2, \|Pg\|^2, \langle g - Pg, Pg\rangle]` of the
  incoming cotangent (before the weights). So one ``jax.grad`` with
  ``argnums=(params, probes)`` returns the gradients and the per-layer norms
  of the two parts, without a second backward pass; :func:`read_probes`
  turns them into norms. Squared norms and inner products are sums, so a
  probe used several times (a layer applied twice, micro-batches summed
  inside one ``jax.grad``, ``jax.vmap`` over examples) accumulates them
  correctly. Pass the probe straight to this function; other uses would add
  their own gradients to it. Gradients with respect to ``h`` and the
  parameters are the same with or without a probe.

  **Transformations.** Works under :func:`jax.jit`, :func:`jax.vmap`,
  :func:`jax.lax.scan`, :func:`jax.checkpoint`, sharded inputs (the split
  runs along the sequence axis: a batch or feature sharding needs no
  communication, except the probe's three sums), and higher-order reverse
  mode and forward-over-reverse (:func:`jax.hessian`): the backward pass is
  linear in :math:`g` and differentiable. As for every
  :func:`jax.custom_vjp`, forward mode *through* the layer
  (``jax.jvp``/``jax.jacfwd`` of a function of ``h``) is not supported.

  Args:
    h: hidden states, rank >= 2, floating dtype, e.g. ``[batch, seq,
      features]``.
    lambda_local: :math:`\lambda_\text{local}`, weight of the local part.
    lambda_global: :math:`\lambda_\text{global}`, weight of the global part.
    mode: ``"causal"`` (default), ``"mean"`` or ``"window"``; see
      :func:`split_cotangent`.
    window: window width (``int >= 1``): optional with ``"causal"``
      (default: to the end of the sequence), required with ``"window"``,
      not allowed with ``"mean"``.
    seq_axis: the sequence axis of ``h`` (default ``-2``, for ``[batch, seq,
      features]``).
    probe: optional telemetry probe of shape ``[3]`` (see above).

  Returns:
    ``h``, unchanged (a new array when the custom VJP is used).

  Raises:
    ValueError: naming the argument, for ``h`` of rank < 2 or not floating,
      a ``seq_axis`` outside ``h``'s axes, an unknown ``mode``, a ``window``
      < 1 or missing/extra for the mode, weights that are not finite (Python
      numbers and NumPy arrays are checked; JAX arrays are not, to avoid a
      device sync) or do not broadcast to ``h``, a ``probe`` of the wrong
      shape. Wrong types raise
      :class:`cgf_optax.HyperparameterTypeError` (a ``ValueError``).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from cgf_optax import flow
    >>> h = jnp.array([[[1.0], [2.0], [6.0]]])        # [batch, seq, features]
    >>> def loss(h, probe=None):
    ...   h = flow.gradient_flow(h, 0.5, 2.0, mode="mean", probe=probe)
    ...   return jnp.sum(h ** 2) / 2                   # dL/dh = h
    >>> jax.grad(loss)(h)[..., 0]   # 0.5 * (h - 3) + 2 * 3
    Array([[5. , 5.5, 7.5]], dtype=float32)
    >>> _, probe_grad = jax.grad(loss, argnums=(0, 1))(h, flow.init_probes())
    >>> round(float(flow.read_probes(probe_grad).local_norm) ** 2, 4)  # 4+1+9
    14.0
  """
  h = _check_array(h)
  axis = _check_axis(seq_axis, h.ndim)
  mode, window = _check_mode(mode, window)
  lambda_local = _check_lambda("lambda_local", lambda_local, h.shape)
  lambda_global = _check_lambda("lambda_global", lambda_global, h.shape)
  probe = _check_probe(probe)
  identity = _is_one(lambda_local) and _is_one(lambda_global)
  if identity and probe is None:
    return h
  cfg = _Config(mode=mode, window=window, axis=axis, identity=identity,
                probe_dtype=None if probe is None else np.dtype(probe.dtype))
  return _flow(cfg, h, _as_weight(lambda_local), _as_weight(lambda_global),
               probe)


# ---------------------------------------------------------------------------
# Helpers: per-layer weights and telemetry probes.


def _check_pair(name: str, value: Any) -> tuple[float, float]:
  if (not isinstance(value, (tuple, list)) or len(value) != 2
      or not all(v.is_number(x) for x in value)):
    raise ValueError(
        f"`{name}` must be a pair of numbers (lambda_local, lambda_global); "
        f"got {value!r}.")
  return tuple(float(v.number(name, x)) for x in value)


def depth_schedule(
    num_layers: int,
    start: tuple[float, float] = (1.0, 1.0),
    end: tuple[float, float] | None = None,
    *,
    kind: Literal["constant", "linear", "cosine"] = "linear",
) -> DepthSchedule:
  r"""Per-layer :math:`(\lambda_\text{local}, \lambda_\text{global})`.

  CGFM's "hierarchical, per-depth adjustment". Layer :math:`i` (0 nearest
  the input) of :math:`L` gets, with :math:`u_i = i/(L-1)` (0 when
  :math:`L = 1`),

  .. math::
    \lambda_i = \text{start} + (\text{end} - \text{start})\,s(u_i),\qquad
    s(u) = \begin{cases} 0 & \text{constant}\\ u & \text{linear}\\
      \tfrac12(1 - \cos\pi u) & \text{cosine,}\end{cases}

  for each of the two weights, so the first layer gets ``start`` and the last
  gets ``end``.

  Args:
    num_layers: number of layers :math:`L \ge 1`.
    start: ``(lambda_local, lambda_global)`` of the first layer.
    end: ``(lambda_local, lambda_global)`` of the last layer; default
      ``start``. With ``kind="constant"`` it must be None or equal to
      ``start``.
    kind: ``"linear"`` (default), ``"cosine"`` or ``"constant"``.

  Returns:
    A :class:`DepthSchedule` ``(local, global_)`` of float32 arrays of shape
    ``[num_layers]``; index it per layer (``schedule.global_[i]``) or pass it
    as ``xs`` of a :func:`jax.lax.scan` over layers.

  Example:
    >>> from cgf_optax import flow
    >>> lam_local, lam_global = flow.depth_schedule(3, (1.0, 1.0), (1.0, 0.5))
    >>> lam_local, lam_global
    (Array([1., 1., 1.], dtype=float32), Array([1.  , 0.75, 0.5 ], dtype=float32))
  """
  num_layers = v.static_int("num_layers", num_layers, minimum=1)
  kind = v.choice("kind", kind, _SCHEDULE_KINDS)
  start = _check_pair("start", start)
  end = start if end is None else _check_pair("end", end)
  if kind == "constant" and end != start:
    raise ValueError(
        f'`end` must be None or equal to `start` with kind="constant"; got '
        f"start={start}, end={end}.")
  u = np.arange(num_layers) / max(num_layers - 1, 1)
  s = {"constant": np.zeros_like(u), "linear": u,
       "cosine": 0.5 * (1.0 - np.cos(np.pi * u))}[kind]
  lam = [a + (b - a) * s for a, b in zip(start, end, strict=True)]
  return DepthSchedule(local=jnp.asarray(lam[0], jnp.float32),
                       global_=jnp.asarray(lam[1], jnp.float32))


def init_probes(num_layers: int | None = None,
                dtype: Any = jnp.float32) -> jax.Array:
  """Zero telemetry probes for :func:`gradient_flow`.

  Differentiate the loss with respect to them (``jax.grad(loss, argnums=...)``)
  and give their gradient to :func:`read_probes`. Their value is never read;
  they are not parameters (do not give them to the optimizer).

  Args:
    num_layers: None for one probe of shape ``[3]``; else ``[num_layers, 3]``,
      one row per layer (pass ``probes[i]`` to layer ``i``, or the array as
      ``xs`` of a :func:`jax.lax.scan`).
    dtype: a floating dtype (default float32).

  Returns:
    An array of zeros.

  Example:
    >>> from cgf_optax import flow
    >>> flow.init_probes(2).shape
    (2, 3)
  """
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"`dtype` must be a floating dtype, got {dtype}.")
  if num_layers is None:
    return jnp.zeros((PROBE_SIZE,), dtype)
  num_layers = v.static_int("num_layers", num_layers, minimum=1)
  return jnp.zeros((num_layers, PROBE_SIZE), dtype)


def read_probes(probe_grads: jax.Array) -> FlowTelemetry:
  r"""Norms of the local and global cotangent parts, from the probes' gradient.

  Args:
    probe_grads: the gradient of the loss with respect to probes of
      :func:`init_probes`, shape ``[..., 3]``: rows
      :math:`[\|g - Pg\|^2, \|Pg\|^2, \langle g - Pg, Pg\rangle]`.

  Returns:
    A :class:`FlowTelemetry` of arrays of shape ``[...]`` (float32 or wider).

  Example:
    >>> import jax.numpy as jnp
    >>> from cgf_optax import flow
    >>> t = flow.read_probes(jnp.array([9.0, 16.0, 0.0]))
    >>> t.local_norm, t.global_norm, t.total_norm
    (Array(3., dtype=float32), Array(4., dtype=float32), Array(5., dtype=float32))
  """
  if not hasattr(probe_grads, "shape"):
    probe_grads = jnp.asarray(probe_grads)
  if probe_grads.ndim < 1 or probe_grads.shape[-1] != PROBE_SIZE:
    raise ValueError(
        f"`probe_grads` must have shape [..., {PROBE_SIZE}] (the gradient "
        f"of init_probes' probes); got {tuple(probe_grads.shape)}.")
  x = jnp.asarray(probe_grads)
  x = x.astype(_acc_dtype(x.dtype))
  local_sq, global_sq, inner = x[..., 0], x[..., 1], x[..., 2]
  total_sq = local_sq + global_sq + 2.0 * inner
  root = lambda s: jnp.sqrt(jnp.maximum(s, 0.0))
  return FlowTelemetry(local_norm=root(local_sq), global_norm=root(global_sq),
                       total_norm=root(total_sq))
