"""The papers' Algorithm 1 chains, ready to use."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from cgf_optax import _validation as v
from cgf_optax.transforms import _collectives as coll
from cgf_optax.transforms.context_align import context_align
from cgf_optax.transforms.decompose import Overrides, decompose
from cgf_optax.transforms.entangle import entangle
from cgf_optax.transforms.modulate import modulate_by_gradient_norm, modulate_step
from cgf_optax.transforms.normalize import normalize
from cgf_optax.transforms.scale import ScaleWeight, scale_by_scales

# Arguments that fix shapes or Python control flow: list them in
# `optax.inject_hyperparams(..., static_args=...)`.
CGFM_STATIC_ARGS = ("strategy", "num_scales", "rank", "refresh_every",
                    "intermediate_rank", "power_iters", "init_power_iters",
                    "seed", "overrides")
CEGM_STATIC_ARGS = ("num_heads",)


def _zero_nonfinite(
    inner: optax.GradientTransformation,
    axis_name: coll.LeafAxisName = None,
) -> optax.GradientTransformationExtraArgs:
  """Runs ``inner`` on zeros when the updates are not all finite.

  ``inner``'s state (a momentum buffer) then stays finite; the step returned
  is NaN, so the caller (or :func:`optax.apply_if_finite`) sees the bad step.
  With ``axis_name`` (split axes inside ``shard_map``) every device takes
  the same decision.
  """
  inner = optax.with_extra_args_support(inner)
  axes_of = coll.leaf_axis_names("norm_axis_name", axis_name)

  def update_fn(updates, state, params=None, **extra_args):
    # One reduction over the updates: the price of opting into momentum.
    if axis_name is not None:
      leaves, paths = coll.leaves_with_paths(updates)
      sq = coll.global_sq_norm(leaves, paths, axes_of)
    else:
      sq = sum((jnp.sum(jnp.square(u.astype(jnp.float32)))
                for u in jax.tree.leaves(updates)), start=jnp.float32(0))
    finite = jnp.isfinite(sq)
    safe = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)),
                        updates)
    out, state = inner.update(safe, state, params, **extra_args)
    nan = jnp.float32(jnp.nan)
    out = jax.tree.map(
        lambda u: (u * jnp.where(finite, 1.0, nan)).astype(u.dtype), out)
    return out, state

  return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def _adam(b1: Any, b2: Any, eps: Any, mu_dtype: Any
          ) -> optax.GradientTransformation:
  """`optax.scale_by_adam`, its arguments checked (Optax does not check)."""
  # b1 = 1 or b2 = 1 zero Adam's bias corrections (0/0); eps = 0 divides an
  # entry whose gradient has always been 0 by 0: NaN steps from finite input.
  v.number("b1", b1, minimum=0.0, maximum=1.0)
  v.number("b2", b2, minimum=0.0, maximum=1.0)
  for name, x in (("b1", b1), ("b2", b2)):
    if not v.is_traced(x) and float(x) >= 1.0:
      raise ValueError(f"`{name}` must be < 1, got {float(x)}.")
  v.number("eps", eps, minimum=0.0, strict_minimum=True)
  if mu_dtype is not None:
    mu_dtype = v.float_dtype("mu_dtype", mu_dtype)
  return optax.scale_by_adam(b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype)


def cgfm(
    learning_rate: optax.ScalarOrSchedule,
    *,
    strategy: str = "lowrank",
    num_scales: int = 2,
    rank: int = 8,
    refresh_every: int = 10,
    intermediate_rank: int | None = None,
    power_iters: int = 1,
    init_power_iters: int = 4,
    stagger: bool = False,
    local: ScaleWeight = 1.0,
    intermediate: ScaleWeight = 1.0,
    global_: ScaleWeight = 0.5,
    reference: str = "first",
    max_factor: float | None = None,
    scope: str = "global",
    momentum: float | None = None,
    nesterov: bool = False,
    overrides: Overrides | None = None,
    seed: int = 0,
    norm_axis_name: coll.LeafAxisName = None,
) -> optax.GradientTransformationExtraArgs:
  r"""CGFM, Algorithm 1 as written: decompose → scale → modulate → SGD step.

  .. math::
    \nabla_\text{adj} = \sum_s \lambda_s\, G_s,\qquad
    \theta \leftarrow \theta - \eta\Big(1 + \frac{\|\nabla_\text{adj}\|}
      {\|\nabla\theta_0\|}\Big)\nabla_\text{adj}.

  The chain is ``decompose`` → ``scale_by_scales`` →
  ``modulate_by_gradient_norm`` → (optional heavy-ball ``momentum``, an
  addition to the paper, off by default) → ``scale_by_learning_rate``.

  The paper gives no values for the scale weights; the defaults
  (``local=1``, ``global_=0.5``) damp the dominant gradient subspace, a
  choice left to the quality benchmarks to judge.

  With :func:`optax.inject_hyperparams`, pass
  ``static_args=cgf_optax.CGFM_STATIC_ARGS``; the learning rate, the scale
  weights and ``max_factor`` can then be injected.

  Args:
    learning_rate: :math:`\eta`, a number or an :class:`optax.Schedule`.
    strategy: see :func:`cgf_optax.decompose`.
    num_scales: see :func:`cgf_optax.decompose`.
    rank: see :func:`cgf_optax.decompose`.
    refresh_every: see :func:`cgf_optax.decompose`.
    intermediate_rank: see :func:`cgf_optax.decompose`.
    power_iters: see :func:`cgf_optax.decompose`.
    init_power_iters: see :func:`cgf_optax.decompose`.
    stagger: see :func:`cgf_optax.decompose`.
    local: :math:`\lambda_\text{local}`, see :func:`cgf_optax.scale_by_scales`.
    intermediate: :math:`\lambda_\text{int}`.
    global_: :math:`\lambda_\text{global}`.
    reference: see :func:`cgf_optax.modulate_by_gradient_norm`.
    max_factor: see :func:`cgf_optax.modulate_by_gradient_norm`.
    scope: see :func:`cgf_optax.modulate_by_gradient_norm`.
    momentum: heavy-ball momentum applied after the modulation, or ``None``.
    nesterov: Nesterov momentum (with ``momentum``).
    overrides: see :func:`cgf_optax.decompose`.
    seed: see :func:`cgf_optax.decompose`.
    norm_axis_name: inside :func:`jax.shard_map`, the mesh axes over which
      the leaves are split (FSDP), for the global norm of the modulation: see
      :func:`cgf_optax.modulate_by_gradient_norm`'s ``axis_name``. Data
      parallelism (gradients averaged, whole on every device) needs none.
      ``lowrank`` and ``mean`` decompose each matrix as the device sees it,
      so they need whole matrices inside ``shard_map``; ``temporal`` is
      element-wise. (Under :func:`jax.jit` every strategy works on any
      sharding.)

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, cgf_optax
    >>> params = {"w": jnp.ones((4, 3))}
    >>> loss = lambda p: jnp.sum(p["w"] ** 2)
    >>> tx = cgf_optax.cgfm(0.3)
    >>> state = tx.init(params)
    >>> for _ in range(50):
    ...   updates, state = tx.update(jax.grad(loss)(params), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> bool(loss(params) < 1e-3)
    True

  References:
    CGFM, Algorithm 1 (``../shared/seeds``).
  """
  v.number_or_schedule("learning_rate", learning_rate)
  if momentum is not None:
    v.number("momentum", momentum, minimum=0.0, maximum=1.0)
  nesterov = v.boolean("nesterov", nesterov)
  coll.leaf_axis_names("norm_axis_name", norm_axis_name)
  return optax.chain(
      decompose(strategy, num_scales, rank, refresh_every,
                intermediate_rank=intermediate_rank, power_iters=power_iters,
                init_power_iters=init_power_iters,
                stagger=stagger, overrides=overrides, seed=seed),
      scale_by_scales(local=local, intermediate=intermediate, global_=global_),
      modulate_by_gradient_norm(reference, max_factor, scope,
                                axis_name=norm_axis_name),
      (_zero_nonfinite(optax.trace(decay=momentum, nesterov=nesterov),
                       norm_axis_name)
       if momentum is not None else optax.identity()),
      optax.scale_by_learning_rate(learning_rate),
  )


def cgfm_adamw(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    *,
    strategy: str = "lowrank",
    num_scales: int = 2,
    rank: int = 8,
    refresh_every: int = 10,
    intermediate_rank: int | None = None,
    power_iters: int = 1,
    init_power_iters: int = 4,
    stagger: bool = False,
    local: ScaleWeight = 1.0,
    intermediate: ScaleWeight = 1.0,
    global_: ScaleWeight = 0.5,
    modulate: bool = True,
    reference: str = "first",
    max_factor: float | None = 2.0,
    scope: str = "global",
    mu_dtype: Any = None,
    mask: Any = None,
    overrides: Overrides | None = None,
    seed: int = 0,
    norm_axis_name: coll.LeafAxisName = None,
) -> optax.GradientTransformationExtraArgs:
  r"""CGFM's decomposition and modulation around AdamW.

  The gradient is decomposed and re-weighted *before* Adam's moments
  (:math:`\nabla_\text{adj}` is what Adam sees); the modulation factor
  :math:`1 + \|\nabla_\text{adj}\|/\|\nabla_{\text{adj},0}\|` is computed from
  that same gradient and multiplies Adam's direction (through
  :func:`cgf_optax.modulate_step`), so that it scales the step size as in
  CGFM rather than being cancelled by Adam's normalisation. Decoupled weight
  decay is added after the modulation, so its strength is what
  ``weight_decay`` says:

  .. math::
    u_t = -\eta_t\Big(f_t\,\frac{\hat m_t}{\sqrt{\hat v_t} + \epsilon}
      + \text{wd}\,\theta_t\Big), \qquad
    f_t = \min\Big(1 + \frac{\|\nabla_\text{adj}\|}
      {\|\nabla_{\text{adj},0}\|},\ \text{max\_factor}\Big).

  Unlike :func:`cgfm`, ``max_factor`` defaults to 2 here: Adam's steps do not
  shrink as the gradient does, so an unbounded factor would only grow the
  step when gradients spike. ``modulate=False`` removes the modulation.

  Args:
    learning_rate: a number or an :class:`optax.Schedule`.
    b1: Adam's first-moment decay, in [0, 1).
    b2: Adam's second-moment decay, in [0, 1).
    eps: Adam's epsilon (> 0).
    weight_decay: decoupled weight decay.
    strategy: see :func:`cgf_optax.decompose`.
    num_scales: see :func:`cgf_optax.decompose`.
    rank: see :func:`cgf_optax.decompose`.
    refresh_every: see :func:`cgf_optax.decompose`.
    intermediate_rank: see :func:`cgf_optax.decompose`.
    power_iters: see :func:`cgf_optax.decompose`.
    init_power_iters: see :func:`cgf_optax.decompose`.
    stagger: see :func:`cgf_optax.decompose`.
    local: see :func:`cgf_optax.scale_by_scales`.
    intermediate: see :func:`cgf_optax.scale_by_scales`.
    global_: see :func:`cgf_optax.scale_by_scales`.
    modulate: apply the CGFM step-size modulation.
    reference: see :func:`cgf_optax.modulate_by_gradient_norm`.
    max_factor: see :func:`cgf_optax.modulate_by_gradient_norm`.
    scope: see :func:`cgf_optax.modulate_by_gradient_norm`.
    mu_dtype: dtype of Adam's first moment.
    mask: weight-decay mask, as in :func:`optax.adamw`.
    overrides: see :func:`cgf_optax.decompose`.
    seed: see :func:`cgf_optax.decompose`.
    norm_axis_name: inside :func:`jax.shard_map`, the mesh axes over which
      the leaves are split (FSDP), for the global norm of the modulation: see
      :func:`cgf_optax.modulate_by_gradient_norm`'s ``axis_name``. Data
      parallelism (gradients averaged, whole on every device) needs none.
      ``lowrank`` and ``mean`` decompose each matrix as the device sees it,
      so they need whole matrices inside ``shard_map``; ``temporal`` is
      element-wise. (Under :func:`jax.jit` every strategy works on any
      sharding.)

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  Example:
    >>> import jax.numpy as jnp, cgf_optax
    >>> tx = cgf_optax.cgfm_adamw(1e-3, weight_decay=0.01, rank=4)
    >>> state = tx.init({"w": jnp.zeros((8, 8))})

  References:
    CGFM, Algorithm 1 (``../shared/seeds``); Loshchilov & Hutter, 2019,
    Decoupled Weight Decay Regularization (arXiv:1711.05101).
  """
  v.number_or_schedule("learning_rate", learning_rate)
  v.number("weight_decay", weight_decay, minimum=0.0)
  modulate = v.boolean("modulate", modulate)
  v.mask("mask", mask)
  coll.leaf_axis_names("norm_axis_name", norm_axis_name)
  adam = _adam(b1, b2, eps, mu_dtype)
  return optax.chain(
      decompose(strategy, num_scales, rank, refresh_every,
                intermediate_rank=intermediate_rank, power_iters=power_iters,
                init_power_iters=init_power_iters,
                stagger=stagger, overrides=overrides, seed=seed),
      scale_by_scales(local=local, intermediate=intermediate, global_=global_),
      (modulate_step(adam, reference, max_factor, scope,
                     axis_name=norm_axis_name) if modulate
       else _zero_nonfinite(adam, norm_axis_name)),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )





def cegm(
    learning_rate: optax.ScalarOrSchedule,
    *,
    lam: float = 0.9,
    adapt_rate: float = 0.0,
    lam_bounds: tuple[float, float] = (0.05, 1.0),
    loss_signal: str = "log_ratio",
    num_heads: int = 1,
    gamma: float = 1.0,
    rho: float = 0.9,
    normalize_scope: str = "leaf",
    eps: float = 1e-8,
    require_context: bool = True,
    state_dtype: Any = None,
    axis_name: coll.AxisName = None,
    norm_axis_name: coll.LeafAxisName = None,
) -> optax.GradientTransformationExtraArgs:
  r"""CEGM, Algorithm 1 as written: entangle → context-align → normalise → step.

  .. math::
    G_t = \lambda G + (1-\lambda) G_{t-1},\quad
    E_t = G_t + \gamma\, Q_t Q_t^\top G_t,\quad
    \Theta \leftarrow \Theta - \eta\, \frac{E_t}{\|E_t\|_2 + \epsilon}.

  Call ``update(grads, state, params, context=ctx, value=loss)``: ``context``
  (see :func:`cgf_optax.context_align`, captured by
  :func:`cgf_optax.nnx.capture_context`) and the loss (which adapts λ, see
  :func:`cgf_optax.entangle`). With ``normalize_scope="leaf"`` every leaf moves
  by exactly η per step, so use a decaying schedule to converge.

  Args:
    learning_rate: η, a number or an :class:`optax.Schedule`.
    lam: see :func:`cgf_optax.entangle`.
    adapt_rate: see :func:`cgf_optax.entangle`.
    lam_bounds: see :func:`cgf_optax.entangle`.
    loss_signal: see :func:`cgf_optax.entangle`.
    num_heads: see :func:`cgf_optax.context_align`.
    gamma: see :func:`cgf_optax.context_align`.
    rho: see :func:`cgf_optax.context_align`.
    normalize_scope: ``scope`` of :func:`cgf_optax.normalize`.
    eps: see :func:`cgf_optax.normalize`.
    require_context: see :func:`cgf_optax.context_align`.
    state_dtype: dtype of the entangled-gradient state.
    axis_name: inside :func:`jax.shard_map` (data parallel: params whole
      on every device, gradients averaged), the mesh axes over which the
      batch is split: :func:`cgf_optax.entangle` averages the loss over them
      and :func:`cgf_optax.context_align` pools the context over the tokens
      of every device. Under :func:`jax.jit` sharding, leave it ``None``.
    norm_axis_name: inside :func:`jax.shard_map`, the mesh axes over which
      the leaves are split (FSDP), for :func:`cgf_optax.normalize`'s norms;
      data parallelism needs none. (A kernel split along its fan-in cannot
      be context-aligned inside ``shard_map``.)

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, cgf_optax
    >>> tx = cgf_optax.cegm(optax.linear_schedule(0.1, 0.0, 100),
    ...                     require_context=False)
    >>> params = jnp.array([1.0, -2.0])
    >>> state = tx.init(params)
    >>> for _ in range(100):
    ...   loss, g = jax.value_and_grad(lambda p: jnp.sum(p ** 2))(params)
    ...   u, state = tx.update(g, state, params, value=loss)
    ...   params = optax.apply_updates(params, u)
    >>> bool(jnp.linalg.norm(params) < 0.1)
    True

  References:
    CEGM, Algorithm 1 (``../shared/seeds``).
  """
  v.number_or_schedule("learning_rate", learning_rate)
  v.choice("normalize_scope", normalize_scope, ("leaf", "global"))
  coll.axis_names("axis_name", axis_name)
  coll.leaf_axis_names("norm_axis_name", norm_axis_name)
  return optax.chain(
      entangle(lam, adapt_rate, lam_bounds, state_dtype=state_dtype,
               axis_name=axis_name, loss_signal=loss_signal),
      context_align(num_heads, gamma, rho, require_context=require_context,
                    axis_name=axis_name),
      normalize(normalize_scope, eps, axis_name=norm_axis_name),
      optax.scale_by_learning_rate(learning_rate),
  )


def cegm_adamw(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    *,
    lam: float = 0.9,
    adapt_rate: float = 0.0,
    lam_bounds: tuple[float, float] = (0.05, 1.0),
    loss_signal: str = "log_ratio",
    num_heads: int = 1,
    gamma: float = 1.0,
    rho: float = 0.9,
    normalize_scope: str | None = "leaf",
    normalize_eps: float = 1e-8,
    require_context: bool = True,
    state_dtype: Any = None,
    mu_dtype: Any = None,
    mask: Any = None,
    axis_name: coll.AxisName = None,
    norm_axis_name: coll.LeafAxisName = None,
) -> optax.GradientTransformationExtraArgs:
  r"""The CEGM steps ahead of AdamW's moments.

  ``entangle`` → ``context_align`` → ``normalize`` → ``scale_by_adam`` →
  decoupled weight decay → ``-learning_rate``. Adam sees the normalised,
  context-aligned, entangled gradient; per-leaf normalisation makes every
  step's gradient the same size before Adam's moments average it, so Adam's
  second moment tracks the *direction*'s spread rather than the gradient
  scale. ``normalize_scope=None`` drops the normalisation. On a step whose
  gradient is not finite, Adam is fed zeros (its moments stay finite) and the
  step returned is NaN, as in :func:`cgfm_adamw`.

  Args:
    learning_rate: a number or an :class:`optax.Schedule`.
    b1: Adam's first-moment decay, in [0, 1).
    b2: Adam's second-moment decay, in [0, 1).
    eps: Adam's epsilon (> 0).
    weight_decay: decoupled weight decay.
    lam: see :func:`cgf_optax.entangle`.
    adapt_rate: see :func:`cgf_optax.entangle`.
    lam_bounds: see :func:`cgf_optax.entangle`.
    loss_signal: see :func:`cgf_optax.entangle`.
    num_heads: see :func:`cgf_optax.context_align`.
    gamma: see :func:`cgf_optax.context_align`.
    rho: see :func:`cgf_optax.context_align`.
    normalize_scope: ``"leaf"``, ``"global"`` or ``None``.
    normalize_eps: see :func:`cgf_optax.normalize`.
    require_context: see :func:`cgf_optax.context_align`.
    state_dtype: dtype of the entangled-gradient state.
    mu_dtype: dtype of Adam's first moment.
    mask: weight-decay mask, as in :func:`optax.adamw`.
    axis_name: inside :func:`jax.shard_map` (data parallel: params whole
      on every device, gradients averaged), the mesh axes over which the
      batch is split: :func:`cgf_optax.entangle` averages the loss over them
      and :func:`cgf_optax.context_align` pools the context over the tokens
      of every device. Under :func:`jax.jit` sharding, leave it ``None``.
    norm_axis_name: inside :func:`jax.shard_map`, the mesh axes over which
      the leaves are split (FSDP), for :func:`cgf_optax.normalize`'s norms;
      data parallelism needs none. (A kernel split along its fan-in cannot
      be context-aligned inside ``shard_map``.)

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  Example:
    >>> import jax.numpy as jnp, cgf_optax
    >>> tx = cgf_optax.cegm_adamw(1e-3, weight_decay=0.01, num_heads=2)
    >>> state = tx.init({"w": jnp.zeros((8, 8))})

  References:
    CEGM, Algorithm 1 (``../shared/seeds``); Loshchilov & Hutter, 2019
    (arXiv:1711.05101).
  """
  v.number_or_schedule("learning_rate", learning_rate)
  v.number("weight_decay", weight_decay, minimum=0.0)
  if normalize_scope is not None:
    v.choice("normalize_scope", normalize_scope, ("leaf", "global"))
  v.number("normalize_eps", normalize_eps, minimum=0.0)
  v.mask("mask", mask)
  coll.axis_names("axis_name", axis_name)
  coll.leaf_axis_names("norm_axis_name", norm_axis_name)
  adam = _adam(b1, b2, eps, mu_dtype)
  return optax.chain(
      entangle(lam, adapt_rate, lam_bounds, state_dtype=state_dtype,
               axis_name=axis_name, loss_signal=loss_signal),
      context_align(num_heads, gamma, rho, require_context=require_context,
                    axis_name=axis_name),
      (normalize(normalize_scope, normalize_eps, axis_name=norm_axis_name)
       if normalize_scope is not None else optax.identity()),
      # Zeros into Adam on a non-finite step, as in cgfm_adamw (the moments
      # stay finite; the step returned is NaN).
      _zero_nonfinite(adam, norm_axis_name),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )
