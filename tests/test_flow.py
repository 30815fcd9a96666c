"""`cgf_optax.flow`: the activation-level gradient flow layer.

The custom VJP against a dense NumPy reference of the split, its algebra
(linearity, partition, second derivatives), the exact identity at weights 1,
the telemetry probes, bad input, and sharded batches (in a subprocess with 8
virtual CPU devices, as tests/test_sharding_contract.py).
"""

import functools
import inspect
import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import cgf_optax
from cgf_optax import flow

REPO = pathlib.Path(__file__).resolve().parents[1]
TOL = dict(rtol=2e-5, atol=2e-6)
MODE_CASES = [("mean", None), ("causal", None), ("causal", 1), ("causal", 3),
              ("window", 1), ("window", 2), ("window", 3), ("window", 20)]


# ---------------------------------------------------------------------------
# NumPy reference: P as a dense [T, T] matrix, built position by position.


def ref_matrix(length, mode, window):
  p = np.zeros((length, length))
  for t in range(length):
    if mode == "mean":
      lo, hi = 0, length
    elif mode == "causal":
      lo, hi = t, length if window is None else min(t + window, length)
    else:
      lo = max(t - (window - 1) // 2, 0)
      hi = min(t + window // 2 + 1, length)
    p[t, lo:hi] = 1.0 / (hi - lo)
  return p


def ref_split(g, mode, window, seq_axis):
  """(local, global) of `g` in float64."""
  g = np.moveaxis(np.asarray(g, np.float64), seq_axis, -1)
  glob = g @ ref_matrix(g.shape[-1], mode, window).T
  return (np.moveaxis(g - glob, -1, seq_axis),
          np.moveaxis(glob, -1, seq_axis))


def ref_backward(g, lam_local, lam_global, mode, window, seq_axis):
  local, glob = ref_split(g, mode, window, seq_axis)
  return lam_local * local + lam_global * glob


def vjp(h, g, *args, **kwargs):
  _, fn = jax.vjp(lambda h: flow.gradient_flow(h, *args, **kwargs), h)
  return fn(g)[0]


def rand(rng, shape, dtype=np.float32):
  return rng.standard_normal(shape).astype(dtype)


# ---------------------------------------------------------------------------
# The split and the VJP against the reference.


@st.composite
def cases(draw):
  # few distinct shapes, so that compilations are reused
  shape = draw(st.sampled_from([(1, 1), (5, 1), (3, 4), (2, 6, 3),
                                (1, 1, 7), (2, 3, 1, 4)]))
  ndim = len(shape)
  seq_axis = draw(st.integers(-ndim, ndim - 1))
  mode = draw(st.sampled_from(flow.MODES))
  window = {"mean": None,
            "causal": draw(st.one_of(st.none(), st.integers(1, 8))),
            "window": draw(st.integers(1, 8))}[mode]
  lam = st.floats(-2.0, 3.0, allow_nan=False, width=32)
  return dict(shape=shape, seq_axis=seq_axis, mode=mode, window=window,
              lam_local=draw(lam), lam_global=draw(lam),
              seed=draw(st.integers(0, 2**16)))


@functools.partial(jax.jit, static_argnames=("mode", "window", "seq_axis"))
def _vjp_and_split(h, g, lam, *, mode, window, seq_axis):
  kw = dict(mode=mode, window=window, seq_axis=seq_axis)
  return (vjp(h, g, lam[0], lam[1], **kw), flow.split_cotangent(g, **kw))


@settings(max_examples=30, deadline=None)
@given(cases())
def test_vjp_matches_numpy_reference(case):
  rng = np.random.default_rng(case["seed"])
  h, g = rand(rng, case["shape"]), rand(rng, case["shape"])
  kw = dict(mode=case["mode"], window=case["window"],
            seq_axis=case["seq_axis"])
  lam = jnp.array([case["lam_local"], case["lam_global"]])
  got, (local, glob) = _vjp_and_split(h, g, lam, **kw)
  want = ref_backward(g, case["lam_local"], case["lam_global"], **kw)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert got.dtype == h.dtype and got.shape == h.shape

  want_local, want_glob = ref_split(g, **kw)
  np.testing.assert_allclose(glob, want_glob, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(local, want_local, rtol=1e-5, atol=1e-5)
  # the partition: local + global is the cotangent, up to one rounding
  np.testing.assert_allclose(local + glob, g, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode,window", MODE_CASES)
def test_split_properties(mode, window):
  rng = np.random.default_rng(0)
  g = rand(rng, (3, 7, 4))
  local, glob = flow.split_cotangent(g, mode=mode, window=window)
  # constants are all global (unit gain of P)
  const = np.broadcast_to(rand(rng, (3, 1, 4)), g.shape)
  c_local, c_glob = flow.split_cotangent(const, mode=mode, window=window)
  np.testing.assert_allclose(c_glob, const, **TOL)
  np.testing.assert_allclose(c_local, 0.0, atol=1e-6)
  if mode == "mean":  # an orthogonal projection: orthogonal parts, P^2 = P
    assert abs(float(jnp.sum(local * glob))) < 1e-4
    np.testing.assert_allclose(
        flow.split_cotangent(glob, mode=mode).global_, glob, **TOL)
  if mode == "causal" and window is None:
    # first position: the sequence mean; last: the whole cotangent
    np.testing.assert_allclose(glob[:, 0], g.mean(axis=1), **TOL)
    np.testing.assert_allclose(glob[:, -1], g[:, -1], **TOL)


def test_large_common_part_keeps_window_sums_accurate():
  # a large common part along the sequence: window sums of differences of
  # suffix sums would cancel badly without the mean subtracted first.
  rng = np.random.default_rng(1)
  g = (1e4 + rand(rng, (2, 512, 3))).astype(np.float32)
  _, glob = flow.split_cotangent(g, mode="window", window=5)
  _, want = ref_split(g, "window", 5, -2)
  np.testing.assert_allclose(glob - 1e4, want - 1e4, atol=2e-3)


@pytest.mark.parametrize("mode,window", MODE_CASES)
def test_vjp_is_linear_in_the_cotangent(mode, window):
  rng = np.random.default_rng(2)
  h, g1, g2 = (rand(rng, (2, 6, 3)) for _ in range(3))
  _, fn = jax.vjp(lambda h: flow.gradient_flow(h, 0.3, -1.5, mode=mode,
                                               window=window), h)
  lhs = fn(2.0 * g1 - 0.5 * g2)[0]
  rhs = 2.0 * fn(g1)[0] - 0.5 * fn(g2)[0]
  np.testing.assert_allclose(lhs, rhs, **TOL)


def test_forward_is_identity_and_weights_get_zero_gradient():
  rng = np.random.default_rng(3)
  h = jnp.asarray(rand(rng, (2, 5, 3)))
  out = flow.gradient_flow(h, 0.5, 2.0, mode="window", window=3)
  np.testing.assert_array_equal(out, h)
  loss = lambda a, b: jnp.sum(flow.gradient_flow(h, a, b) ** 2)
  ga, gb = jax.grad(loss, argnums=(0, 1))(jnp.float32(0.5), jnp.float32(2.0))
  assert float(ga) == 0.0 and float(gb) == 0.0


def test_array_weights_broadcast():
  rng = np.random.default_rng(4)
  h, g = rand(rng, (2, 5, 3)), rand(rng, (2, 5, 3))
  lam_l = np.array([0.5, 1.0, 2.0], np.float32)     # per feature
  lam_g = jnp.array([[[0.0]], [[3.0]]])             # per batch element
  got = vjp(h, g, lam_l, lam_g, mode="causal", window=2)
  want = ref_backward(g, lam_l, np.asarray(lam_g), "causal", 2, -2)
  np.testing.assert_allclose(got, want, **TOL)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_dtype_is_preserved(dtype):
  rng = np.random.default_rng(5)
  h = jnp.asarray(rand(rng, (2, 6, 4)), dtype)
  g = jnp.asarray(rand(rng, (2, 6, 4)), dtype)
  got = vjp(h, g, 0.5, 2.0, mode="causal")
  assert got.dtype == dtype
  want = ref_backward(np.asarray(g, np.float32), 0.5, 2.0, "causal", None, -2)
  np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2e-2,
                             atol=2e-2)


# ---------------------------------------------------------------------------
# Exact identity at weights 1.


def _model(params, x, y, weights=None, probes=None):
  """An MLP, causal single-head attention and a residual, `flow` between."""
  def f(h, i):
    if weights is None:
      return h
    return flow.gradient_flow(h, *weights, mode="causal",
                              probe=None if probes is None else probes[i])
  h = f(jnp.tanh(x @ params["w1"]), 0)
  q, k = h @ params["wq"], h @ params["wk"]
  scores = q @ jnp.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
  mask = np.tril(np.ones(scores.shape[-2:], bool))
  a = jax.nn.softmax(jnp.where(mask, scores, -1e9), axis=-1)
  h = f(h + a @ h, 1)
  return jnp.mean((h @ params["w2"] - y) ** 2)


def _model_inputs(seed=6):
  rng = np.random.default_rng(seed)
  params = {k: jnp.asarray(rand(rng, s) / np.sqrt(s[0])) for k, s in
            {"w1": (5, 8), "wq": (8, 8), "wk": (8, 8), "w2": (8, 2)}.items()}
  x, y = jnp.asarray(rand(rng, (3, 7, 5))), jnp.asarray(rand(rng, (3, 7, 2)))
  return params, x, y


def _bits(tree):
  return [np.asarray(a).view(np.uint32) for a in jax.tree.leaves(tree)]


def _assert_bit_identical(a, b):
  for x, y in zip(_bits(a), _bits(b), strict=True):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("weights", ["python", "numpy", "jax"])
def test_weights_one_are_bit_identical_eager(weights):
  params, x, y = _model_inputs()
  one = {"python": 1.0, "numpy": np.float32(1.0),
         "jax": jnp.float32(1.0)}[weights]
  base = jax.grad(_model)(params, x, y)
  got = jax.grad(_model)(params, x, y, (one, one))
  _assert_bit_identical(got, base)
  if weights == "python":  # the layer is skipped altogether
    h = jnp.ones((1, 2, 3))
    assert flow.gradient_flow(h, 1.0, 1.0) is h


def test_weights_one_are_bit_identical_under_jit_when_traced():
  params, x, y = _model_inputs()
  base = jax.jit(jax.grad(_model))(params, x, y)
  grad = jax.jit(jax.grad(lambda p, w: _model(p, x, y, (w[0], w[1]))))
  _assert_bit_identical(grad(params, jnp.ones(2)), base)
  # and the same compiled function is not the identity for other weights
  other = grad(params, jnp.array([1.0, 0.5]))
  assert not np.allclose(other["w1"], base["w1"])


def test_weights_one_with_probes_are_bit_identical():
  params, x, y = _model_inputs()
  base = jax.grad(_model)(params, x, y)
  got, probe_grads = jax.grad(_model, argnums=(0, 4))(
      params, x, y, (1.0, 1.0), flow.init_probes(2))
  _assert_bit_identical(got, base)
  assert np.all(np.asarray(probe_grads)[:, :2] > 0)


def test_probes_do_not_change_the_gradients():
  params, x, y = _model_inputs()
  w = (0.7, 0.2)
  base = jax.grad(_model)(params, x, y, w)
  got, _ = jax.grad(_model, argnums=(0, 4))(params, x, y, w,
                                           flow.init_probes(2))
  _assert_bit_identical(got, base)


def test_equal_weights_scale_the_gradient():
  rng = np.random.default_rng(7)
  h, g = rand(rng, (2, 6, 3)), rand(rng, (2, 6, 3))
  np.testing.assert_array_equal(vjp(h, g, 0.5, 0.5, mode="causal"), 0.5 * g)


# ---------------------------------------------------------------------------
# Transformations.


@pytest.mark.parametrize("mode,window", [("mean", None), ("causal", 3),
                                         ("window", 4)])
def test_jit_matches_eager(mode, window):
  params, x, y = _model_inputs()

  def loss(p, lam):
    h = jnp.tanh(x @ p["w1"])
    h = flow.gradient_flow(h, lam[0], lam[1], mode=mode, window=window)
    return jnp.mean((h @ p["w2"] - y) ** 2)

  lam = jnp.array([0.8, 0.3])
  eager = jax.grad(loss)(params, lam)
  jitted = jax.jit(jax.grad(loss))(params, lam)
  for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted),
                  strict=True):
    np.testing.assert_allclose(a, b, **TOL)


def test_vmap_and_scan():
  rng = np.random.default_rng(8)
  h, g = rand(rng, (4, 6, 3)), rand(rng, (4, 6, 3))
  # vmap over the batch with the sequence as axis 0 of each example
  fn = lambda h: flow.gradient_flow(h, 0.5, 2.0, mode="causal", seq_axis=0)
  _, f = jax.vjp(jax.vmap(fn), h)
  np.testing.assert_allclose(f(g)[0], vjp(h, g, 0.5, 2.0, mode="causal"),
                             **TOL)
  # scan over layers with per-layer weights and probes
  sched = flow.depth_schedule(3, (1.0, 1.0), (0.5, 2.0))

  def loss(h, probes):
    def body(h, xs):
      lam_l, lam_g, probe = xs
      return flow.gradient_flow(jnp.tanh(h), lam_l, lam_g, probe=probe), None
    h, _ = jax.lax.scan(body, h, (sched.local, sched.global_, probes))
    return jnp.sum(h ** 2)

  _, pg = jax.jit(jax.grad(loss, argnums=(0, 1)))(h, flow.init_probes(3))
  assert pg.shape == (3, 3) and np.all(np.isfinite(pg))


def test_checkpoint():
  # under jax.checkpoint the weights (constants) are residuals of the VJP
  rng = np.random.default_rng(13)
  h = jnp.asarray(rand(rng, (2, 5, 3)))

  def loss(h, probe):
    z = flow.gradient_flow(jnp.tanh(h), 0.3, 2.0, mode="window", window=3,
                           probe=probe)
    return jnp.sum(jnp.sin(z) ** 2)

  want = jax.grad(loss, argnums=(0, 1))(h, flow.init_probes())
  got = jax.grad(jax.checkpoint(loss), argnums=(0, 1))(h, flow.init_probes())
  for a, b in zip(got, want, strict=True):
    np.testing.assert_allclose(a, b, **TOL)


def _dense_backward(length, lam_local, lam_global, mode, window):
  p = ref_matrix(length, mode, window)
  return lam_local * (np.eye(length) - p) + lam_global * p


@pytest.mark.parametrize("mode,window", [("mean", None), ("causal", None),
                                         ("causal", 3), ("window", 4)])
def test_second_derivatives_closed_form(mode, window):
  # L(h) = h^T Q h / 2 over one sequence: the gradient through the layer is
  # B Q h with B the backward operator, so its Jacobian is B Q.
  length, lam_l, lam_g = 6, 0.4, 1.7
  rng = np.random.default_rng(9)
  a = rng.standard_normal((length, length))
  q = (a + a.T).astype(np.float32)
  h = jnp.asarray(rand(rng, (1, length, 1)))

  def loss(h):
    z = flow.gradient_flow(h, lam_l, lam_g, mode=mode, window=window)
    return 0.5 * z[0, :, 0] @ q @ z[0, :, 0]

  want = _dense_backward(length, lam_l, lam_g, mode, window) @ q
  rev_rev, fwd_rev = jax.jit(lambda h: (jax.jacrev(jax.grad(loss))(h),
                                        jax.hessian(loss)(h)))(h)
  rev_rev = rev_rev.reshape(length, length)
  fwd_rev = fwd_rev.reshape(length, length)
  np.testing.assert_allclose(rev_rev, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(fwd_rev, want, rtol=1e-5, atol=1e-5)


def test_jvp_of_the_vjp():
  rng = np.random.default_rng(10)
  h, g, dg = (rand(rng, (2, 5, 3)) for _ in range(3))
  _, fn = jax.vjp(lambda h: flow.gradient_flow(h, 0.3, 1.2, mode="window",
                                               window=3), h)
  out, tangent = jax.jvp(lambda g: fn(g)[0], (g,), (dg,))
  np.testing.assert_allclose(out, ref_backward(g, 0.3, 1.2, "window", 3, -2),
                             **TOL)
  np.testing.assert_allclose(tangent,
                             ref_backward(dg, 0.3, 1.2, "window", 3, -2),
                             **TOL)


# ---------------------------------------------------------------------------
# Telemetry probes.


def _ref_probe(c, mode, window):
  local, glob = ref_split(c, mode, window, -2)
  return np.array([np.sum(local**2), np.sum(glob**2), np.sum(local * glob)])


@pytest.mark.parametrize("mode,window", [("mean", None), ("causal", None),
                                         ("window", 3)])
def test_probes_equal_numpy_norms(mode, window):
  rng = np.random.default_rng(11)
  h1, h2 = rand(rng, (2, 6, 3)), rand(rng, (3, 4, 2))
  c1, c2 = rand(rng, (2, 6, 3)), rand(rng, (3, 4, 2))  # the cotangents

  def loss(h1, h2, probes):
    kw = dict(mode=mode, window=window)
    z1 = flow.gradient_flow(h1, 0.5, 2.0, probe=probes[0], **kw)
    z2 = flow.gradient_flow(h2, 1.0, 1.0, probe=probes[1], **kw)
    return jnp.sum(z1 * c1) + jnp.sum(z2 * c2)

  pg = jax.jit(jax.grad(loss, argnums=2))(h1, h2, flow.init_probes(2))
  want = np.stack([_ref_probe(c1, mode, window),
                   _ref_probe(c2, mode, window)])
  np.testing.assert_allclose(pg, want, rtol=1e-5, atol=1e-5)
  tel = flow.read_probes(pg)
  np.testing.assert_allclose(tel.local_norm, np.sqrt(want[:, 0]), rtol=1e-5)
  np.testing.assert_allclose(tel.global_norm, np.sqrt(want[:, 1]), rtol=1e-5)
  np.testing.assert_allclose(
      tel.total_norm, [np.linalg.norm(c1), np.linalg.norm(c2)], rtol=1e-4)


def test_a_reused_probe_accumulates():
  rng = np.random.default_rng(12)
  h, c1, c2 = (rand(rng, (2, 5, 3)) for _ in range(3))

  def loss(probe):
    z1 = flow.gradient_flow(h, 0.5, 2.0, probe=probe)
    z2 = flow.gradient_flow(h, 0.5, 2.0, probe=probe)
    return jnp.sum(z1 * c1) + jnp.sum(z2 * c2)

  pg = jax.grad(loss)(flow.init_probes())
  want = _ref_probe(c1, "causal", None) + _ref_probe(c2, "causal", None)
  np.testing.assert_allclose(pg, want, rtol=1e-5, atol=1e-5)


def test_probe_dtype_and_helpers():
  assert flow.init_probes().shape == (flow.PROBE_SIZE,)
  assert flow.init_probes(4, jnp.bfloat16).dtype == jnp.bfloat16
  h = jnp.ones((1, 3, 2), jnp.bfloat16)
  pg = jax.grad(lambda p: jnp.sum(
      flow.gradient_flow(h, 0.5, 2.0, probe=p).astype(jnp.float32)))(
          flow.init_probes(dtype=jnp.bfloat16))
  assert pg.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(pg, np.float32), [0.0, 6.0, 0.0])


# ---------------------------------------------------------------------------
# depth_schedule.


def test_depth_schedule():
  s = flow.depth_schedule(5, (1.0, 1.0), (0.0, 0.5))
  np.testing.assert_allclose(s.local, np.linspace(1.0, 0.0, 5))
  np.testing.assert_allclose(s.global_, np.linspace(1.0, 0.5, 5))
  c = flow.depth_schedule(3, (1.0, 2.0), (1.0, 0.0), kind="cosine")
  np.testing.assert_allclose(c.global_, [2.0, 1.0, 0.0], atol=1e-6)
  k = flow.depth_schedule(2, (0.7, 0.3), kind="constant")
  np.testing.assert_allclose(k.local, [0.7, 0.7])
  np.testing.assert_allclose(k.global_, [0.3, 0.3])
  one = flow.depth_schedule(1, (0.5, 0.25), (2.0, 2.0))
  np.testing.assert_allclose(np.stack(one), [[0.5], [0.25]])
  lam_l, lam_g = flow.depth_schedule(2)
  assert lam_l.dtype == jnp.float32 and lam_g.shape == (2,)


# ---------------------------------------------------------------------------
# Bad input.

H = np.zeros((2, 4, 3), np.float32)

BAD_CALLS = {
    "rank1": (dict(h=np.zeros(4, np.float32)), "`h`"),
    "int_h": (dict(h=np.zeros((2, 4, 3), np.int32)), "`h`"),
    "mode": (dict(mode="median"), "`mode`"),
    "window0": (dict(mode="window", window=0), "`window`"),
    "window_missing": (dict(mode="window"), "`window`"),
    "window_with_mean": (dict(mode="mean", window=3), "`window`"),
    "window_float": (dict(mode="causal", window=2.5), "`window`"),
    "seq_axis": (dict(seq_axis=3), "`seq_axis`"),
    "seq_axis_neg": (dict(seq_axis=-4), "`seq_axis`"),
    "seq_axis_type": (dict(seq_axis="1"), "`seq_axis`"),
    "nan_local": (dict(lambda_local=float("nan")), "`lambda_local`"),
    "inf_global": (dict(lambda_global=float("inf")), "`lambda_global`"),
    "numpy_nan": (dict(lambda_global=np.array([1.0, np.nan, 1.0])),
                  "`lambda_global`"),
    "bool_weight": (dict(lambda_local=True), "`lambda_local`"),
    "str_weight": (dict(lambda_local="1"), "`lambda_local`"),
    "complex_weight": (dict(lambda_local=np.complex64(1)), "`lambda_local`"),
    "weight_shape": (dict(lambda_global=np.ones(4)), "`lambda_global`"),
    "probe_shape": (dict(probe=np.zeros(2, np.float32)), "`probe`"),
    "probe_int": (dict(probe=np.zeros(3, np.int32)), "`probe`"),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_input_raises_naming_the_argument(name):
  kwargs, match = BAD_CALLS[name]
  kwargs = dict(kwargs)
  h = kwargs.pop("h", H)
  with pytest.raises(ValueError, match=re.escape(match)):
    flow.gradient_flow(h, **kwargs)


def test_bad_input_of_the_helpers():
  with pytest.raises(ValueError, match="`mode`"):
    flow.split_cotangent(H, mode="global")
  with pytest.raises(ValueError, match="`num_layers`"):
    flow.depth_schedule(0)
  with pytest.raises(ValueError, match="`kind`"):
    flow.depth_schedule(2, kind="exp")
  with pytest.raises(ValueError, match="`start`"):
    flow.depth_schedule(2, start=1.0)
  with pytest.raises(ValueError, match="`end`"):
    flow.depth_schedule(2, (1.0, 1.0), (1.0, float("nan")))
  with pytest.raises(ValueError, match="`end`"):
    flow.depth_schedule(2, (1.0, 1.0), (1.0, 0.5), kind="constant")
  with pytest.raises(ValueError, match="`num_layers`"):
    flow.init_probes(0)
  with pytest.raises(ValueError, match="`dtype`"):
    flow.init_probes(2, jnp.int32)
  with pytest.raises(ValueError, match="`probe_grads`"):
    flow.read_probes(np.zeros((2, 2)))


def test_traced_weights_are_checked_for_shape_only():
  h = jnp.zeros((2, 4, 3))
  with pytest.raises(ValueError, match="`lambda_local`"):
    jax.jit(lambda w: flow.gradient_flow(h, w, 1.0))(jnp.ones(5))
  out = jax.jit(lambda w: flow.gradient_flow(h, w, 1.0))(jnp.float32(0.5))
  assert out.shape == h.shape


# ---------------------------------------------------------------------------
# Public API and docs (the package-level checks see only `cgf_optax.flow`).


def test_public_names_are_exported_and_documented():
  assert "flow" in cgf_optax.__all__ and cgf_optax.flow is flow
  api = (REPO / "docs" / "api.rst").read_text(encoding="utf-8")
  missing = [n for n in flow.__all__ if f"cgf_optax.flow.{n}" not in api]
  assert not missing, missing
  for name in flow.__all__:
    obj = getattr(flow, name)
    if inspect.isfunction(obj):
      assert ">>>" in (obj.__doc__ or ""), f"flow.{name} has no example"


# ---------------------------------------------------------------------------
# Sharded batches (8 virtual CPU devices, in a subprocess).

SHARDED_SCRIPT = textwrap.dedent('''
    import json

    import jax
    import jax.numpy as jnp
    import numpy as np

    from cgf_optax import flow

    assert jax.device_count() == 8, jax.devices()
    mesh = jax.make_mesh((8,), ("x",),
                         axis_types=(jax.sharding.AxisType.Explicit,))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((16, 12, 8)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((8, 8)) / 3, jnp.float32)
    a = jnp.asarray(rng.standard_normal((8,)), jnp.float32)
    lam = jnp.array([0.6, 1.7])

    def batch_loss(w, probes, x, lam, mode, window):
      h = jnp.tanh(x @ w)
      h = flow.gradient_flow(h, lam[0], lam[1], mode=mode, window=window,
                             probe=probes[0])
      h = jnp.tanh(h @ w)
      h = flow.gradient_flow(h, 0.5, 2.0, mode=mode, window=window,
                             probe=probes[1])
      return jnp.mean(h ** 2)

    def feature_loss(a, probes, x, lam, mode, window):  # elementwise model
      h = jnp.tanh(x * a)
      h = flow.gradient_flow(h, lam[0], lam[1], mode=mode, window=window,
                             probe=probes[0])
      return jnp.mean(jnp.sin(h) * h)

    CASES = {"batch": [("causal", None), ("window", 5)],
             "features": [("causal", 3)]}
    results = {}
    for model, loss, param, spec in [
        ("batch", batch_loss, w, jax.P("x")),
        ("features", feature_loss, a, jax.P(None, None, "x"))]:
      for mode, window in CASES[model]:
        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)),
                       static_argnums=(4, 5))
        probes = flow.init_probes(2)
        want = grad(param, probes, x, lam, mode, window)
        with jax.set_mesh(mesh):
          xs = jax.device_put(x, jax.NamedSharding(mesh, spec))
          got = grad(param, probes, xs, lam, mode, window)
          same_type = str(jax.typeof(got[2])) == str(jax.typeof(xs))
        err = max(float(jnp.max(jnp.abs(jnp.asarray(g) - jnp.asarray(v))))
                  / (1e-6 + float(jnp.max(jnp.abs(jnp.asarray(v)))))
                  for g, v in zip(got, want))
        results[f"{model}-{mode}-{window}"] = dict(
            rel_err=err, same_type=same_type,
            sharding=str(got[2].sharding.spec))
    print("RESULTS=" + json.dumps(results))
''')


def test_sharded_batch_gives_the_same_gradients():
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "")
                      + " --xla_force_host_platform_device_count=8").strip()
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(
      [str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                     if p])
  proc = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], env=env,
                        cwd=REPO, capture_output=True, text=True, timeout=600,
                        check=False)
  lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS=")]
  assert proc.returncode == 0 and lines, (
      f"subprocess failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}")
  results = json.loads(lines[-1][len("RESULTS="):])
  assert len(results) == 3
  bad = {k: r for k, r in results.items()
         if not (r["rel_err"] < 1e-5 and r["same_type"])}
  assert not bad, bad
