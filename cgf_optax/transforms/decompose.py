"""CGFM step 1: split each gradient leaf into local / intermediate / global scales."""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax._src import numerics

from cgf_optax import _validation as v
from cgf_optax.transforms._leaves import MatrixAxes, MatrixView, path_str
from cgf_optax.transforms._scales import Scales, whole
from cgf_optax.transforms._state import is_placeholder, not_params

STRATEGIES = ("lowrank", "temporal", "mean")
_WHOLE = {"local": "local", "intermediate": "intermediate", "global": "global_",
          "global_": "global_"}
_STATIC = ("strategy", "num_scales", "rank", "refresh_every", "intermediate_rank",
           "power_iters", "init_power_iters", "seed")


class LeafRule(NamedTuple):
  """A per-leaf override for :func:`decompose`.

  Attributes:
    strategy: ``"lowrank"``, ``"temporal"`` or ``"mean"`` to decompose the
      leaf with that strategy, or ``"local"``, ``"intermediate"``,
      ``"global"`` to put the leaf whole into that scale; ``None`` keeps the
      transform's ``strategy``.
    axes: the leaf's :class:`MatrixAxes`; ``None`` keeps the default rule.
  """

  strategy: str | None = None
  axes: MatrixAxes | None = None


Overrides = (
    Mapping[str, "str | MatrixAxes | LeafRule"]
    | Callable[[str, Any], "str | MatrixAxes | LeafRule | None"]
)


class DecomposeState(NamedTuple):
  """State of :func:`decompose`.

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


class _Plan(NamedTuple):
  kind: str                        # "whole" | "lowrank" | "temporal" | "mean"
  scale: str | None = None         # for "whole"
  view: MatrixView | None = None   # for "lowrank" and matrix "mean"
  left: bool = True                # lowrank: basis on the fan-in side
  rank: int = 0                    # lowrank: size of the global band
  k: int = 0                       # lowrank: size of the whole tracked basis


# Largest power_iters / init_power_iters (unrolled in the compiled step).
MAX_POWER_ITERS = 64


def _as_rule(value: Any, path: str) -> LeafRule:
  if value is None:
    return LeafRule()
  if isinstance(value, LeafRule):
    rule = value
  elif isinstance(value, MatrixAxes):
    rule = LeafRule(axes=value)
  elif isinstance(value, str):
    rule = LeafRule(strategy=value)
  else:
    raise v.HyperparameterTypeError(
        f"`overrides` gave {type(value).__name__} {value!r} for leaf '{path}'; "
        "expected a strategy or scale name, a MatrixAxes, a LeafRule or None."
    )
  if rule.strategy is not None and rule.strategy not in STRATEGIES + tuple(_WHOLE):
    raise ValueError(
        f"`overrides` gave strategy {rule.strategy!r} for leaf '{path}'; expected "
        f"one of {STRATEGIES + ('local', 'intermediate', 'global')}."
    )
  if rule.axes is not None and not isinstance(rule.axes, MatrixAxes):
    raise v.HyperparameterTypeError(
        f"`overrides` gave axes {rule.axes!r} for leaf '{path}'; expected a "
        "MatrixAxes."
    )
  return rule


def decompose(
    strategy: str = "lowrank",
    num_scales: int = 2,
    rank: int = 8,
    refresh_every: int = 10,
    *,
    intermediate_rank: int | None = None,
    power_iters: int = 1,
    init_power_iters: int = 4,
    stagger: bool = False,
    fast_decay: float = 0.9,
    slow_decay: float = 0.99,
    vector_scale: str = "local",
    nd_rule: str = "batch",
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
    CGFM, Algorithm 1 lines 7–10 and Section 3.2 (``../shared/seeds``);
    Zhao et al., 2024, GaLore (arXiv:2403.03507) for the tracked projection;
    Yong et al., 2020, Gradient Centralization (arXiv:2004.01461) for
    ``"mean"``.
  """
  statics = dict(static_names=_STATIC)
  strategy = v.choice("strategy", strategy, STRATEGIES)
  num_scales = v.static_int("num_scales", num_scales, **statics)
  if num_scales not in (2, 3):
    raise ValueError(f"`num_scales` must be 2 or 3, got {num_scales}.")
  rank = v.static_int("rank", rank, minimum=1, **statics)
  refresh_every = v.static_int("refresh_every", refresh_every, minimum=1,
                               maximum=v.INT32_MAX, **statics)
  if intermediate_rank is None:
    intermediate_rank = rank
  intermediate_rank = v.static_int(
      "intermediate_rank", intermediate_rank, minimum=1, **statics)
  # The iterations are unrolled into the compiled step: a few are plenty
  # for a warm-started basis; the bound keeps compilation finite.
  power_iters = v.static_int("power_iters", power_iters, minimum=1,
                             maximum=MAX_POWER_ITERS, **statics)
  init_power_iters = v.static_int(
      "init_power_iters", init_power_iters, minimum=1,
      maximum=MAX_POWER_ITERS, **statics)
  seed = v.static_int("seed", seed, minimum=-2**63, maximum=2**63 - 1,
                      **statics)
  fast_decay = v.number("fast_decay", fast_decay, minimum=0.0, maximum=1.0)
  slow_decay = v.number("slow_decay", slow_decay, minimum=0.0, maximum=1.0)
  if (not v.is_traced(fast_decay) and not v.is_traced(slow_decay)
      and strategy == "temporal" and not float(slow_decay) > float(fast_decay)):
    raise ValueError(
        f"`slow_decay` ({float(slow_decay)}) must be greater than `fast_decay` "
        f"({float(fast_decay)}).")
  vector_scale = v.choice("vector_scale", vector_scale, tuple(_WHOLE))
  if _WHOLE[vector_scale] == "intermediate" and num_scales == 2:
    raise ValueError(
        "`vector_scale='intermediate'` needs num_scales=3 (with two scales "
        "there is no intermediate part).")
  nd_rule = v.choice("nd_rule", nd_rule, ("batch", "flatten"))
  if not isinstance(stagger, bool):
    raise v.HyperparameterTypeError(
        f"`stagger` must be a bool, got {type(stagger).__name__} {stagger!r}.")
  if overrides is not None and not (callable(overrides)
                                    or isinstance(overrides, Mapping)):
    raise v.HyperparameterTypeError(
        "`overrides` must be a mapping {path regex: rule} or a callable "
        f"(path, leaf) -> rule, got {type(overrides).__name__}.")
  if isinstance(overrides, Mapping):
    patterns = []
    for k, val in overrides.items():
      try:
        patterns.append((re.compile(k), val))
      except (TypeError, re.error) as e:
        raise ValueError(
            f"`overrides` has key {k!r}, which is not a regular expression "
            f"of leaf paths ({e}).") from None
  basis_dtype = v.float_dtype("basis_dtype", basis_dtype)
  ema_dtype = None if ema_dtype is None else v.float_dtype("ema_dtype", ema_dtype)

  def lookup(path: str, leaf: Any) -> LeafRule:
    if overrides is None:
      return LeafRule()
    if callable(overrides):
      return _as_rule(overrides(path, leaf), path)
    for pattern, value in patterns:
      if pattern.search(path):
        return _as_rule(value, path)
    return LeafRule()

  def plan(path: str, leaf: Any) -> _Plan:
    rule = lookup(path, leaf)
    strat = rule.strategy or strategy
    shape = tuple(leaf.shape)
    if strat in _WHOLE:
      scale = _WHOLE[strat]
      if scale == "intermediate" and num_scales == 2:
        raise ValueError(
            f"`overrides` sends leaf '{path}' to 'intermediate', which needs "
            "num_scales=3.")
      return _Plan("whole", scale=scale)
    size_zero = any(d == 0 for d in shape)
    if len(shape) < 2 and rule.axes is None:
      if rule.strategy is None or size_zero:
        return _Plan("whole", scale=_WHOLE[vector_scale])
      if strat == "lowrank":
        raise ValueError(
            f"`overrides` asks 'lowrank' for leaf '{path}' of shape {shape}; "
            "lowrank needs a matrix (give MatrixAxes for a leaf of 2+ dims).")
      return _Plan(strat)
    if strat == "temporal":
      return _Plan("temporal")
    if rule.axes is not None:
      axes = rule.axes
    elif len(shape) == 2 or nd_rule == "batch":
      axes = MatrixAxes(-2, -1)
    else:
      axes = MatrixAxes(tuple(range(len(shape) - 1)), len(shape) - 1)
    view = MatrixView.create(shape, axes)
    if size_zero or view.m == 0 or view.n == 0:
      return _Plan("whole", scale=_WHOLE[vector_scale])
    if strat == "mean":
      return _Plan("mean", view=view)
    s = min(view.m, view.n)
    r = min(rank, s)
    k = min(r + (intermediate_rank if num_scales == 3 else 0), s)
    return _Plan("lowrank", view=view, left=view.m <= view.n, rank=r, k=k)

  def plans_of(tree: Any) -> tuple[list[Any], list[_Plan], Any]:
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    leaves = [leaf for _, leaf in flat]
    return leaves, [plan(path_str(p), leaf) for p, leaf in flat], treedef

  def init_fn(params: Any) -> DecomposeState:
    if is_placeholder(params):  # optax.tree.map_params: nothing params-shaped
      return DecomposeState(count=jnp.zeros([], jnp.int32), basis=not_params(),
                            slow=not_params(), fast=not_params())
    v.real_float_leaves("decompose", params)
    leaves, plans, treedef = plans_of(params)
    key = jax.random.key(seed)
    basis, slow, fast = [], [], []
    for i, (leaf, p) in enumerate(zip(leaves, plans, strict=True)):
      b = s = f = None
      if p.kind == "lowrank":
        q = jax.random.normal(
            jax.random.fold_in(key, i),
            (p.view.batch, min(p.view.m, p.view.n), p.k), jnp.float32)
        b = jnp.linalg.qr(q)[0].astype(basis_dtype)
      elif p.kind == "temporal":
        dt = ema_dtype or leaf.dtype
        s = jnp.zeros_like(leaf, dtype=dt)   # keeps the leaf's sharding
        if num_scales == 3:
          f = jnp.zeros_like(leaf, dtype=dt)
      basis.append(b)
      slow.append(s)
      fast.append(f)
    unflat = lambda xs: jax.tree_util.tree_unflatten(treedef, xs)
    return DecomposeState(
        count=jnp.zeros([], jnp.int32), basis=unflat(basis), slow=unflat(slow),
        fast=unflat(fast))

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    v.real_float_leaves("decompose", updates, "updates")
    leaves, plans, treedef = plans_of(updates)
    bases = treedef.flatten_up_to(state.basis)
    slows = treedef.flatten_up_to(state.slow)
    fasts = treedef.flatten_up_to(state.fast)
    count = state.count

    # 1. Refresh the low-rank bases: all leaves under one conditional, or,
    #    with `stagger`, one group of leaves per step (all of them at step 0).
    #    Iteration counts are static (unrolled), so a branch is straight-line
    #    code; with refresh_every = 1 and init_power_iters = power_iters no
    #    conditional is needed at all (on GPU a conditional's predicate is
    #    copied to the host, which stalls back-to-back dispatch).
    lr = [i for i, p in enumerate(plans) if p.kind == "lowrank"]
    if lr:
      mats = [plans[i].view.to_matrix(leaves[i]) for i in lr]

      def refresh_some(which, iters):
        def fn(qs):
          # Leaves of one shape (the layers of a transformer) share their
          # QRs: one batched QR per shape instead of one per leaf.
          groups: dict[Any, list[int]] = {}
          for j in sorted(which):
            p = plans[lr[j]]
            key = (mats[j].shape[1:], mats[j].dtype, qs[j].shape[1:],
                   qs[j].dtype, p.left, p.rank)
            groups.setdefault(key, []).append(j)
          out = list(qs)
          for js in groups.values():
            p = plans[lr[js[0]]]
            new = _refresh([mats[j] for j in js], [qs[j] for j in js], iters,
                           p.rank, left=p.left, rotate=num_scales == 3)
            for j, q in zip(js, new, strict=True):
              out[j] = q
          return out
        return fn

      qs = [bases[i] for i in lr]
      all_leaves = set(range(len(lr)))
      first = refresh_some(all_leaves, init_power_iters)
      if refresh_every == 1 and init_power_iters == power_iters:
        new_qs = first(qs)
      elif stagger and refresh_every > 1:
        groups = _balanced_groups([plans[i] for i in lr], refresh_every)
        branches = [first] + [refresh_some(g, power_iters) for g in groups]
        new_qs = jax.lax.switch(
            jnp.where(count == 0, 0, 1 + count % refresh_every), branches, qs)
      else:
        branches = [first, refresh_some(all_leaves, power_iters),
                    lambda qs: qs]
        index = jnp.where(count == 0, 0,
                          jnp.where(count % refresh_every == 0, 1, 2))
        new_qs = jax.lax.switch(index, branches, qs)
      bases = list(bases)
      for i, q in zip(lr, new_qs, strict=True):
        bases[i] = q

    # 2. Split.
    bc = numerics.safe_increment(count)
    out, new_slow, new_fast = [], list(slows), list(fasts)
    for i, (g, p) in enumerate(zip(leaves, plans, strict=True)):
      if p.kind == "whole":
        out.append(whole(g, p.scale))
      elif p.kind == "lowrank":
        out.append(_lowrank_split(g, bases[i], p))
      elif p.kind == "mean":
        out.append(_mean_split(g, p.view, num_scales))
      else:
        ok = jnp.isfinite(g)
        s = _ema(slows[i], g, slow_decay, ok)
        new_slow[i] = s
        s_hat = optax.tree.bias_correction(s, slow_decay, bc)
        if num_scales == 3:
          f = _ema(fasts[i], g, fast_decay, ok)
          new_fast[i] = f
          f_hat = optax.tree.bias_correction(f, fast_decay, bc)
          out.append(Scales(local=(g - f_hat).astype(g.dtype),
                            intermediate=(f_hat - s_hat).astype(g.dtype),
                            global_=s_hat.astype(g.dtype)))
        else:
          out.append(Scales(local=(g - s_hat).astype(g.dtype),
                            global_=s_hat.astype(g.dtype)))

    unflat = lambda xs: jax.tree_util.tree_unflatten(treedef, xs)
    return unflat(out), DecomposeState(
        count=numerics.safe_increment(count), basis=unflat(bases),
        slow=unflat(new_slow), fast=unflat(new_fast))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _balanced_groups(plans: list[_Plan], n: int) -> list[set[int]]:
  """Splits leaves into ``n`` groups of about equal refresh cost (LPT rule)."""
  cost = [p.view.batch * p.view.m * p.view.n * p.k for p in plans]
  groups: list[set[int]] = [set() for _ in range(n)]
  load = [0] * n
  for j in sorted(range(len(plans)), key=lambda j: -cost[j]):
    g = min(range(n), key=lambda g: load[g])
    groups[g].add(j)
    load[g] += cost[j]
  return groups


def _ema(m: jax.Array, g: jax.Array, decay: Any, ok: jax.Array) -> jax.Array:
  new = (decay * m + (1 - decay) * g.astype(m.dtype)).astype(m.dtype)
  # `ok` (the gradient entry is finite) is not enough when the EMA's dtype is
  # narrower than the gradient's (float16): a finite entry may overflow it.
  return jnp.where(ok & jnp.isfinite(new), new, m)


def _compute_dtype(g: jax.Array, q: jax.Array) -> Any:
  return jnp.promote_types(jnp.promote_types(g.dtype, q.dtype), jnp.float32)


def _refresh(gs: list[jax.Array], q0s: list[jax.Array], iters: int,
             rank: int, *, left: bool, rotate: bool) -> list[jax.Array]:
  """Warm-started subspace iteration on leaves of one shape.

  For each ``g`` ``[batch, m, n]`` of ``gs``: ``Q <- qr(G Gᵀ Q)`` for a
  basis on the fan-in side (``left``), else ``Q <- qr(Gᵀ G Q)``; ``g`` is
  never transposed in memory. The matmuls run per leaf (no copy of a
  gradient); the QRs of all leaves run as one batched QR (not on the CPU,
  see :func:`_qr_all`).

  A leaf whose gradient is all zero or not finite keeps its basis: ``G Gᵀ
  Q`` is then zero or not finite, and so is checked on that small product
  rather than on the gradient (which would cost one more pass over it).
  """
  dt = _compute_dtype(gs[0], q0s[0])
  gs = [g.astype(dt) for g in gs]
  q0s_dt = [q.astype(dt) for q in q0s]
  sizes = [g.shape[0] for g in gs]
  coef = _coef_fn(left)
  qs, nonzero = q0s_dt, None
  for _ in range(iters):   # static: unrolled, no device-side loop
    gqs = []
    for g, q in zip(gs, qs, strict=True):
      c = coef(g, q)                                 # Qᵀ G or G Q
      gqs.append(_einsum("bmn,bkn->bmk", g, c) if left
                 else _einsum("bmn,bmk->bnk", g, c))
    if nonzero is None:
      nonzero = [jnp.any(gq != 0, axis=(-2, -1)) for gq in gqs]
    qs = _qr_all(gqs, sizes)
  out = []
  for g, q0, q, q_orig, nz in zip(gs, q0s_dt, qs, q0s, nonzero, strict=True):
    if rotate and q.shape[-1] > rank:
      c = coef(g, q)
      gram = (_einsum("bkn,bjn->bkj", c, c) if left
              else _einsum("bmk,bmj->bkj", c, c))
      _, vecs = jnp.linalg.eigh(gram)
      q = q @ vecs[..., ::-1]                        # descending order
    ok = nz & jnp.all(jnp.isfinite(q), axis=(-2, -1))
    out.append(jnp.where(ok[:, None, None], q, q0).astype(q_orig.dtype))
  return out


def _qr_all(xs: list[jax.Array], sizes: list[int]) -> list[jax.Array]:
  """The Q factors of ``xs`` (``[batch, m, k]`` each, one shape): one
  batched QR on accelerators; one QR per array on the CPU, where XLA's
  runtime was seen to hang when several batched LAPACK QRs run in one
  program (jax 0.10, 2 cores)."""
  if len(xs) == 1:
    return [jnp.linalg.qr(xs[0])[0]]

  def batched(*xs):
    q = jnp.linalg.qr(jnp.concatenate(xs, axis=0))[0]
    return tuple(jnp.split(q, list(itertools.accumulate(sizes[:-1])), axis=0))

  def one_by_one(*xs):
    return tuple(jnp.linalg.qr(x)[0] for x in xs)

  return list(jax.lax.platform_dependent(*xs, cpu=one_by_one,
                                         default=batched))


def _explicit_spec(x: jax.Array) -> tuple[Any, ...] | None:
  """The partition spec of ``x`` under explicit sharding, else ``None``."""
  spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
  if spec is None or all(a is None for a in spec):
    return None
  return tuple(spec) + (None,) * (x.ndim - len(spec))


def _einsum(subscripts: str, *operands: jax.Array) -> jax.Array:
  """`jnp.einsum`, with the output sharding spelled out under explicit sharding.

  A contraction over a sharded axis is ambiguous in JAX's explicit-sharding
  mode; the output keeps, for each of its axes, the sharding that axis has in
  the operands (contracted axes are summed across devices).
  """
  specs = [_explicit_spec(x) for x in operands]
  if all(sp is None for sp in specs):
    return jnp.einsum(subscripts, *operands)
  inputs, output = subscripts.split("->")
  by_letter: dict[str, Any] = {}
  for term, sp in zip(inputs.split(","), specs, strict=True):
    for letter, axis in zip(term, sp or (None,) * len(term), strict=True):
      if by_letter.get(letter) is None:
        by_letter[letter] = axis
  out = jax.sharding.PartitionSpec(*(by_letter.get(ch) for ch in output))
  return jnp.einsum(subscripts, *operands, out_sharding=out)


def _coef_fn(left: bool):
  if left:   # Q [b, m, k]: coefficients Qᵀ G [b, k, n]
    return lambda g, q: _einsum("bmk,bmn->bkn", q, g)
  return lambda g, q: _einsum("bmn,bnk->bmk", g, q)   # Q [b, n, k]: G Q


def _project(q: jax.Array, c: jax.Array, left: bool) -> jax.Array:
  if left:
    return _einsum("bmk,bkn->bmn", q, c)
  return _einsum("bmk,bnk->bmn", c, q)


def _lowrank_split(g: jax.Array, q: jax.Array, p: _Plan) -> Scales:
  gm = p.view.to_matrix(g)
  dt = _compute_dtype(g, q)
  q = q.astype(dt)
  gc = gm.astype(dt)
  c = _coef_fn(p.left)(gc, q)
  r = p.rank
  if p.left:
    glob = _project(q[..., :r], c[:, :r], True)
    inter = _project(q[..., r:], c[:, r:], True) if p.k > r else None
  else:
    glob = _project(q[..., :r], c[..., :r], False)
    inter = _project(q[..., r:], c[..., r:], False) if p.k > r else None
  local = gc - glob if inter is None else gc - glob - inter

  def back(x):
    return p.view.from_matrix(x).astype(g.dtype)

  return Scales(local=back(local),
                intermediate=None if inter is None else back(inter),
                global_=back(glob))


def _mean_split(g: jax.Array, view: MatrixView | None, num_scales: int) -> Scales:
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
