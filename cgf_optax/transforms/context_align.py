"""CEGM step 2: align the gradient with the model's context (hidden states)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from cgf_optax import _paths
from cgf_optax import _validation as v
from cgf_optax.transforms import _collectives as coll
from cgf_optax.transforms._state import map_per_leaf

__all__ = ["ContextAlignState", "context_align"]


class ContextAlignState(NamedTuple):
  """State of :func:`context_align`.

  Attributes:
    count: number of updates so far (int32).
    context: per leaf of 2+ dimensions whose fan-in ``shape[0]`` is divisible
      by ``num_heads``, the recurrent EMA of the pooled context, float32 of
      shape ``[num_heads, fan_in // num_heads]``; ``None`` for other leaves.
    steps: per such leaf, the number of contexts folded into the EMA (int32),
      used for its bias correction.
  """

  count: jax.Array
  context: Any
  steps: Any


def context_align(
    num_heads: int = 1,
    gamma: float | jax.Array = 1.0,
    rho: float | jax.Array = 0.9,
    eps: float | jax.Array = 1e-12,
    *,
    require_context: bool = True,
    axis_name: coll.AxisName = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Amplifies each kernel's gradient along the directions its context occupies.

  CEGM's Algorithm 1, lines 8–9: aggregate the contextual dynamics,
  :math:`C_t = \sum_i \alpha_i C_i` with :math:`\alpha = \mathrm{softmax}(f(C))`,
  then form the entanglement operator :math:`E_t = G_t C_t^\top`. The paper's
  product is not shape-correct for a kernel; this is the reading that is.

  The context of a kernel :math:`W \in \mathbb{R}^{n_\text{in} \times \cdots}`
  is the activations that multiply it, passed as the extra argument
  ``context={path: C}`` with ``C`` of shape ``[..., n_in]`` (all leading axes
  are tokens); :mod:`cgf_optax.nnx` captures it from a Flax model. The
  features are split into ``num_heads`` heads of size :math:`d = n_\text{in}/H`
  ("multi-head"), and per head :math:`h`:

  1. attention pooling over the tokens, with the running context as the
     query ("recurrent aggregation"):
     :math:`\alpha_i = \mathrm{softmax}_i(\langle C_{i,h}, \hat m_h\rangle /
     \sqrt d)`, :math:`c_h = \sum_i \alpha_i C_{i,h}` (plain mean pooling while
     :math:`\hat m = 0`, i.e. at the first step);
  2. the recurrent EMA :math:`m_h \leftarrow \rho\, m_h + (1-\rho)\, c_h`,
     bias-corrected to :math:`\hat m_h`, kept in the state;
  3. :math:`u_h \in \mathbb{R}^{n_\text{in}}`: :math:`\hat m_h` placed in head
     :math:`h`'s slice of the input axis, zero elsewhere. The :math:`u_h` have
     disjoint supports, so :math:`Q = [u_h / \|u_h\|]_h` is orthonormal by
     construction (no QR), and

  .. math::
    E = G + \gamma\, Q Q^\top G

  on the kernel's input axis (axis 0; other axes are flattened). With
  :math:`\gamma = 0` this is the identity. Leaves without a context pass
  through unchanged (their state too). A non-finite gradient passes through
  to the output; a pooled context that is not finite is not folded into the
  EMA (a finite one is, whatever the gradient).

  Sharding: under :func:`jax.jit` the pooling is over all tokens of the
  (sharded) batch, as a contraction over tokens (a batch-sharded context is
  reduced as ``[H, n_in]`` partial sums, not gathered); the EMA ``[H, d]``
  follows the kernel's fan-in sharding (:mod:`cgf_optax.sharding`), and the
  update :math:`G + \gamma Q Q^\top G` is local to each block of :math:`G`
  but for the ``[H, n_out]`` reduction of :math:`Q^\top G` over the fan-in:
  no whole kernel or context is gathered.
  Inside :func:`jax.shard_map`, where each device holds a slice of the
  batch, ``axis_name`` names the mesh axes it is split over: the softmax
  pooling then runs over the tokens of every device (a ``pmax`` of the
  scores and a ``psum`` of the softmax's numerator and denominator, ``[H, d]``
  and ``[H]`` per kernel), so the pooled context, its EMA and the update are
  those of the whole batch, on every device. The kernels must be whole on
  each device there (data parallel, gradients already averaged): a kernel
  split along its fan-in inside ``shard_map`` is not supported (use
  ``jax.jit`` sharding for FSDP or tensor parallelism).

  Args:
    num_heads: :math:`H`, must divide the fan-in of every kernel given a
      context.
    gamma: :math:`\gamma \ge 0`, the strength of the amplification.
    rho: :math:`\rho \in [0, 1)`, the decay of the recurrent context EMA.
    eps: heads whose pooled context has norm below ``eps`` are left out of
      :math:`Q`.
    require_context: raise if ``update`` is called without ``context=``
      (set ``False`` to let such calls pass everything through).
    axis_name: inside :func:`jax.shard_map`, the mesh axis name(s) over which
      the batch (the context's tokens) is split; ``None``: pool over the
      tokens given.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` taking
    ``context={path: activations}``; paths are ``'a/b/kernel'`` strings.

  Composes with :func:`optax.masked`, :func:`optax.partition` and
  :func:`optax.multi_transform`: pass the context of the whole model; the
  entries of parameters masked out (another transform's, which arrive as
  :class:`optax.MaskedNode`) are ignored.

  Raises (at trace time): ``ValueError`` naming the path when a context's
  feature size does not match the kernel's fan-in, when ``num_heads`` does
  not divide it, or when a context names no parameter of the whole model.

  Example:
    >>> import jax.numpy as jnp, cgf_optax
    >>> tx = cgf_optax.context_align(gamma=1.0)
    >>> params = {"w": jnp.zeros((2, 3))}
    >>> ctx = {"w": jnp.array([[1.0, 0.0], [1.0, 0.0]])}   # 2 tokens
    >>> g = {"w": jnp.ones((2, 3))}
    >>> tx.update(g, tx.init(params), context=ctx)[0]["w"]  # row 0 doubled
    Array([[2., 2., 2.],
           [1., 1., 1.]], dtype=float32)

  References:
    Sisate et al., *Contextually Entangled Gradient Mapping for Optimized
    LLM Comprehension*,
    Section III.B: Algorithm 1 lines 8–9, and the multi-head attention and
    recurrent context aggregation of its implementation.
  """
  num_heads = v.static_int("num_heads", num_heads, minimum=1,
                           static_names=("num_heads",))
  gamma = v.number("gamma", gamma, minimum=0.0)
  rho = v.number("rho", rho, minimum=0.0, maximum=1.0)
  if not v.is_traced(rho) and float(rho) >= 1.0:
    raise ValueError(f"`rho` must be < 1, got {float(rho)}.")
  eps = v.number("eps", eps, minimum=0.0)
  require_context = v.boolean("require_context", require_context)
  batch_axes = coll.axis_names("axis_name", axis_name)

  def heads_of(leaf: Any) -> int | None:
    if leaf.ndim < 2 or leaf.shape[0] % num_heads or leaf.shape[0] == 0:
      return None
    return leaf.shape[0] // num_heads

  def init_fn(params: Any) -> ContextAlignState:
    v.real_float_leaves("context_align", params)

    def ctx(leaf):
      d = heads_of(leaf)
      return None if d is None else jnp.zeros((num_heads, d), jnp.float32)

    def steps(leaf):
      return None if heads_of(leaf) is None else jnp.zeros([], jnp.int32)

    return ContextAlignState(count=jnp.zeros([], jnp.int32),
                             context=map_per_leaf(ctx, params),
                             steps=map_per_leaf(steps, params))

  def update_fn(updates, state, params=None, *, context=None, **extra_args):
    del params, extra_args
    v.real_float_leaves("context_align", updates, "updates")
    context, grads, paths, treedef = _contexts_of(updates, context,
                                                  require_context)
    ctx_states = treedef.flatten_up_to(state.context)
    step_states = treedef.flatten_up_to(state.steps)
    out, new_ctx, new_steps = [], list(ctx_states), list(step_states)
    for i, (path, g) in enumerate(zip(paths, grads, strict=True)):
      c = context.get(path)
      if c is None:
        out.append(g)
        continue
      c = _checked_context(path, g, jnp.asarray(c), ctx_states[i], num_heads)
      e, m, k = _align(g, c, ctx_states[i], step_states[i],
                       num_heads=num_heads, gamma=gamma, rho=rho, eps=eps,
                       batch_axes=batch_axes)
      out.append(e)
      new_ctx[i], new_steps[i] = m, k
    unflat = lambda xs: jax.tree_util.tree_unflatten(treedef, xs)
    return unflat(out), ContextAlignState(
        count=optax.safe_increment(state.count), context=unflat(new_ctx),
        steps=unflat(new_steps))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _contexts_of(updates: Any, context: Any, require_context: bool
                 ) -> tuple[Mapping[str, Any], list[Any], list[str], Any]:
  """The ``context`` checked against the updates' paths; the updates'
  leaves, their paths and tree definition."""
  if context is None:
    if require_context:
      raise ValueError(
          "context_align needs the extra argument `context` (a mapping from "
          "parameter path to the activations that multiply that kernel), "
          "e.g. tx.update(grads, state, params, context=ctx); see "
          "cgf_optax.nnx.capture_context. Build it with "
          "require_context=False to allow steps without context.")
    context = {}
  if not isinstance(context, Mapping):
    raise v.HyperparameterTypeError(
        f"`context` must be a mapping {{path: activations}}, got "
        f"{type(context).__name__}.")
  grads, paths, treedef = _paths.flatten(updates)
  # Inside optax.masked / optax.partition (multi_transform) the parameters
  # of the other transforms are MaskedNodes (each may stand for a whole
  # sub-tree): their contexts belong to the whole model and are ignored.
  masked = _masked_paths(updates)
  unknown = sorted(k for k in set(context) - set(paths)
                   if not any(_under(k, m) for m in masked))
  if unknown:
    raise ValueError(
        f"`context` has entries for {unknown}, which are not parameter paths "
        f"of the updates (known paths include {paths[:8]}"
        + (f"; masked out: {masked[:8]}" if masked else "") + ").")
  return context, grads, paths, treedef


def _checked_context(path: str, g: jax.Array, c: jax.Array, ctx_state: Any,
                     num_heads: int) -> jax.Array:
  """``c``, checked to be a context for the kernel gradient ``g``."""
  if g.ndim < 2:
    raise ValueError(
        f"context_align: got a context for '{path}', of shape {g.shape}; "
        "contexts are for kernels of 2+ dimensions.")
  if c.ndim < 1 or c.shape[-1] != g.shape[0]:
    raise ValueError(
        f"context_align: the context for '{path}' has shape {c.shape}, "
        f"whose last (feature) axis does not match the kernel's fan-in "
        f"(axis 0) of shape {g.shape}.")
  if ctx_state is None:
    raise ValueError(
        f"context_align: num_heads={num_heads} does not divide the fan-in "
        f"{g.shape[0]} of '{path}' (kernel shape {g.shape}).")
  return c


def _masked_paths(tree: Any) -> list[str]:
  """Paths of the :class:`optax.MaskedNode` nodes of ``tree``."""
  is_masked = lambda x: isinstance(x, optax.MaskedNode)
  nodes, paths, _ = _paths.flatten(tree, is_masked)
  return [p for p, x in zip(paths, nodes, strict=True) if is_masked(x)]


def _under(key: Any, prefix: str) -> bool:
  """Whether the path ``key`` is ``prefix`` or inside it."""
  return isinstance(key, str) and (
      not prefix or key == prefix or key.startswith(prefix + _paths.SEPARATOR))


def _align(g: jax.Array, c: jax.Array, m: jax.Array, k: jax.Array, *,
           num_heads: int, gamma: Any, rho: Any, eps: Any,
           batch_axes: tuple[str, ...] = ()
           ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One leaf: pool the context ``c``, update its EMA ``m`` (``k`` contexts
  folded in so far), amplify the gradient ``g`` along it.

  With ``batch_axes`` (inside ``shard_map``) the softmax over tokens spans
  the tokens of every device along them.
  """
  n_in = g.shape[0]
  d = n_in // num_heads
  # Tokens stay [N, n_in] (no per-head reshape of the large context, which
  # costs a transpose on some backends): scores come from one matmul with
  # the block-diagonal query [n_in, H], pooling from one matmul over the
  # tokens, alphaᵀ C [H, n_in], whose block diagonal is kept. A contraction
  # over tokens is what a batch-sharded context needs: XLA reduces [H, n_in]
  # partial sums across devices instead of gathering the context.
  tokens = c.reshape(-1, n_in).astype(jnp.float32)                 # [N, n_in]
  bias = 1 - rho ** k.astype(jnp.float32)
  m_hat = jnp.where(k > 0, m / jnp.where(k > 0, bias, 1.0), 0.0)  # [H, d]
  head_of = jnp.repeat(jnp.eye(num_heads, dtype=jnp.float32), d, axis=0)
  query = m_hat.reshape(n_in, 1) * head_of                         # [n_in, H]
  scores = (tokens @ query) / math.sqrt(d)                         # [N, H]
  if batch_axes:
    # softmax over the tokens of all devices: global max, then psum of the
    # numerator [n_in] and the denominator [H].
    top = jax.lax.pmax(jnp.max(jax.lax.stop_gradient(scores), axis=0),
                       batch_axes)
    w = jnp.exp(scores - top)                                      # [N, H]
    num = jax.lax.psum(jnp.sum((w.T @ tokens) * head_of.T, axis=0),
                       batch_axes)
    den = jax.lax.psum(jnp.sum(w, axis=0), batch_axes)
    pooled = num / jnp.repeat(den, d)
  else:
    alpha = jax.nn.softmax(scores, axis=0)                         # over tokens
    pooled = jnp.sum((alpha.T @ tokens) * head_of.T, axis=0)
  pooled = pooled.reshape(num_heads, d)
  finite = jnp.all(jnp.isfinite(pooled))
  new_m = jnp.where(finite, rho * m + (1 - rho) * pooled, m)
  new_k = k + finite.astype(jnp.int32)
  u = new_m / jnp.where(new_k > 0, 1 - rho ** new_k.astype(jnp.float32), 1.0)
  norm = jnp.linalg.norm(u, axis=-1, keepdims=True)
  u = jnp.where(norm > eps, u / jnp.maximum(norm, eps), 0.0)       # [H, d]
  dt = jnp.promote_types(g.dtype, jnp.float32)
  gh = g.reshape(num_heads, d, -1).astype(dt)                      # [H, d, out]
  coef = jnp.einsum("hd,hdo->ho", u.astype(dt), gh)
  e = gh + gamma * u.astype(dt)[:, :, None] * coef[:, None, :]
  return e.reshape(g.shape).astype(g.dtype), new_m.astype(m.dtype), new_k
