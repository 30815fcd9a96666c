"""Orbax round trip: a run resumed from a checkpoint equals an uninterrupted one.

For every alias, train k steps, save params and optimizer state with
`orbax.checkpoint.StandardCheckpointer`, restore them into an abstract target
built by `init` (as a fresh process would), train n more steps, and compare
with n + k uninterrupted steps of the same jitted step: bit-exact.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import cgf_optax

ALIASES = {
    **{f"cgfm-{s}": lambda s=s: cgf_optax.cgfm(0.05, strategy=s, rank=2,
                                               refresh_every=3, momentum=0.9)
       for s in ("lowrank", "temporal", "mean")},
    **{f"cgfm_adamw-{s}": lambda s=s: cgf_optax.cgfm_adamw(
        1e-2, strategy=s, num_scales=3, rank=2, refresh_every=3)
       for s in ("lowrank", "temporal", "mean")},
    "cegm": lambda: cgf_optax.cegm(0.05, adapt_rate=0.1, num_heads=2),
    "cegm_adamw": lambda: cgf_optax.cegm_adamw(1e-2, adapt_rate=0.1,
                                               num_heads=2),
}


def _params():
  k = jax.random.split(jax.random.key(0), 3)
  return {"dense": {"kernel": jax.random.normal(k[0], (8, 6)),
                    "bias": jnp.zeros(6)},
          "stack": jax.random.normal(k[1], (2, 4, 5)),
          "scale": jnp.ones(())}


def _loss(p, x):
  h = jnp.tanh(x @ p["dense"]["kernel"] + p["dense"]["bias"])
  return jnp.mean(h ** 2) + jnp.mean(p["stack"] ** 2) * p["scale"] ** 2


def _make_step(tx):
  @jax.jit
  def step(params, state, x):
    loss, g = jax.value_and_grad(_loss)(params, x)
    extra = {"value": loss, "context": {"dense/kernel": x}}
    updates, state = tx.update(g, state, params, **extra)
    return optax.apply_updates(params, updates), state, loss
  return step


def _batches(n):
  return [jax.random.normal(jax.random.key(10 + i), (4, 8)) for i in range(n)]


@pytest.mark.parametrize("name", sorted(ALIASES))
def test_resume_from_orbax_checkpoint_is_exact(name, tmp_path):
  tx = ALIASES[name]()
  step = _make_step(tx)
  xs = _batches(7)
  k = 4   # past a low-rank refresh (refresh_every=3), with one pending

  params, state = _params(), tx.init(_params())
  losses = []
  for x in xs:
    params, state, loss = step(params, state, x)
    losses.append(float(loss))
  ref_params, ref_losses = params, losses

  params, state = _params(), tx.init(_params())
  losses = []
  for x in xs[:k]:
    params, state, loss = step(params, state, x)
    losses.append(float(loss))
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "step", {"params": params, "opt_state": state})
  ckpt.wait_until_finished()
  del params, state

  # A fresh process knows only the model and the optimizer: its target is
  # the abstract shape of a freshly initialised state.
  fresh = {"params": _params(), "opt_state": tx.init(_params())}
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, fresh)
  restored = ckpt.restore(tmp_path / "step", target)
  params, state = restored["params"], restored["opt_state"]
  assert jax.tree.structure(state) == jax.tree.structure(fresh["opt_state"])
  for x in xs[k:]:
    params, state, loss = step(params, state, x)
    losses.append(float(loss))

  assert losses == ref_losses
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params),
                  strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
