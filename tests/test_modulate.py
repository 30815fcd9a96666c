"""`cgf_optax.modulate_by_gradient_norm` (and `modulate_step`) against the
NumPy reference, and the factor's properties."""

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cgf_optax
from cgf_optax import Scales

# Norms are float32 in the package: the factor is exact to a few ulps.
TOL = dict(rtol=1e-5, atol=1e-6)
SHAPES = {"dense/kernel": (3, 4), "dense/bias": (4,), "stack": (2, 3, 2),
          "scale": ()}
# Per-step multipliers of the gradient: the first step is all zero (the
# reference must then wait for the first non-zero norm), later ones vary by
# two orders of magnitude.
MAGNITUDES = [0.0, 1.0, 3.0, 0.2, 10.0, 0.05, 1.5, 6.0]


def gradient_sequence(seed):
  rng = np.random.default_rng(seed)
  seq = []
  for k, mag in enumerate(MAGNITUDES):
    flat = {p: ref.f32(mag * rng.standard_normal(s)) for p, s in SHAPES.items()}
    if k == 3:                               # a leaf that is zero at one step
      flat["dense/bias"] = np.zeros(4)
    seq.append(flat)
  return seq


def to_jax(flat):
  return ref.unflatten({p: jnp.asarray(x, jnp.float32) for p, x in flat.items()})


CONFIGS = [(reference, scope, max_factor) for reference in ("first", "ema")
           for scope in ("global", "leaf") for max_factor in (None, 2.5)]


@pytest.mark.parametrize("reference,scope,max_factor", CONFIGS)
def test_matches_reference(reference, scope, max_factor):
  kw = dict(reference=reference, max_factor=max_factor, scope=scope,
            ema_decay=0.9)
  tx = cgf_optax.modulate_by_gradient_norm(**kw)
  rtx = ref.ModulateRef(**kw)
  seq = gradient_sequence(CONFIGS.index((reference, scope, max_factor)))
  state = tx.init(to_jax(seq[0]))
  update = jax.jit(tx.update)
  for step, g in enumerate(seq):
    out, state = update(to_jax(g), state)
    want = rtx.update(g)
    got = ref.as_flat(out)
    for path in want:
      np.testing.assert_allclose(got[path], want[path], err_msg=f"{step} {path}",
                                 **TOL)
    factors = ref.as_flat(state.factor) if scope == "leaf" else {
        "": np.asarray(state.factor)}
    want_f = rtx.factor if scope == "leaf" else {"": rtx.factor}
    for key in want_f:
      np.testing.assert_allclose(factors[key], want_f[key], **TOL)
      if max_factor is not None:
        assert factors[key] <= max_factor * (1 + 1e-7)
      assert factors[key] >= 1.0
    assert int(state.count) == step + 1
  # "first": the reference is the first non-zero norm (step 1, not step 0).
  if reference == "first" and scope == "global":
    norm1 = np.sqrt(sum(np.sum(x ** 2) for x in seq[1].values()))
    np.testing.assert_allclose(state.reference, norm1, **TOL)


def test_factor_is_one_until_a_non_zero_gradient():
  tx = cgf_optax.modulate_by_gradient_norm()
  g0 = {"w": jnp.zeros(3)}
  state = tx.init(g0)
  out, state = tx.update(g0, state)
  assert float(state.factor) == 1.0 and float(state.reference) == 0.0
  out, state = tx.update({"w": jnp.array([3.0, 4.0, 0.0])}, state)
  np.testing.assert_allclose(state.factor, 2.0)       # 1 + 5 / 5
  np.testing.assert_allclose(out["w"], [6.0, 8.0, 0.0])
  out, state = tx.update({"w": jnp.array([0.0, 0.0, 10.0])}, state)
  np.testing.assert_allclose(state.factor, 3.0)       # 1 + 10 / 5


def test_ema_reference_of_a_constant_norm_gives_two():
  """The bias-corrected EMA of a constant norm is that norm: factor 1 + 1."""
  tx = cgf_optax.modulate_by_gradient_norm(reference="ema", ema_decay=0.9)
  g = {"w": jnp.array([1.0, -2.0, 2.0])}
  state = tx.init(g)
  update = jax.jit(tx.update)
  for _ in range(5):
    out, state = update(g, state)
    np.testing.assert_allclose(state.factor, 2.0, **TOL)
    np.testing.assert_allclose(out["w"], 2.0 * g["w"], **TOL)


def test_non_finite_norm_leaves_the_reference_alone():
  tx = cgf_optax.modulate_by_gradient_norm()
  state = tx.init({"w": jnp.zeros(2)})
  _, state = tx.update({"w": jnp.array([3.0, 4.0])}, state)
  out, state = tx.update({"w": jnp.array([jnp.nan, 1.0])}, state)
  assert float(state.factor) == 1.0 and float(state.reference) == 5.0
  assert np.isnan(out["w"][0])                       # passed through
  _, state = tx.update({"w": jnp.array([0.0, 10.0])}, state)
  np.testing.assert_allclose(state.factor, 3.0)


def test_leaf_scope_over_scales():
  """Before `scale_by_scales`, a leaf's norm is the norm of all its parts."""
  tx = cgf_optax.modulate_by_gradient_norm(scope="leaf")
  tree = {"a": Scales(local=jnp.array([3.0, 0.0]), global_=jnp.array([0.0, 4.0])),
          "b": jnp.array([1.0, 0.0])}
  state = tx.init(tree)
  _, state = tx.update(tree, state)
  np.testing.assert_allclose(state.reference["a"], 5.0)
  np.testing.assert_allclose(state.reference["b"], 1.0)
  tree2 = {"a": Scales(local=jnp.array([0.0, 0.0]),
                       global_=jnp.array([0.0, 10.0])),
           "b": jnp.array([0.0, 1.0])}
  out, state = tx.update(tree2, state)
  np.testing.assert_allclose(state.factor["a"], 3.0)
  np.testing.assert_allclose(state.factor["b"], 2.0)
  np.testing.assert_allclose(out["a"].global_, [0.0, 30.0])
  want = ref.ModulateRef(scope="leaf")
  want.update(ref.as_flat(tree))
  want.update(ref.as_flat(tree2))
  assert want.factor == {"a": 3.0, "b": 2.0}


@pytest.mark.parametrize("scope", ["global", "leaf"])
def test_modulate_step_applies_the_input_factor_to_the_output(scope):
  """sign(g) * (1 + ‖g‖/‖g₀‖): the factor is the input's, the step the inner's."""
  tx = cgf_optax.modulate_step(optax.scale_by_sign(), scope=scope,
                               max_factor=3.5)
  rtx = ref.ModulateRef(scope=scope, max_factor=3.5)
  update = jax.jit(tx.update)
  seq = gradient_sequence(11)
  state = tx.init(to_jax(seq[0]))
  for step, g in enumerate(seq):
    out, state = update(to_jax(g), state)
    fs = rtx.factors(g)
    got = ref.as_flat(out)
    for path, x in g.items():
      np.testing.assert_allclose(got[path], np.sign(x) * fs[path],
                                 err_msg=f"{step} {path}", **TOL)


def test_bad_arguments_name_themselves():
  with pytest.raises(ValueError, match="max_factor"):
    cgf_optax.modulate_by_gradient_norm(max_factor=0.5)
  with pytest.raises(ValueError, match="reference"):
    cgf_optax.modulate_by_gradient_norm(reference="last")
  with pytest.raises(ValueError, match="scope"):
    cgf_optax.modulate_by_gradient_norm(scope="layer")


# ----------------------------------------------------------------------------
# Property: factor = 1 + ‖g‖ / ‖g₀‖ over a random sequence, never above
# max_factor.

# Entries are 0 or at least 1e-6 in magnitude: the package squares in float32,
# so a gradient whose entries are all below ~1e-19 has norm 0 there (as in
# optax.global_norm), which is not what this property is about.
FINITE = st.floats(-100, 100, width=32, allow_nan=False,
                   allow_infinity=False).map(lambda x: x if abs(x) > 1e-6 else 0.0)
PROP_SHAPES = {"w": (3, 4), "b": (4,)}
_JITTED = {}


def jitted(max_factor, scope):
  key = (max_factor, scope)
  if key not in _JITTED:
    tx = cgf_optax.modulate_by_gradient_norm(max_factor=max_factor, scope=scope)
    _JITTED[key] = (tx, jax.jit(tx.update))
  return _JITTED[key]


@settings(max_examples=25, deadline=None)
@given(data=st.data(), steps=st.integers(1, 6),
       max_factor=st.sampled_from([None, 1.0, 1.5, 4.0]),
       scope=st.sampled_from(["global", "leaf"]))
def test_factor_is_one_plus_norm_ratio(data, steps, max_factor, scope):
  tx, update = jitted(max_factor, scope)
  state = tx.init({p: jnp.zeros(s) for p, s in PROP_SHAPES.items()})
  g0_norm = {}
  for _ in range(steps):
    # Sometimes a whole gradient is zero (then the reference must wait).
    zero = data.draw(st.booleans(), label="zero")
    g = {p: np.zeros(s, np.float32) if zero else
         data.draw(hnp.arrays(np.float32, s, elements=FINITE), label=p)
         for p, s in PROP_SHAPES.items()}
    out, state = update(g, state)
    groups = {"": list(g)} if scope == "global" else {p: [p] for p in g}
    for key, paths in groups.items():
      norm = np.sqrt(sum(np.sum(np.float64(g[p]) ** 2) for p in paths))
      if key not in g0_norm and norm > 0:
        g0_norm[key] = norm
      want = 1.0 + norm / g0_norm[key] if key in g0_norm else 1.0
      if max_factor is not None:
        want = min(want, max_factor)
      got = float(state.factor if scope == "global" else state.factor[key])
      np.testing.assert_allclose(got, want, rtol=1e-5)
      assert 1.0 <= got
      if max_factor is not None:
        assert got <= max_factor
      for p in paths:
        np.testing.assert_allclose(np.float64(out[p]), np.float64(g[p]) * got,
                                   rtol=1e-6, atol=1e-30)
