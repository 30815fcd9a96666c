"""Properties of the CEGM transforms and of the entanglement penalty.

* ``entangle`` with λ = 1 (``lam_bounds=(1, 1)``) is the identity, whatever the
  losses;
* ``context_align`` with γ = 0 is the identity, whatever the contexts;
* ``normalize`` gives unit norm (per leaf and globally) and keeps zero at zero;
* λ stays within ``lam_bounds`` for any loss sequence, NaN and ±inf included,
  and a non-finite loss leaves λ and the last loss unchanged;
* the gradient of ``losses.entanglement_penalty`` (double backprop) matches
  central finite differences.

The transforms run eagerly (hypothesis draws new hyper-parameters for every
example; compiling each would cost more than it tests); shapes are drawn from
a small fixed set so that JAX's per-shape caches are reused.
"""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import cgf_optax

SETTINGS = settings(max_examples=25, deadline=None)

KERNEL_SHAPES = ((4, 3), (4, 2, 2), (6, 2))


def _tree(seed, shapes, dtype=jnp.float32, scale=1.0):
  rng = np.random.default_rng(seed)
  return {f"k{i}": jnp.asarray(scale * rng.standard_normal(s), dtype)
          for i, s in enumerate(shapes)}


any_loss = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from([float("nan"), float("inf"), -float("inf"), 0.0, -0.0,
                     1e-30, -1e30, 3.0e38]),
)


# --------------------------------------------------------------------------
# entangle.


@SETTINGS
@given(
    seed=st.integers(0, 2**16),
    adapt_rate=st.floats(0.0, 10.0),
    values=st.lists(st.one_of(st.none(), any_loss), min_size=1, max_size=5),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    nan_entry=st.booleans(),
)
# A loss of exactly 0 followed by a large one: the relative change overflows
# float32 (|L_{t-1}| is clamped to 1e-12), and 0 * inf must not reach λ.
@example(seed=0, adapt_rate=0.0, values=[0.0, -1e30, 1.0],
         dtype=jnp.float32, nan_entry=False)
def test_entangle_with_lam_one_is_identity(seed, adapt_rate, values, dtype,
                                           nan_entry):
  tx = cgf_optax.entangle(lam=1.0, adapt_rate=adapt_rate, lam_bounds=(1, 1))
  shapes = ((3,), (4, 3), ())
  state = tx.init(_tree(0, shapes, dtype))
  for i, value in enumerate(values):
    grads = _tree(seed + i, shapes, dtype)
    if nan_entry and i == 0:
      grads["k0"] = grads["k0"].at[1].set(jnp.nan)
    kwargs = {} if value is None else {"value": value}
    out, state = tx.update(grads, state, **kwargs)
    for k in grads:
      assert out[k].dtype == grads[k].dtype
      np.testing.assert_array_equal(np.asarray(out[k], np.float32),
                                    np.asarray(grads[k], np.float32))
    assert float(state.lam) == 1.0


F32_TINY = float(np.finfo(np.float32).tiny)


@SETTINGS
@given(
    lo=st.floats(0.0, 1.0),
    width=st.floats(0.0, 1.0),
    frac=st.floats(0.0, 1.0),
    adapt_rate=st.one_of(st.floats(0.0, 1e3), st.sampled_from([0.0, 1e30])),
    values=st.lists(st.one_of(st.none(), any_loss), min_size=1, max_size=8),
)
@example(lo=0.1, width=0.5, frac=0.5, adapt_rate=0.5,
         values=[3e38, -3e38, float("nan"), -float("inf"), 1.0])
@example(lo=0.0, width=1.0, frac=0.5, adapt_rate=0.0, values=[0.0, -1e30])
@example(lo=1.778212080680505e-42, width=0.0, frac=0.0, adapt_rate=0.0,
         values=[0.0])
def test_lam_stays_within_bounds(lo, width, frac, adapt_rate, values):
  hi = min(1.0, lo + width)
  lam = min(hi, max(lo, lo + frac * (hi - lo)))
  if any(0 < x < F32_TINY for x in (lo, hi, lam)):
    # float32 subnormals flush to 0 in XLA: refused, never silently 0.
    with pytest.raises(ValueError, match="smallest normal"):
      cgf_optax.entangle(lam=lam, adapt_rate=adapt_rate, lam_bounds=(lo, hi))
    return
  tx = cgf_optax.entangle(lam=lam, adapt_rate=adapt_rate, lam_bounds=(lo, hi))
  params = jnp.zeros(2)
  state = tx.init(params)
  # λ is float32: compare with the bounds as float32 rounds them.
  lo32, hi32 = np.float32(lo), np.float32(hi)
  for value in values:
    before = state
    kwargs = {} if value is None else {"value": value}
    _, state = tx.update(jnp.ones(2), state, **kwargs)
    lam_t = np.float32(state.lam)
    assert math.isfinite(lam_t)
    assert lo32 <= lam_t <= hi32, (lo, hi, lam_t)
    if value is None or not math.isfinite(np.float32(value)):
      # No loss, or a non-finite one: nothing about λ changes.
      assert np.float32(before.lam) == lam_t
      np.testing.assert_array_equal(before.prev_loss, state.prev_loss)
    else:
      assert float(state.prev_loss) == float(np.float32(value))


# --------------------------------------------------------------------------
# context_align.


@functools.partial(jax.jit, static_argnames=("num_heads",))
def _align_step(grads, state, ctx, rho, *, num_heads):
  # Built inside jit with a traced rho (as optax.inject_hyperparams does), so
  # one compilation serves every drawn rho.
  tx = cgf_optax.context_align(num_heads=num_heads, gamma=0.0, rho=rho)
  return tx.update(grads, state, context=ctx)


@SETTINGS
@given(
    seed=st.integers(0, 2**16),
    num_heads=st.sampled_from([1, 2]),
    rho=st.floats(0.0, 0.99),
    context_scale=st.sampled_from([1e-6, 1.0, 1e3]),
    steps=st.integers(1, 3),
)
def test_context_align_with_gamma_zero_is_identity(seed, num_heads, rho,
                                                   context_scale, steps):
  shapes = KERNEL_SHAPES + ((3,),)
  tx = cgf_optax.context_align(num_heads=num_heads, gamma=0.0, rho=rho)
  state = tx.init(_tree(0, shapes))
  rng = np.random.default_rng(seed)
  for i in range(steps):
    grads = _tree(seed + i, shapes)
    # Contexts of shape [tokens, fan_in] and [batch, seq, fan_in].
    ctx = {f"k{j}": jnp.asarray(
        context_scale * (1 + rng.standard_normal(tokens + (s[0],))),
        jnp.float32)
           for j, (s, tokens) in enumerate(zip(KERNEL_SHAPES,
                                               [(5,), (2, 3), (4,)],
                                               strict=True))}
    out, state = _align_step(grads, state, ctx, jnp.float32(rho),
                             num_heads=num_heads)
    for k in grads:
      np.testing.assert_array_equal(out[k], grads[k])
  # The state did follow the contexts (γ only scales their effect).
  assert int(state.steps["k0"]) == steps


def test_context_align_with_gamma_zero_is_identity_concrete():
  """The same with the factory's concrete (not traced) gamma = 0."""
  rng = np.random.default_rng(0)
  tx = cgf_optax.context_align(num_heads=2, gamma=0.0, rho=0.5)
  params = {"w": jnp.zeros((4, 3))}
  state = tx.init(params)
  for _ in range(2):
    g = {"w": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32)}
    c = {"w": jnp.asarray(rng.standard_normal((2, 3, 4)), jnp.float32)}
    out, state = tx.update(g, state, context=c)
    np.testing.assert_array_equal(out["w"], g["w"])


# --------------------------------------------------------------------------
# normalize.


@SETTINGS
@given(
    seed=st.integers(0, 2**16),
    log_scales=st.lists(st.floats(-2.0, 4.0), min_size=3, max_size=3),
    zero=st.sampled_from([None, "k0", "k1", "k2"]),
    scope=st.sampled_from(["leaf", "global"]),
    eps=st.sampled_from([0.0, 1e-8]),
)
def test_normalize_gives_unit_norm(seed, log_scales, zero, scope, eps):
  """Unit norm; a zero leaf stays zero when eps > 0 (eps = 0 gives 0/0)."""
  shapes = ((4, 3), (5,), (2, 2, 2))
  rng = np.random.default_rng(seed)
  grads = {f"k{i}": jnp.asarray(10.0**s * rng.standard_normal(shape),
                                jnp.float32)
           for i, (s, shape) in enumerate(zip(log_scales, shapes,
                                              strict=True))}
  if eps == 0.0:
    zero = None
  if zero is not None:
    grads[zero] = jnp.zeros_like(grads[zero])
  tx = cgf_optax.normalize(scope, eps=eps)
  out, _ = tx.update(grads, tx.init(grads))
  norms = {k: float(np.linalg.norm(np.asarray(v, np.float64).ravel()))
           for k, v in out.items()}
  for k, v in out.items():
    assert v.dtype == jnp.float32
    assert np.all(np.isfinite(v))
    if k == zero:
      np.testing.assert_array_equal(v, 0.0)     # zero stays zero
    elif scope == "leaf":
      np.testing.assert_allclose(norms[k], 1.0, rtol=1e-5)
  if scope == "global":
    total = math.sqrt(sum(n**2 for n in norms.values()))
    np.testing.assert_allclose(total, 1.0, rtol=1e-5)


@given(scope=st.sampled_from(["leaf", "global"]))
@settings(max_examples=4, deadline=None)
def test_normalize_all_zero_stays_zero(scope):
  grads = {"a": jnp.zeros((3, 2)), "b": jnp.zeros(4)}
  tx = cgf_optax.normalize(scope)
  out, _ = tx.update(grads, tx.init(grads))
  for v in jax.tree.leaves(out):
    np.testing.assert_array_equal(v, 0.0)


# --------------------------------------------------------------------------
# The entanglement penalty's gradient vs central finite differences.
#
# The network: hidden states h = tanh(x W1) (W1: the producer's parameters),
# then the rest of the network and the loss as a function of h, closing over
# W2 (cross-entropy of tanh(h) W2). The penalty involves dL/dh, so its
# gradient w.r.t. W1 and W2 is a second derivative (double backprop).

N_TOK, D_IN, D_HID, N_CLS = 5, 3, 4, 4


def _penalty(w1, w2, x, y, lam):
  h = jnp.tanh(x @ w1)

  def loss_of_hidden(hid):
    logits = jnp.tanh(hid) @ w2
    picked = jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0]
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - picked)

  return cgf_optax.losses.entanglement_penalty(loss_of_hidden, h, beta=1.0,
                                               lam=lam)


_penalty_grad = jax.jit(jax.grad(_penalty, argnums=(0, 1)))
_penalty_batch = jax.jit(jax.vmap(_penalty, in_axes=(0, 0, None, None, None)))


def _finite_differences(w1, w2, x, y, lam, h):
  """Central differences for every entry of w1 and w2, in one vmapped call."""
  n1, n2 = w1.size, w2.size
  basis = jnp.eye(n1 + n2, dtype=w1.dtype) * h
  d1 = basis[:, :n1].reshape(-1, *w1.shape)
  d2 = basis[:, n1:].reshape(-1, *w2.shape)
  fd = (_penalty_batch(w1 + d1, w2 + d2, x, y, lam)
        - _penalty_batch(w1 - d1, w2 - d2, x, y, lam)) / (2 * h)
  fd = np.asarray(fd, np.float64)
  return fd[:n1].reshape(w1.shape), fd[n1:].reshape(w2.shape)


def _inputs(seed, dtype):
  rng = np.random.default_rng(seed)
  w1 = jnp.asarray(rng.standard_normal((D_IN, D_HID)), dtype)
  w2 = jnp.asarray(rng.standard_normal((D_HID, N_CLS)), dtype)
  x = jnp.asarray(rng.standard_normal((N_TOK, D_IN)), dtype)
  y = jnp.asarray(rng.integers(0, N_CLS, N_TOK))
  return w1, w2, x, y


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), lam=st.floats(0.1, 1.0))
def test_penalty_gradient_matches_finite_differences(seed, lam):
  """FD in float64 inputs, tolerance set by the penalty's float32 internals.

  ``entanglement_penalty`` evaluates in float32 whatever its inputs' dtype
  (see `test_penalty_keeps_float64_precision`), so the finite differences see
  a function rounded to ~6e-8 (|P| <= 2): with h = 1e-3 their rounding error
  is <= 2 * 1.2e-7 / (2 h) ~ 1.2e-4 in the worst case (measured: ~2e-5), and
  their truncation error h^2 |P'''| / 6 ~ 1e-6. ``atol=3e-4`` on gradients of
  size ~0.1-1 still catches any missing term of the double backprop (an
  omitted second-order path changes them by O(0.1)).
  """
  with jax.enable_x64(True):
    w1, w2, x, y = _inputs(seed, jnp.float64)
    lam = jnp.float64(lam)
    g1, g2 = _penalty_grad(w1, w2, x, y, lam)
    fd1, fd2 = _finite_differences(w1, w2, x, y, lam, 1e-3)
  assert np.max(np.abs(fd1)) > 1e-3 and np.max(np.abs(fd2)) > 1e-3
  np.testing.assert_allclose(g1, fd1, rtol=1e-3, atol=3e-4)
  np.testing.assert_allclose(g2, fd2, rtol=1e-3, atol=3e-4)


def test_penalty_keeps_float64_precision():
  """With float64 inputs, the penalty and its gradient are float64-accurate.

  The design note's convention is that cgf_optax is dtype-preserving; a user
  who enables x64 to check gradients gets float64 finite differences to
  ~1e-9 here (h = 1e-5: rounding 1e-16 / 1e-5, truncation 1e-10).
  """
  with jax.enable_x64(True):
    w1, w2, x, y = _inputs(0, jnp.float64)
    lam = jnp.float64(0.7)
    assert _penalty(w1, w2, x, y, lam).dtype == jnp.float64
    g1, g2 = _penalty_grad(w1, w2, x, y, lam)
    fd1, fd2 = _finite_differences(w1, w2, x, y, lam, 1e-5)
  np.testing.assert_allclose(g1, fd1, rtol=1e-6, atol=1e-8)
  np.testing.assert_allclose(g2, fd2, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("kw, name", [
    (dict(lam_bounds=(1e-42, 1.0), lam=0.5), "lam_bounds[0]"),
    (dict(lam_bounds=(0.0, 1e-40), lam=0.0), "lam_bounds[1]"),
    (dict(lam_bounds=(0.0, 1.0), lam=1e-39), "lam"),
])
def test_subnormal_lambda_is_refused(kw, name):
  """λ is float32 and subnormals flush to 0: refused, not silently zero."""
  with pytest.raises(ValueError, match=re.escape(f"`{name}`=")):
    cgf_optax.entangle(**kw)
