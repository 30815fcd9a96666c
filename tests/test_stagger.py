"""`decompose(stagger=True)`: the low-rank refreshes are spread over the period.

Every leaf is still refreshed exactly once per `refresh_every` steps (and all
of them at step 0), each step refreshes only its group, the groups balance
the refresh cost, and the parts still sum to the gradient.
"""

import jax
import numpy as np
import pytest

import cgf_optax
from cgf_optax.transforms._leaves import MatrixAxes, MatrixView
from cgf_optax.transforms.decompose._lowrank import balanced_groups as _balanced_groups
from cgf_optax.transforms.decompose._rules import Plan as _Plan

R = 3


def _tree():
  shapes = {"a": (12, 6), "b": (6, 12), "c": (8, 8), "d": (2, 6, 5),
            "e": (10, 4), "bias": (6,)}
  keys = jax.random.split(jax.random.key(0), len(shapes))
  return {k: jax.random.normal(kk, s) for (k, s), kk in zip(
      shapes.items(), keys, strict=True)}


def _grads(t):
  # A different gradient every step, so a refresh always moves the basis.
  return jax.tree.map(
      lambda x: jax.random.normal(jax.random.key(100 + t), x.shape), _tree())


def _refreshed_at(tx, steps):
  """For each step, the set of leaves whose basis changed at that step."""
  state = tx.init(_tree())
  upd = jax.jit(tx.update)
  out = []
  for t in range(steps):
    g = _grads(t)
    parts, new = upd(g, state)
    changed = {k for k in ("a", "b", "c", "d", "e")
               if not np.array_equal(np.asarray(new.basis[k]),
                                     np.asarray(state.basis[k]))}
    out.append(changed)
    total = jax.tree.map(lambda s: s.total(), parts,
                         is_leaf=lambda x: isinstance(x, cgf_optax.Scales))
    for k in g:
      np.testing.assert_allclose(total[k], g[k], rtol=1e-5, atol=1e-5)
    state = new
  return out


def test_staggered_refresh_covers_every_leaf_once_per_period():
  seen = _refreshed_at(cgf_optax.decompose(rank=2, refresh_every=R,
                                           stagger=True), 1 + 3 * R)
  assert seen[0] == {"a", "b", "c", "d", "e"}        # step 0: all, from random
  for start in range(R, 1 + 2 * R, R):               # whole periods after it
    period = seen[start:start + R]
    flat = [k for s in period for k in s]
    assert sorted(flat) == ["a", "b", "c", "d", "e"], period
  # No step after the first refreshes everything at once.
  assert all(len(s) < 5 for s in seen[1:])


def test_unstaggered_refreshes_all_leaves_together():
  seen = _refreshed_at(cgf_optax.decompose(rank=2, refresh_every=R), 2 * R)
  assert seen == [({"a", "b", "c", "d", "e"} if t % R == 0 else set())
                  for t in range(2 * R)]


def test_groups_balance_the_refresh_cost():
  sizes = [(64, 64), (64, 256), (256, 64), (32, 32), (128, 128), (16, 512)]
  plans = [_Plan("lowrank", view=MatrixView.create(s, MatrixAxes()), rank=4,
                 k=4) for s in sizes]
  groups = _balanced_groups(plans, 3)
  assert sorted(j for g in groups for j in g) == list(range(len(sizes)))
  cost = [sum(sizes[j][0] * sizes[j][1] for j in g) for g in groups]
  # LPT bound: no group above 4/3 of the ideal share plus the largest job.
  assert max(cost) <= sum(cost) / 3 + max(m * n for m, n in sizes)


@pytest.mark.parametrize("bad", [1, "yes", None])
def test_stagger_must_be_bool(bad):
  with pytest.raises(ValueError, match="stagger"):
    cgf_optax.decompose(stagger=bad)
