"""The one non-finite guard (issue 18 item 2): finite gradients never build
a NaN, even eagerly (``jax_debug_nans`` raises on any NaN an operation
produces), in every chain that puts an inner optimizer behind it; a
non-finite step still returns NaN."""

import jax
import jax.numpy as jnp
import pytest

import cgf_optax

CASES = {
    "cgfm_momentum": lambda: cgf_optax.cgfm(1e-3, momentum=0.9),
    "cgfm_adamw": lambda: cgf_optax.cgfm_adamw(1e-3),
    "cgfm_adamw_leaf": lambda: cgf_optax.cgfm_adamw(1e-3, scope="leaf"),
    "cgfm_adamw_unmodulated": lambda: cgf_optax.cgfm_adamw(1e-3, modulate=False),
    "cegm_adamw": lambda: cgf_optax.cegm_adamw(1e-3, require_context=False),
}


@pytest.mark.parametrize("make", CASES.values(), ids=CASES.keys())
def test_eager_finite_step_builds_no_nan(make):
  params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
  with jax.debug_nans(True):
    tx = make()
    state = tx.init(params)
    for _ in range(2):
      updates, state = tx.update(params, state, params, value=jnp.float32(1.0))
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


@pytest.mark.nonfinite_inputs
def test_non_finite_step_still_returns_nan():
  params = {"w": jnp.ones((4, 3))}
  tx = cgf_optax.cgfm_adamw(1e-3)
  bad = {"w": params["w"].at[0, 0].set(jnp.inf)}
  updates, _ = tx.update(bad, tx.init(params), params)
  assert bool(jnp.all(jnp.isnan(updates["w"])))
