"""Bad input to the CEGM transforms: clear errors naming the argument or path.

Hyper-parameters are checked when the factory is called; extra arguments
(`context`, `value`) when `update` is traced, naming the parameter path.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cgf_optax

PARAMS = {"attn": {"kernel": jnp.zeros((6, 2, 3))},
          "dense": {"bias": jnp.zeros(3), "kernel": jnp.zeros((6, 3))}}
GRADS = jax.tree.map(jnp.ones_like, PARAMS)


def _ctx(**shapes):
  return {k.replace("__", "/"): jnp.ones(s) for k, s in shapes.items()}


def _update(tx, **extra):
  return tx.update(GRADS, tx.init(PARAMS), PARAMS, **extra)


# --------------------------------------------------------------------------
# context.


@pytest.mark.parametrize("make", [
    lambda: cgf_optax.context_align(),
    lambda: cgf_optax.cegm(0.1),
    lambda: cgf_optax.cegm_adamw(1e-3),
], ids=["context_align", "cegm", "cegm_adamw"])
def test_missing_context_raises(make):
  tx = make()
  with pytest.raises(ValueError, match="`context`"):
    _update(tx, value=1.0)
  with pytest.raises(ValueError, match="`context`"):
    jax.jit(lambda g, s: tx.update(g, s, PARAMS))(GRADS, tx.init(PARAMS))


def test_missing_context_allowed_with_require_context_false():
  tx = cgf_optax.cegm(0.1, require_context=False)
  updates, _ = _update(tx)
  assert jax.tree.structure(updates) == jax.tree.structure(GRADS)


def test_context_with_wrong_feature_size_names_path_and_shapes():
  tx = cgf_optax.context_align()
  with pytest.raises(ValueError) as info:
    _update(tx, context=_ctx(dense__kernel=(4, 5)))
  msg = str(info.value)
  assert "dense/kernel" in msg
  assert "(4, 5)" in msg and "(6, 3)" in msg
  # Through the alias, and under jit, the same.
  tx = cgf_optax.cegm(0.1)
  with pytest.raises(ValueError, match=re.escape("attn/kernel")) as info:
    jax.jit(lambda c: _update(tx, context=c))(_ctx(attn__kernel=(2, 4, 3)))
  assert "(2, 4, 3)" in str(info.value) and "(6, 2, 3)" in str(info.value)


def test_num_heads_not_dividing_fan_in_names_num_heads_and_path():
  tx = cgf_optax.context_align(num_heads=4)          # fan-in 6
  with pytest.raises(ValueError) as info:
    _update(tx, context=_ctx(dense__kernel=(5, 6)))
  msg = str(info.value)
  assert "num_heads" in msg and "dense/kernel" in msg


def test_context_for_unknown_path_raises():
  tx = cgf_optax.context_align()
  with pytest.raises(ValueError, match="not/a/param"):
    _update(tx, context=_ctx(not__a__param=(5, 6)))
  # A path that is a parameter but not a kernel (1-D): an error too.
  with pytest.raises(ValueError, match="dense/bias"):
    _update(tx, context=_ctx(dense__bias=(5, 3)))


def test_context_not_a_mapping_raises():
  tx = cgf_optax.context_align()
  with pytest.raises(ValueError, match="`context`"):
    _update(tx, context=[jnp.ones((5, 6))])


def test_scalar_context_raises():
  tx = cgf_optax.context_align()
  with pytest.raises(ValueError, match="dense/kernel"):
    _update(tx, context={"dense/kernel": jnp.float32(1.0)})


# --------------------------------------------------------------------------
# value.


@pytest.mark.parametrize("make", [
    lambda: cgf_optax.entangle(),
    lambda: cgf_optax.cegm(0.1, require_context=False),
    lambda: cgf_optax.cegm_adamw(1e-3, require_context=False),
], ids=["entangle", "cegm", "cegm_adamw"])
@pytest.mark.parametrize("value", [jnp.ones(2), np.ones((1, 1)), [1.0, 2.0]],
                         ids=["vector", "matrix", "list"])
def test_non_scalar_value_raises(make, value):
  tx = make()
  with pytest.raises(ValueError, match="`value`"):
    _update(tx, value=value)


# --------------------------------------------------------------------------
# Hyper-parameters.

BAD_ENTANGLE = [
    (dict(lam=1.5), "lam"),
    (dict(lam=-0.1), "lam"),
    (dict(lam=float("nan")), "lam"),
    (dict(lam=0.01), "lam"),                    # outside the default bounds
    (dict(lam=0.5, lam_bounds=(0.6, 0.9)), "lam"),
    (dict(lam_bounds=(0.9, 0.1)), "lam_bounds"),
    (dict(lam_bounds=(-0.1, 1.0)), "lam_bounds"),
    (dict(lam_bounds=(0.1, 1.5)), "lam_bounds"),
    (dict(lam_bounds=(0.1, 0.5, 0.9)), "lam_bounds"),
    (dict(lam_bounds=0.5), "lam_bounds"),
    (dict(adapt_rate=-1.0), "adapt_rate"),
    (dict(adapt_rate=float("inf")), "adapt_rate"),
    (dict(lam="0.9"), "lam"),
    (dict(lam=None), "lam"),
    (dict(lam=True), "lam"),
    (dict(adapt_rate=[0.1]), "adapt_rate"),
    (dict(lam_bounds=("0", 1.0)), "lam_bounds"),
]
BAD_ALIGN = [
    (dict(num_heads=0), "num_heads"),
    (dict(num_heads=1.5), "num_heads"),
    (dict(num_heads="2"), "num_heads"),
    (dict(num_heads=None), "num_heads"),
    (dict(gamma=-0.5), "gamma"),
    (dict(gamma=float("nan")), "gamma"),
    (dict(gamma="1"), "gamma"),
    (dict(rho=1.0), "rho"),
    (dict(rho=1.5), "rho"),
    (dict(rho=-0.1), "rho"),
    (dict(rho=None), "rho"),
    (dict(eps=-1e-3), "eps"),
    (dict(eps="small"), "eps"),
]
BAD_NORMALIZE = [
    (dict(scope="layer"), "scope"),
    (dict(scope=None), "scope"),
    (dict(eps=-1.0), "eps"),
    (dict(eps=[1e-8]), "eps"),
]


def _check(factory, kwargs, name):
  with pytest.raises(ValueError, match=re.escape(f"`{name}")):
    factory(**kwargs)


@pytest.mark.parametrize("kwargs,name", BAD_ENTANGLE)
def test_entangle_bad_hyperparameters(kwargs, name):
  _check(cgf_optax.entangle, kwargs, name)


@pytest.mark.parametrize("kwargs,name", BAD_ALIGN)
def test_context_align_bad_hyperparameters(kwargs, name):
  _check(cgf_optax.context_align, kwargs, name)


@pytest.mark.parametrize("kwargs,name", BAD_NORMALIZE)
def test_normalize_bad_hyperparameters(kwargs, name):
  _check(cgf_optax.normalize, kwargs, name)


ALIAS_ONLY = [
    (dict(learning_rate="0.1"), "learning_rate"),
    (dict(learning_rate=None), "learning_rate"),
    (dict(normalize_scope="layer"), "normalize_scope"),
]


@pytest.mark.parametrize("alias", [cgf_optax.cegm, cgf_optax.cegm_adamw])
@pytest.mark.parametrize("kwargs,name",
                         BAD_ENTANGLE[:12] + BAD_ALIGN[:11]
                         + ALIAS_ONLY)
def test_alias_bad_hyperparameters(alias, kwargs, name):
  kwargs = {"learning_rate": 0.1, **kwargs}
  _check(alias, kwargs, name)


@pytest.mark.parametrize("kwargs,name", [
    (dict(weight_decay=-1e-4), "weight_decay"),
    (dict(weight_decay="0.1"), "weight_decay"),
])
def test_cegm_adamw_bad_weight_decay(kwargs, name):
  _check(cgf_optax.cegm_adamw, {"learning_rate": 1e-3, **kwargs}, name)


def test_type_errors_are_value_errors_too():
  """Wrong types raise an error that is both a TypeError and a ValueError."""
  with pytest.raises(TypeError, match="`lam`"):
    cgf_optax.entangle(lam="0.9")
  with pytest.raises(TypeError, match="`num_heads`"):
    cgf_optax.context_align(num_heads="2")


def test_good_edge_values_are_accepted():
  cgf_optax.entangle(lam=1.0, lam_bounds=(1.0, 1.0))
  cgf_optax.entangle(lam=0.0, lam_bounds=(0.0, 0.0), adapt_rate=0.0)
  cgf_optax.context_align(num_heads=3, gamma=0.0, rho=0.0, eps=0.0)
  cgf_optax.normalize("global", eps=0.0)
  cgf_optax.cegm(optax.linear_schedule(0.1, 0.0, 10), lam=0.5, num_heads=2)
  cgf_optax.cegm_adamw(1e-3, weight_decay=0.0, normalize_scope=None)
