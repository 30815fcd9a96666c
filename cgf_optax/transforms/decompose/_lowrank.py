"""The ``"lowrank"`` strategy: a tracked top singular subspace and its
refresh schedule.

Each low-rank leaf keeps an orthonormal basis ``Q`` ``[batch, s, k]`` on the
smaller side ``s`` of its matrix, refreshed every ``refresh_every`` steps by
warm-started subspace iteration (all leaves at once, or with ``stagger`` one
group of leaves per step); the gradient is split by projecting onto it.
"""

from __future__ import annotations

import itertools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from cgf_optax.transforms._einsum import einsum
from cgf_optax.transforms._scales import Scales
from cgf_optax.transforms.decompose._rules import Plan

# Largest power_iters / init_power_iters (unrolled in the compiled step).
MAX_POWER_ITERS = 64


class Schedule(NamedTuple):
  """When and how hard the bases are refreshed (all static)."""

  refresh_every: int
  power_iters: int
  init_power_iters: int
  stagger: bool
  rotate: bool          # three scales: order the basis by singular value


def init_basis(key: jax.Array, plan: Plan, dtype: Any) -> jax.Array:
  """A random orthonormal ``[batch, s, k]`` basis for one leaf."""
  view = plan.view
  q = jax.random.normal(key, (view.batch, min(view.m, view.n), plan.k),
                        jnp.float32)
  return jnp.linalg.qr(q)[0].astype(dtype)


def refresh_bases(mats: list[jax.Array], qs: list[jax.Array],
                  plans: list[Plan], count: jax.Array,
                  schedule: Schedule) -> list[jax.Array]:
  """The bases after step ``count``'s refresh, if any.

  All leaves under one conditional, or, with ``stagger``, one group of
  leaves per step (all of them at step 0). Iteration counts are static
  (unrolled), so a branch is straight-line code; with ``refresh_every = 1``
  and ``init_power_iters = power_iters`` no conditional is needed at all (on
  GPU a conditional's predicate is copied to the host, which stalls
  back-to-back dispatch).
  """
  every = schedule.refresh_every

  def refresh_some(which: set[int], iters: int):
    def fn(qs):
      # Leaves of one shape (the layers of a transformer) share their QRs:
      # one batched QR per shape instead of one per leaf.
      groups: dict[Any, list[int]] = {}
      for j in sorted(which):
        key = (mats[j].shape[1:], mats[j].dtype, qs[j].shape[1:],
               qs[j].dtype, plans[j].left, plans[j].rank)
        groups.setdefault(key, []).append(j)
      out = list(qs)
      for js in groups.values():
        p = plans[js[0]]
        new = _refresh([mats[j] for j in js], [qs[j] for j in js], iters,
                       p.rank, left=p.left, rotate=schedule.rotate)
        for j, q in zip(js, new, strict=True):
          out[j] = q
      return out
    return fn

  all_leaves = set(range(len(plans)))
  first = refresh_some(all_leaves, schedule.init_power_iters)
  if every == 1 and schedule.init_power_iters == schedule.power_iters:
    return first(qs)
  if schedule.stagger and every > 1:
    branches = [first] + [refresh_some(g, schedule.power_iters)
                          for g in balanced_groups(plans, every)]
    return jax.lax.switch(jnp.where(count == 0, 0, 1 + count % every),
                          branches, qs)
  branches = [first, refresh_some(all_leaves, schedule.power_iters),
              lambda qs: qs]
  index = jnp.where(count == 0, 0, jnp.where(count % every == 0, 1, 2))
  return jax.lax.switch(index, branches, qs)


def balanced_groups(plans: list[Plan], n: int) -> list[set[int]]:
  """Splits leaves into ``n`` groups of about equal refresh cost (LPT rule)."""
  cost = [p.view.batch * p.view.m * p.view.n * p.k for p in plans]
  groups: list[set[int]] = [set() for _ in range(n)]
  load = [0] * n
  for j in sorted(range(len(plans)), key=lambda j: -cost[j]):
    g = min(range(n), key=lambda g: load[g])
    groups[g].add(j)
    load[g] += cost[j]
  return groups


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
      gqs.append(einsum("bmn,bkn->bmk", g, c) if left
                 else einsum("bmn,bmk->bnk", g, c))
    if nonzero is None:
      nonzero = [jnp.any(gq != 0, axis=(-2, -1)) for gq in gqs]
    qs = _qr_all(gqs, sizes)
  out = []
  for g, q0, q, q_orig, nz in zip(gs, q0s_dt, qs, q0s, nonzero, strict=True):
    if rotate and q.shape[-1] > rank:
      c = coef(g, q)
      gram = (einsum("bkn,bjn->bkj", c, c) if left
              else einsum("bmk,bmj->bkj", c, c))
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


def _coef_fn(left: bool):
  if left:   # Q [b, m, k]: coefficients Qᵀ G [b, k, n]
    return lambda g, q: einsum("bmk,bmn->bkn", q, g)
  return lambda g, q: einsum("bmn,bnk->bmk", g, q)   # Q [b, n, k]: G Q


def _project(q: jax.Array, c: jax.Array, left: bool) -> jax.Array:
  if left:
    return einsum("bmk,bkn->bmn", q, c)
  return einsum("bmk,bnk->bmn", c, q)


def split(g: jax.Array, q: jax.Array, p: Plan) -> Scales:
  """``g`` split by its basis ``q``: global band, intermediate band, rest."""
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
