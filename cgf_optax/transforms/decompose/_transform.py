"""CGFM step 1: split each gradient leaf into local / intermediate / global scales.

The factory: argument checks, the state, ``init`` and ``update``. The leaf
rules are in :mod:`._rules`, the strategies in :mod:`._lowrank` and
:mod:`._splits`.
"""

from __future__ import annotations

import functools
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from cgf_optax import _validation as v
from cgf_optax.transforms._scales import whole
from cgf_optax.transforms._state import is_placeholder, not_params
from cgf_optax.transforms.decompose import _lowrank
from cgf_optax.transforms.decompose._rules import (
  STRATEGIES,
  WHOLE,
  Overrides,
  Planner,
  Strategy,
  WholeScale,
  compile_overrides,
)
from cgf_optax.transforms.decompose._splits import mean_split, temporal_split

__all__ = ["DecomposeState", "STATIC_ARGS", "decompose"]

STATIC_ARGS = ("strategy", "num_scales", "rank", "refresh_every",
               "intermediate_rank", "power_iters", "init_power_iters", "seed")
"""The arguments of :func:`decompose` that fix shapes or Python control flow
(list them in ``optax.inject_hyperparams(..., static_args=...)``)."""


class DecomposeState(NamedTuple):
  """State of :func:`decompose`.

  One state for all strategies, rather than one per strategy: ``overrides``
  mixes strategies leaf by leaf within one tree, so every per-leaf field is a
  tree shaped like the params, ``None`` at the leaves of other strategies
  (an empty pytree: it costs nothing and keeps one checkpoint format for
  every choice of strategies).

  Attributes:
    count: number of updates so far (int32).
    basis: per leaf, for ``lowrank`` leaves, the tracked orthonormal basis of
      shape ``[batch, min(m, n), k]`` (``k`` = rank, plus the intermediate
      rank for three scales) on the smaller side of the matrix; else ``None``.
    slow: per leaf, for ``temporal`` leaves, the slow EMA of the gradient.
    fast: per leaf, for three-scale ``temporal`` leaves, the fast EMA.
  """

  count: jax.Array
  basis: Any
  slow: Any
  fast: Any


def decompose(
    strategy: Strategy = "lowrank",
    num_scales: Literal[2, 3] = 2,
    rank: int = 8,
    refresh_every: int = 10,
    *,
    intermediate_rank: int | None = None,
    power_iters: int = 1,
    init_power_iters: int = 4,
    stagger: bool = False,
    fast_decay: float | jax.Array = 0.9,
    slow_decay: float | jax.Array = 0.99,
    vector_scale: WholeScale = "local",
    nd_rule: Literal["batch", "flatten"] = "batch",
    overrides: Overrides | None = None,
    seed: int = 0,
    basis_dtype: Any = jnp.float32,
    ema_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Splits every gradient leaf into scale components that sum to it.

  CGFM's Algorithm 1 (lines 7–10) decomposes the gradient into "localized and
  globalized components" across "local, intermediate and global scales"
  (Section 3.2). This transform replaces each gradient leaf :math:`G` by a
  :class:`Scales` container whose parts partition it,

  .. math::
    G = G_\text{local} + G_\text{intermediate} + G_\text{global},

  exactly in real arithmetic and up to one rounding per part in floating
  point. The paper does not fix the decomposition; three readings are offered.
  Matrices are viewed as :math:`G \in \mathbb{R}^{m \times n}`, ``m`` the
  fan-in axis (a Flax ``Dense`` kernel ``W[in, out]``).

  ``"lowrank"`` (spatial scales). With :math:`Q \in \mathbb{R}^{s \times k}`
  an orthonormal basis on the smaller side of :math:`G` (``s = min(m, n)``)
  that tracks the top singular subspace,

  .. math::
    G_\text{global} = Q_{:r} Q_{:r}^\top G,\quad
    G_\text{intermediate} = Q_{r:} Q_{r:}^\top G,\quad
    G_\text{local} = G - G_\text{global} - G_\text{intermediate}

  (written for the left side; on the right side :math:`G Q Q^\top`). Every
  ``refresh_every`` steps :math:`Q` is refreshed by warm-started subspace
  iteration :math:`Q \leftarrow \mathrm{qr}(G G^\top Q)` (``power_iters``
  times; ``init_power_iters`` times at step 0 from a random start), and for
  three scales a Rayleigh–Ritz rotation orders its columns by singular value
  so that the first ``rank`` span the top band. For a fixed gradient the
  global band converges to the top-``rank`` singular subspace (as
  :math:`(\sigma_{r+1}/\sigma_r)^{2t}`). This is GaLore's projection used to
  split, not to compress.

  ``"temporal"`` (scales in time). With bias-corrected EMAs :math:`\hat s`
  (``slow_decay``) and :math:`\hat f` (``fast_decay``) of the gradient,
  :math:`G_\text{global} = \hat s`, :math:`G_\text{intermediate} = \hat f -
  \hat s`, :math:`G_\text{local} = G - \hat f` (two scales:
  :math:`G_\text{local} = G - \hat s`).

  ``"mean"`` (gradient centralization). :math:`G_\text{global} =
  \mathbf{1}\,\bar g^\top`, the mean over the fan-in axis, and
  :math:`G_\text{local} = G - G_\text{global}`; with three scales the global
  part is the mean of the whole matrix and the intermediate part the column
  means minus it.

  Leaf rules (applied in this order):

  1. ``overrides``: a mapping from regular expressions (searched in the
     leaf's path, ``'layers/0/attn/kernel'``; first match wins) or a callable
     ``(path, leaf) -> rule | None`` giving a :class:`LeafRule`, a strategy
     name, a scale name (``"local"``, ``"intermediate"``, ``"global"``: the
     whole leaf goes to that scale) or a :class:`MatrixAxes`.
  2. Scalars, 1-D leaves (biases, norm scales) and empty leaves go whole into
     ``vector_scale``. An override may instead send a scalar or vector to
     ``"temporal"`` or ``"mean"`` (mean of the vector); ``"lowrank"`` on a
     vector is an error.
  3. 2-D leaves are ``[fan_in, fan_out]``.
  4. Leaves of 3 or more dimensions, by ``nd_rule``: ``"batch"`` (default)
     treats the last two axes as the matrix and the leading ones as a batch
     of independent matrices (stacked or scanned layers ``[L, in, out]``);
     ``"flatten"`` flattens all but the last axis into the fan-in (conv
     kernels ``[h, w, in, out]``).

  A ``rank`` larger than the matrix is clamped per leaf to ``min(m, n)``
  (then the projection is the identity and ``local`` is zero), so one
  ``rank`` serves trees with matrices of many sizes.

  Non-finite gradients: the parts of a leaf with NaN/Inf carry them through
  (so the caller sees them), but they never enter the state: a refresh with a
  non-finite or all-zero gradient keeps the previous basis, and EMA entries
  whose gradient entry is not finite (or would overflow ``ema_dtype``) keep
  their value. The step count still advances, as Optax's counters do: a bad
  step that falls on a refresh skips it (the basis waits for the next one,
  as with a zero gradient), and the EMAs' bias correction counts it. Wrap the
  optimizer in :func:`optax.apply_if_finite` to skip such steps entirely.

  Args:
    strategy: ``"lowrank"``, ``"temporal"`` or ``"mean"``: the default for
      matrices.
    num_scales: 2 (local, global) or 3 (local, intermediate, global).
    rank: ``lowrank``: dimension of the global subspace (clamped per leaf).
    refresh_every: ``lowrank``: steps between basis refreshes (>= 1). With
      ``refresh_every=1`` and ``init_power_iters == power_iters`` the
      compiled step has no conditional at all, which on GPU keeps the host
      from waiting for the device (see the README's performance section).
    intermediate_rank: ``lowrank`` with three scales: dimension of the
      intermediate band (default: ``rank``).
    power_iters: subspace iterations per refresh (1 to 64; unrolled).
    init_power_iters: subspace iterations at step 0 (random start; 1 to
      64).
    stagger: spread the refreshes over the period: the low-rank leaves are
      split into ``refresh_every`` groups of about equal cost and group
      ``t % refresh_every`` is refreshed at step ``t`` (every leaf still once
      per period; all of them at step 0), so no single step pays for all.
    fast_decay: ``temporal``: decay of the fast EMA.
    slow_decay: ``temporal``: decay of the slow EMA (> ``fast_decay``).
    vector_scale: scale that scalars and 1-D leaves go to whole: ``"local"``,
      ``"intermediate"`` (three scales only) or ``"global"``.
    nd_rule: ``"batch"`` or ``"flatten"``, for leaves of 3+ dimensions.
    overrides: per-leaf rules, see above.
    seed: seed of the random initial bases.
    basis_dtype: dtype of the stored bases (the subspace iteration runs in at
      least float32).
    ema_dtype: dtype of the EMAs (default: the gradient's).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose updates have a
    :class:`Scales` where each gradient leaf was. Follow it with
    :func:`cgf_optax.scale_by_scales` to get a plain gradient back.

  Example:
    >>> import jax.numpy as jnp, cgf_optax
    >>> tx = cgf_optax.decompose("mean")
    >>> g = {"w": jnp.array([[1.0, 2.0], [3.0, 6.0]])}
    >>> parts, _ = tx.update(g, tx.init(g))
    >>> parts["w"].global_
    Array([[2., 4.],
           [2., 4.]], dtype=float32)
    >>> parts["w"].local + parts["w"].global_
    Array([[1., 2.],
           [3., 6.]], dtype=float32)

  References:
    Quillington et al., *Contextual Gradient Flow Modeling for Large Language
    Model Generalization in Multi-Scale Feature Spaces*, Section 3.3,
    Algorithm 1 lines 7–10, and Section 3.2;
    Zhao et al., 2024, GaLore (arXiv:2403.03507) for the tracked projection;
    Yong et al., 2020, Gradient Centralization (arXiv:2004.01461) for
    ``"mean"``.
  """
  statics = dict(static_names=STATIC_ARGS)
  strategy = v.choice("strategy", strategy, STRATEGIES)
  num_scales = v.static_int("num_scales", num_scales, **statics)
  if num_scales not in (2, 3):
    raise ValueError(f"`num_scales` must be 2 or 3, got {num_scales}.")
  rank = v.static_int("rank", rank, minimum=1, **statics)
  refresh_every = v.static_int("refresh_every", refresh_every, minimum=1,
                               maximum=v.INT32_MAX, **statics)
  intermediate_rank = v.static_int(
      "intermediate_rank", rank if intermediate_rank is None
      else intermediate_rank, minimum=1, **statics)
  # The iterations are unrolled into the compiled step: a few are plenty
  # for a warm-started basis; the bound keeps compilation finite.
  iters = dict(minimum=1, maximum=_lowrank.MAX_POWER_ITERS, **statics)
  power_iters = v.static_int("power_iters", power_iters, **iters)
  init_power_iters = v.static_int("init_power_iters", init_power_iters, **iters)
  seed = v.static_int("seed", seed, minimum=-2**63, maximum=2**63 - 1,
                      **statics)
  _check_decays(fast_decay, slow_decay, strategy)
  vector_scale = v.choice("vector_scale", vector_scale, tuple(WHOLE))
  if WHOLE[vector_scale] == "intermediate" and num_scales == 2:
    raise ValueError(
        "`vector_scale='intermediate'` needs num_scales=3 (with two scales "
        "there is no intermediate part).")
  nd_rule = v.choice("nd_rule", nd_rule, ("batch", "flatten"))
  if not isinstance(stagger, bool):
    raise v.HyperparameterTypeError(
        f"`stagger` must be a bool, got {type(stagger).__name__} {stagger!r}.")
  cfg = _Config(
      Planner(strategy, num_scales, rank, intermediate_rank, vector_scale,
              nd_rule, compile_overrides(overrides)),
      _lowrank.Schedule(refresh_every, power_iters, init_power_iters,
                        stagger, rotate=num_scales == 3),
      seed, v.float_dtype("basis_dtype", basis_dtype),
      None if ema_dtype is None else v.float_dtype("ema_dtype", ema_dtype),
      fast_decay, slow_decay)
  return optax.GradientTransformationExtraArgs(
      functools.partial(_init, cfg), functools.partial(_update, cfg))


class _Config(NamedTuple):
  """The checked arguments of one :func:`decompose`."""

  planner: Planner
  schedule: _lowrank.Schedule
  seed: int
  basis_dtype: Any
  ema_dtype: Any
  fast_decay: Any
  slow_decay: Any


def _init(cfg: _Config, params: Any) -> DecomposeState:
  if is_placeholder(params):  # optax.tree.map_params: nothing params-shaped
    return DecomposeState(count=jnp.zeros([], jnp.int32), basis=not_params(),
                          slow=not_params(), fast=not_params())
  v.real_float_leaves("decompose", params)
  leaves, plans, treedef = cfg.planner.plans(params)
  key = jax.random.key(cfg.seed)
  basis, slow, fast = [], [], []
  for i, (leaf, p) in enumerate(zip(leaves, plans, strict=True)):
    b = s = f = None
    if p.kind == "lowrank":
      b = _lowrank.init_basis(jax.random.fold_in(key, i), p, cfg.basis_dtype)
    elif p.kind == "temporal":
      s = jnp.zeros_like(leaf, dtype=cfg.ema_dtype or leaf.dtype)  # sharded
      f = jnp.zeros_like(s) if cfg.planner.num_scales == 3 else None
    basis.append(b)
    slow.append(s)
    fast.append(f)
  unflat = lambda xs: jax.tree_util.tree_unflatten(treedef, xs)
  return DecomposeState(count=jnp.zeros([], jnp.int32), basis=unflat(basis),
                        slow=unflat(slow), fast=unflat(fast))


def _update(cfg: _Config, updates: Any, state: DecomposeState,
            params: Any = None, **extra_args: Any) -> tuple[Any, DecomposeState]:
  del params, extra_args
  v.real_float_leaves("decompose", updates, "updates")
  leaves, plans, treedef = cfg.planner.plans(updates)
  bases = treedef.flatten_up_to(state.basis)
  slows = treedef.flatten_up_to(state.slow)
  fasts = treedef.flatten_up_to(state.fast)
  lr = [i for i, p in enumerate(plans) if p.kind == "lowrank"]
  if lr:   # 1. refresh the low-rank bases (when the schedule says so)
    new_qs = _lowrank.refresh_bases(
        [plans[i].view.to_matrix(leaves[i]) for i in lr],
        [bases[i] for i in lr], [plans[i] for i in lr], state.count,
        cfg.schedule)
    for i, q in zip(lr, new_qs, strict=True):
      bases[i] = q
  count = optax.safe_increment(state.count)
  out = []
  for i, (g, p) in enumerate(zip(leaves, plans, strict=True)):   # 2. split
    if p.kind == "whole":
      out.append(whole(g, p.scale))
    elif p.kind == "lowrank":
      out.append(_lowrank.split(g, bases[i], p))
    elif p.kind == "mean":
      out.append(mean_split(g, p.view, cfg.planner.num_scales))
    else:
      parts, slows[i], fasts[i] = temporal_split(
          g, slows[i], fasts[i], count, cfg.slow_decay, cfg.fast_decay)
      out.append(parts)
  unflat = lambda xs: jax.tree_util.tree_unflatten(treedef, xs)
  return unflat(out), DecomposeState(
      count=count, basis=unflat(bases), slow=unflat(slows), fast=unflat(fasts))


def _check_decays(fast_decay: Any, slow_decay: Any, strategy: str) -> None:
  fast_decay = v.number("fast_decay", fast_decay, minimum=0.0, maximum=1.0)
  slow_decay = v.number("slow_decay", slow_decay, minimum=0.0, maximum=1.0)
  if (not v.is_traced(fast_decay) and not v.is_traced(slow_decay)
      and strategy == "temporal" and not float(slow_decay) > float(fast_decay)):
    raise ValueError(
        f"`slow_decay` ({float(slow_decay)}) must be greater than `fast_decay` "
        f"({float(fast_decay)}).")
