"""Issue 18, item 1: a fresh CEGM state holds no NaN.

`EntangleState` says "no loss yet" with the flag `has_loss`, not with a NaN
`prev_loss`, so `init` of every CEGM chain runs under `jax_debug_nans` (jitted
or not) and every state leaf is finite from the start (Optax's own state
check, `alias_test.test_scalers`). A checkpoint of the old layout (no
`has_loss`) is refused by `RunCheckpointer` with a message that says so.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cgf_optax
from cgf_optax.train.checkpoint import CheckpointError, RunCheckpointer

PARAMS = {"dense": {"bias": jnp.ones((3,)), "kernel": jnp.ones((4, 3))},
          "w": jnp.ones((4, 3))}

FACTORIES = {
    "entangle": lambda: cgf_optax.entangle(0.8, 0.2),
    "cegm": lambda: cgf_optax.cegm(1e-3, require_context=False),
    "cegm-adapt": lambda: cgf_optax.cegm(1e-3, adapt_rate=0.1, num_heads=2,
                                         require_context=False),
    "cegm_adamw": lambda: cgf_optax.cegm_adamw(1e-3, adapt_rate=0.1,
                                               require_context=False),
}


def _all_finite(tree: Any) -> list[str]:
  """Paths of the floating-point leaves of ``tree`` that are not finite."""
  return [jax.tree_util.keystr(p) for p, x in
          jax.tree_util.tree_flatten_with_path(tree)[0]
          if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)
          and not bool(jnp.all(jnp.isfinite(x)))]


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("name", FACTORIES)
def test_init_runs_under_debug_nans(name, jit):
  """The issue's reproduction: `init` raised FloatingPointError."""
  tx = FACTORIES[name]()
  init = jax.jit(tx.init) if jit else tx.init
  with jax.debug_nans(True):
    state = init(PARAMS)
    jax.block_until_ready(state)
  assert _all_finite(state) == []


@pytest.mark.parametrize("name", FACTORIES)
def test_every_state_leaf_is_finite_along_a_run(name):
  """Optax's `test_scalers` state check, at init and after steps with and
  without a loss; the first loss only sets `prev_loss` (λ unchanged)."""
  tx = FACTORIES[name]()
  state = tx.init(PARAMS)
  assert _all_finite(state) == []
  losses = [None, 2.0, None, 1.0, 3.0]
  for i, value in enumerate(losses):
    g = jax.tree.map(lambda x, i=i: x * (i + 1), PARAMS)
    kw = {} if value is None else {"value": jnp.float32(value)}
    before = _entangle_state(state)
    _, state = tx.update(g, state, PARAMS, **kw)
    after = _entangle_state(state)
    assert _all_finite(state) == [], (i, _all_finite(state))
    if i == 1:   # the first loss: remembered, λ not moved
      assert bool(after.has_loss) and float(after.prev_loss) == 2.0
      assert float(after.lam) == float(before.lam)
    if i == 0:
      assert not bool(after.has_loss)


def _entangle_state(state: Any) -> cgf_optax.EntangleState:
  found = [s for s in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, cgf_optax.EntangleState))
           if isinstance(s, cgf_optax.EntangleState)]
  assert len(found) == 1
  return found[0]


def test_a_nan_loss_first_does_not_count_as_a_loss():
  """`has_loss` is set by the first *finite* loss only: after a NaN, then
  2, then 1, λ moved once (by the 2 → 1 change, log 2), as with the old
  NaN."""
  tx = cgf_optax.entangle(0.5, adapt_rate=0.1)
  state = tx.init(PARAMS)
  for value in (jnp.nan, jnp.inf):
    _, state = tx.update(PARAMS, state, value=jnp.float32(value))
    assert not bool(state.has_loss) and float(state.lam) == 0.5
  _, state = tx.update(PARAMS, state, value=jnp.float32(2.0))
  assert bool(state.has_loss) and float(state.lam) == 0.5
  _, state = tx.update(PARAMS, state, value=jnp.float32(1.0))
  np.testing.assert_allclose(float(state.lam), 0.5 + 0.1 * np.log(2.0),
                             rtol=1e-6)


class _OldEntangleState(NamedTuple):
  """`EntangleState` before issue 18: NaN `prev_loss` meant "no loss yet"."""

  count: jax.Array
  lam: jax.Array
  prev: Any
  prev_loss: jax.Array


def _save(directory, opt_state) -> None:
  ckpt = RunCheckpointer(directory, 1, 2)
  ckpt.save(1, {"params": PARAMS, "opt_state": opt_state}, {"run": "x"},
            force=True)
  ckpt.close()


def _restore(directory, opt_state):
  ckpt = RunCheckpointer(directory, 1, 2)
  try:
    return ckpt.restore({"params": PARAMS, "opt_state": opt_state},
                        {"run": "x"})
  finally:
    ckpt.close()


@pytest.mark.parametrize("name", ["cegm-adapt", "cegm_adamw"])
def test_checkpoint_of_the_current_layout_restores(name, tmp_path):
  """The layout check lets a checkpoint of the same optimizer through
  (states with `None` parts, NamedTuples, chains), and the values back."""
  tx = FACTORIES[name]()
  state = tx.init(PARAMS)
  _, state = tx.update(PARAMS, state, PARAMS, value=jnp.float32(1.5))
  _save(tmp_path / "c", state)
  step, restored, _ = _restore(tmp_path / "c", tx.init(PARAMS))
  assert step == 1
  for a, b in zip(jax.tree.leaves(restored["opt_state"]),
                  jax.tree.leaves(state), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert bool(_entangle_state(restored["opt_state"]).has_loss)


def test_checkpoint_of_the_old_layout_is_refused_clearly(tmp_path):
  """A checkpoint written before `has_loss` existed: a `CheckpointError`
  naming the missing array and why, not Orbax's tree-structure dump."""
  tx = FACTORIES["cegm-adapt"]()
  new = tx.init(PARAMS)
  ent = new[0]
  old = (_OldEntangleState(ent.count, ent.lam, ent.prev,
                           jnp.float32(jnp.nan)), *new[1:])
  _save(tmp_path / "c", old)
  with pytest.raises(CheckpointError) as e:
    _restore(tmp_path / "c", new)
  msg = str(e.value)
  assert "opt_state.0.has_loss" in msg, msg
  assert "older cgf_optax" in msg and "issue 18" in msg, msg
  assert "MISSING" not in msg and "\n" not in msg, msg


def test_checkpoint_with_extra_arrays_is_refused(tmp_path):
  """The other direction: the checkpoint has arrays the target lacks."""
  tx = FACTORIES["entangle"]()
  state = tx.init(PARAMS)
  _save(tmp_path / "c", (state, {"extra": jnp.zeros(2)}))
  with pytest.raises(CheckpointError, match=r"checkpoint has 1 array\(s\) "
                     r"this run's state lacks \(opt_state\.1\.extra\)"):
    _restore(tmp_path / "c", (state, {}))
