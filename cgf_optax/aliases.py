"""The papers' Algorithm 1 chains, ready to use.

The arguments that several aliases share (the ``decompose``, scale and
modulation options of the CGFM aliases, the entangle, context and
normalisation options of the CEGM aliases, AdamW's) are defined once, below,
with their defaults; each alias lists only its own.
"""

from __future__ import annotations

from typing import Any

import optax

from cgf_optax import _arguments as args
from cgf_optax import _validation as v
from cgf_optax.transforms import _collectives as coll
from cgf_optax.transforms._guard import zero_nonfinite
from cgf_optax.transforms.context_align import context_align
from cgf_optax.transforms.decompose import STATIC_ARGS, decompose
from cgf_optax.transforms.entangle import entangle
from cgf_optax.transforms.modulate import modulate_by_gradient_norm, modulate_step
from cgf_optax.transforms.normalize import normalize
from cgf_optax.transforms.scale import scale_by_scales

__all__ = ["CEGM_STATIC_ARGS", "CGFM_STATIC_ARGS", "cegm", "cegm_adamw", "cgfm",
           "cgfm_adamw", "cgfm_decompose"]

# Arguments that fix shapes or Python control flow: list them in
# `optax.inject_hyperparams(..., static_args=...)`.
CGFM_STATIC_ARGS = (*STATIC_ARGS, "overrides")
CEGM_STATIC_ARGS = ("num_heads",)

_Number = "float | jax.Array"

_DECOMPOSE = args.of(decompose, (
    "strategy", "num_scales", "rank", "refresh_every", "intermediate_rank",
    "power_iters", "init_power_iters", "stagger", "overrides", "seed"))
# The paper gives no values for the scale weights; these damp the dominant
# gradient subspace, a choice left to the quality benchmarks to judge.
_SCALES = args.of(scale_by_scales, ("local", "intermediate", "global_"),
                  global_=0.5)
_MODULATION = args.of(modulate_by_gradient_norm,
                      ("reference", "max_factor", "scope"))
_CGFM_SHARDING = {"norm_axis_name": args.Arg(None, "LeafAxisName", """\
inside :func:`jax.shard_map`, the mesh axes over which
      the leaves are split (FSDP), for the global norm of the modulation: see
      :func:`cgf_optax.modulate_by_gradient_norm`'s ``axis_name``. Data
      parallelism (gradients averaged, whole on every device) needs none.
      ``lowrank`` and ``mean`` decompose each matrix as the device sees it,
      so they need whole matrices inside ``shard_map``; ``temporal`` is
      element-wise. (Under :func:`jax.jit` every strategy works on any
      sharding.)""")}

_ENTANGLE = args.of(entangle, ("lam", "adapt_rate", "lam_bounds",
                               "loss_signal", "state_dtype"))
_CONTEXT = args.of(context_align, ("num_heads", "gamma", "rho",
                                   "require_context"))
_NORMALIZE = args.of(normalize, {"normalize_scope": "scope",
                                 "normalize_eps": "eps"})
_CEGM_SHARDING = {
    "axis_name": args.Arg(None, "AxisName", """\
inside :func:`jax.shard_map` (data parallel: params whole
      on every device, gradients averaged), the mesh axes over which the
      batch is split: :func:`cgf_optax.entangle` averages the loss over them
      and :func:`cgf_optax.context_align` pools the context over the tokens
      of every device. Under :func:`jax.jit` sharding, leave it ``None``."""),
    "norm_axis_name": args.Arg(None, "LeafAxisName", """\
inside :func:`jax.shard_map`, the mesh axes over which
      the leaves are split (FSDP), for :func:`cgf_optax.normalize`'s norms;
      data parallelism needs none. (A kernel split along its fan-in cannot
      be context-aligned inside ``shard_map``.)"""),
}

# AdamW's arguments, positional after the learning rate as in optax.adamw.
_ADAMW = {
    "b1": args.Arg(0.9, _Number, "Adam's first-moment decay, in [0, 1).",
                   positional=True),
    "b2": args.Arg(0.999, _Number, "Adam's second-moment decay, in [0, 1).",
                   positional=True),
    "adam_eps": args.Arg(1e-8, _Number, "Adam's epsilon (> 0), ``eps`` of "
                         ":func:`optax.adamw` (formerly ``eps``).",
                         positional=True),
    "weight_decay": args.Arg(1e-4, _Number, "decoupled weight decay.",
                             positional=True),
    "mu_dtype": args.Arg(None, "Any", "dtype of Adam's first moment."),
    "mask": args.Arg(None, "Any", "weight-decay mask, as in :func:`optax.adamw`."),
}


@args.with_shared(_DECOMPOSE, ignore_others=True)
def cgfm_decompose(**shared: Any) -> optax.GradientTransformationExtraArgs:
  """The :func:`cgf_optax.decompose` step that :func:`cgfm` and
  :func:`cgfm_adamw` build when called with the same keyword arguments.

  Keywords that are not ``decompose`` options of the aliases (the learning
  rate, scale weights, Adam's) are ignored, so the alias's keywords can be
  passed whole, e.g. to recompute, from an optimizer state's
  :class:`cgf_optax.DecomposeState`, the :class:`cgf_optax.Scales` the
  optimizer saw (telemetry).

  Args:
    {shared_args}
    ignored: any other keyword argument (ignored).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`, ``decompose(...)``.

  Example:
    >>> import cgf_optax
    >>> options = dict(rank=4, weight_decay=0.1)
    >>> tx = cgf_optax.cgfm_adamw(1e-3, **options)
    >>> dec = cgf_optax.cgfm_decompose(**options)   # the chain's first step
  """
  return decompose(**shared)


def _pick(shared: dict[str, Any], group: dict[str, Any]) -> dict[str, Any]:
  return {k: shared[k] for k in group}


def _cgfm_front(shared: dict[str, Any]) -> list[optax.GradientTransformation]:
  """decompose → scale_by_scales: the CGFM aliases' first steps."""
  coll.leaf_axis_names("norm_axis_name", shared["norm_axis_name"])
  return [cgfm_decompose(**shared), scale_by_scales(**_pick(shared, _SCALES))]


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
  v.number("adam_eps", eps, minimum=0.0, strict_minimum=True)
  if mu_dtype is not None:
    mu_dtype = v.float_dtype("mu_dtype", mu_dtype)
  return optax.scale_by_adam(b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype)


def _adamw_parts(learning_rate: Any, shared: dict[str, Any]
                 ) -> tuple[optax.GradientTransformation,
                            list[optax.GradientTransformation]]:
  """Adam, and what follows it: decoupled weight decay and −learning rate."""
  v.number_or_schedule("learning_rate", learning_rate)
  v.number("weight_decay", shared["weight_decay"], minimum=0.0)
  v.mask("mask", shared["mask"])
  adam = _adam(shared["b1"], shared["b2"], shared["adam_eps"],
               shared["mu_dtype"])
  return adam, [optax.add_decayed_weights(shared["weight_decay"],
                                          shared["mask"]),
                optax.scale_by_learning_rate(learning_rate)]


@args.with_shared(_DECOMPOSE, _SCALES, _MODULATION, _CGFM_SHARDING)
def cgfm(
    learning_rate: optax.ScalarOrSchedule,
    *,
    momentum: float | None = None,
    nesterov: bool = False,
    **shared: Any,
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
  choice left to the quality benchmarks to judge. :func:`cgfm_decompose`
  returns the chain's ``decompose`` step for the same keyword arguments.

  With :func:`optax.inject_hyperparams`, pass
  ``static_args=cgf_optax.CGFM_STATIC_ARGS``; the learning rate, the scale
  weights and ``max_factor`` can then be injected.

  Args:
    learning_rate: :math:`\eta`, a number or an :class:`optax.Schedule`.
    {shared_args}
    momentum: heavy-ball momentum applied after the modulation, or ``None``.
    nesterov: Nesterov momentum (with ``momentum``).

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
    Quillington et al., *Contextual Gradient Flow Modeling for Large
    Language Model Generalization in Multi-Scale Feature Spaces*, Section
    3.3, Algorithm 1.
  """
  v.number_or_schedule("learning_rate", learning_rate)
  if momentum is not None:
    v.number("momentum", momentum, minimum=0.0, maximum=1.0)
  nesterov = v.boolean("nesterov", nesterov)
  axis_name = shared["norm_axis_name"]
  return optax.chain(
      *_cgfm_front(shared),
      modulate_by_gradient_norm(**_pick(shared, _MODULATION),
                                axis_name=axis_name),
      (zero_nonfinite(optax.trace(decay=momentum, nesterov=nesterov),
                      axis_name)
       if momentum is not None else optax.identity()),
      optax.scale_by_learning_rate(learning_rate),
  )


@args.with_shared(_ADAMW, _DECOMPOSE, _SCALES,
                  args.of(modulate_by_gradient_norm,
                          ("reference", "max_factor", "scope"), max_factor=2.0),
                  _CGFM_SHARDING, renamed={"eps": "adam_eps"})
def cgfm_adamw(
    learning_rate: optax.ScalarOrSchedule,
    *,
    modulate: bool = True,
    **shared: Any,
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
    u_t = -\eta_t\Big(f_t\,\frac{\hat m_t}{\sqrt{\hat v_t} + \epsilon_\text{adam}}
      + \text{wd}\,\theta_t\Big), \qquad
    f_t = \min\Big(1 + \frac{\|\nabla_\text{adj}\|}
      {\|\nabla_{\text{adj},0}\|},\ \text{max\_factor}\Big).

  Unlike :func:`cgfm`, ``max_factor`` defaults to 2 here: Adam's steps do not
  shrink as the gradient does, so an unbounded factor would only grow the
  step when gradients spike. ``modulate=False`` removes the modulation.

  Args:
    learning_rate: a number or an :class:`optax.Schedule`.
    {shared_args}
    modulate: apply the CGFM step-size modulation.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  Example:
    >>> import jax.numpy as jnp, cgf_optax
    >>> tx = cgf_optax.cgfm_adamw(1e-3, weight_decay=0.01, rank=4)
    >>> state = tx.init({"w": jnp.zeros((8, 8))})

  References:
    Quillington et al., *Contextual Gradient Flow Modeling for Large
    Language Model Generalization in Multi-Scale Feature Spaces*, Section
    3.3, Algorithm 1;
    Loshchilov & Hutter, 2019, *Decoupled Weight Decay Regularization*
    (arXiv:1711.05101), Algorithm 2.
  """
  adam, tail = _adamw_parts(learning_rate, shared)
  modulate = v.boolean("modulate", modulate)
  axis_name = shared["norm_axis_name"]
  front = _cgfm_front(shared)
  inner = (modulate_step(adam, **_pick(shared, _MODULATION), axis_name=axis_name)
           if modulate else zero_nonfinite(adam, axis_name))
  return optax.chain(*front, inner, *tail)


def _cegm_steps(shared: dict[str, Any]) -> list[optax.GradientTransformation]:
  """entangle → context_align → normalize (or nothing if its scope is None)."""
  scope = shared["normalize_scope"]
  if scope is not None:
    v.choice("normalize_scope", scope, ("leaf", "global"))
  v.number("normalize_eps", shared["normalize_eps"], minimum=0.0)
  coll.axis_names("axis_name", shared["axis_name"])
  coll.leaf_axis_names("norm_axis_name", shared["norm_axis_name"])
  return [
      entangle(**_pick(shared, _ENTANGLE),
               axis_name=shared["axis_name"]),
      context_align(**_pick(shared, _CONTEXT),
                    axis_name=shared["axis_name"]),
      (normalize(scope, shared["normalize_eps"],
                 axis_name=shared["norm_axis_name"])
       if scope is not None else optax.identity()),
  ]


@args.with_shared(_ENTANGLE, _CONTEXT, _NORMALIZE, _CEGM_SHARDING,
                  renamed={"eps": "normalize_eps"})
def cegm(
    learning_rate: optax.ScalarOrSchedule,
    **shared: Any,
) -> optax.GradientTransformationExtraArgs:
  r"""CEGM, Algorithm 1 as written: entangle → context-align → normalise → step.

  .. math::
    G_t = \lambda G + (1-\lambda) G_{t-1},\quad
    E_t = G_t + \gamma\, Q_t Q_t^\top G_t,\quad
    \Theta \leftarrow \Theta - \eta\, \frac{E_t}{\|E_t\|_2 + \epsilon_\text{norm}}.

  Call ``update(grads, state, params, context=ctx, value=loss)``: ``context``
  (see :func:`cgf_optax.context_align`, captured by
  :func:`cgf_optax.nnx.capture_context`) and the loss (which adapts λ, see
  :func:`cgf_optax.entangle`). With ``normalize_scope="leaf"`` every leaf moves
  by exactly η per step, so use a decaying schedule to converge.
  :math:`\epsilon_\text{norm}` is ``normalize_eps`` (formerly ``eps``, still
  accepted with a ``DeprecationWarning``).

  Args:
    learning_rate: η, a number or an :class:`optax.Schedule`.
    {shared_args}

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
    Sisate et al., *Contextually Entangled Gradient Mapping for
    Optimized LLM Comprehension*, Section III.B, Algorithm 1.
  """
  v.number_or_schedule("learning_rate", learning_rate)
  v.choice("normalize_scope", shared["normalize_scope"], ("leaf", "global"))
  return optax.chain(*_cegm_steps(shared),
                     optax.scale_by_learning_rate(learning_rate))


@args.with_shared(_ADAMW, _ENTANGLE, _CONTEXT, _NORMALIZE, _CEGM_SHARDING,
                  renamed={"eps": "adam_eps"})
def cegm_adamw(
    learning_rate: optax.ScalarOrSchedule,
    **shared: Any,
) -> optax.GradientTransformationExtraArgs:
  r"""The CEGM steps ahead of AdamW's moments.

  ``entangle`` → ``context_align`` → ``normalize`` → ``scale_by_adam`` →
  decoupled weight decay → ``-learning_rate``. Adam sees the normalised,
  context-aligned, entangled gradient; per-leaf normalisation makes every
  step's gradient the same size before Adam's moments average it, so Adam's
  second moment tracks the *direction*'s spread rather than the gradient
  scale. ``normalize_scope=None`` drops the normalisation. Adam's epsilon
  is ``adam_eps`` (formerly ``eps``, still accepted with a
  ``DeprecationWarning``). On a step whose
  gradient is not finite, Adam is fed zeros (its moments stay finite) and the
  step returned is NaN, as in :func:`cgfm_adamw`.

  Args:
    learning_rate: a number or an :class:`optax.Schedule`.
    {shared_args}

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  Example:
    >>> import jax.numpy as jnp, cgf_optax
    >>> tx = cgf_optax.cegm_adamw(1e-3, num_heads=2, require_context=False)
    >>> params = {"w": jnp.ones((8, 4))}
    >>> updates, state = tx.update(params, tx.init(params), params, value=1.0)
    >>> updates["w"].shape
    (8, 4)

  References:
    Sisate et al., *Contextually Entangled Gradient Mapping for
    Optimized LLM Comprehension*, Section III.B, Algorithm 1;
    Loshchilov & Hutter, 2019, *Decoupled Weight Decay Regularization*
    (arXiv:1711.05101), Algorithm 2.
  """
  adam, tail = _adamw_parts(learning_rate, shared)
  # Zeros into Adam on a non-finite step, as in cgfm_adamw (the moments stay
  # finite; the step returned is NaN).
  return optax.chain(*_cegm_steps(shared),
                     zero_nonfinite(adam, shared["norm_axis_name"]), *tail)
