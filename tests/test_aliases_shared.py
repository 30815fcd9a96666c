"""The aliases' shared arguments: `cgfm_decompose` is the `decompose` step
of `cgfm`/`cgfm_adamw`, the signatures carry every option with its default,
and the renamed epsilons still work, with a DeprecationWarning."""

import inspect
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cgf_optax

KWARGS = [
    {},
    dict(rank=2, refresh_every=1, seed=3),
    dict(strategy="temporal", num_scales=3),
    dict(strategy="mean", num_scales=3, local=0.5, max_factor=3.0),
    dict(rank=2, num_scales=3, intermediate_rank=1, stagger=True,
         refresh_every=2, overrides={"b": "global"}),
]


def _tree(seed):
  rng = np.random.default_rng(seed)
  return {"w": jnp.asarray(rng.standard_normal((6, 4)), jnp.float32),
          "b": jnp.asarray(rng.standard_normal(4), jnp.float32),
          "k": jnp.asarray(rng.standard_normal((2, 3, 5)), jnp.float32)}


def _equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("alias", [cgf_optax.cgfm, cgf_optax.cgfm_adamw])
@pytest.mark.parametrize("kw", KWARGS)
def test_cgfm_decompose_is_the_alias_decompose_step(alias, kw):
  params = _tree(0)
  tx = alias(0.1, **kw)
  dec = cgf_optax.cgfm_decompose(learning_rate=0.1, weight_decay=0.3, **kw)
  state, dec_state = tx.init(params), dec.init(params)
  _equal(state[0], dec_state)
  for step in range(3):
    g = _tree(step + 1)
    # Telemetry: the Scales the optimizer saw, from its own DecomposeState.
    seen, _ = dec.update(g, state[0])
    scales, dec_state = dec.update(g, dec_state)
    _equal(seen, scales)
    assert any(isinstance(x, cgf_optax.Scales) for x in jax.tree.leaves(
        seen, is_leaf=lambda x: isinstance(x, cgf_optax.Scales)))
    _, state = tx.update(g, state, params)
    _equal(state[0], dec_state)


def test_signatures_carry_the_shared_defaults():
  for alias in (cgf_optax.cgfm, cgf_optax.cgfm_adamw):
    params = inspect.signature(alias).parameters
    dec = inspect.signature(cgf_optax.decompose).parameters
    for name in ("strategy", "num_scales", "rank", "refresh_every", "seed"):
      assert params[name].default == dec[name].default
    assert params["global_"].default == 0.5
  assert inspect.signature(cgf_optax.cgfm).parameters["max_factor"].default is None
  assert inspect.signature(
      cgf_optax.cgfm_adamw).parameters["max_factor"].default == 2.0
  assert list(inspect.signature(cgf_optax.cegm_adamw).parameters)[:5] == [
      "learning_rate", "b1", "b2", "adam_eps", "weight_decay"]
  with pytest.raises(TypeError, match="cgfm.*bogus"):
    cgf_optax.cgfm(0.1, bogus=1)


@pytest.mark.parametrize("alias, new", [
    (cgf_optax.cegm, "normalize_eps"),
    (cgf_optax.cegm_adamw, "adam_eps"),
    (cgf_optax.cgfm_adamw, "adam_eps"),
])
def test_renamed_eps_still_works_with_a_warning(alias, new):
  extra = {} if alias is cgf_optax.cgfm_adamw else dict(require_context=False)
  params = {"w": jnp.ones((3, 2))}
  with pytest.warns(DeprecationWarning, match=new):
    old = alias(0.1, eps=1e-3, **extra)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    renamed = alias(0.1, **{new: 1e-3}, **extra)
  g = {"w": jnp.full((3, 2), 1e-4)}
  _equal(old.update(g, old.init(params), params)[0],
         renamed.update(g, renamed.init(params), params)[0])
  with pytest.raises(TypeError, match="both"), pytest.warns(DeprecationWarning):
    alias(0.1, eps=1e-3, **{new: 1e-3}, **extra)


def test_positional_adam_arguments():
  a = cgf_optax.cgfm_adamw(0.1, 0.8, 0.99, 1e-6, 0.0)
  b = cgf_optax.cgfm_adamw(0.1, b1=0.8, b2=0.99, adam_eps=1e-6, weight_decay=0.0)
  params = {"w": jnp.ones((3, 2))}
  _equal(a.update(params, a.init(params), params)[0],
         b.update(params, b.init(params), params)[0])
