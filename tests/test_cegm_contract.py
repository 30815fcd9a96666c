"""The Optax contract (/work/shared/OPTAX-CONTRACT.md) for the CEGM chains.

`cegm`, `cegm_adamw` and, where meaningful, the standalone `entangle`,
`context_align` and `normalize`: jit (and no recompilation), unknown extra
keyword arguments, dtype preservation, stable state dtypes, init on
`jax.ShapeDtypeStruct`s, `optax.inject_hyperparams` (a constant schedule
equal to the scalar is checked in `test_cegm_reference.py`, where both match
the reference),
`optax.MultiSteps` (with `context`/`value` forwarded), `optax.apply_if_finite`,
`optax.masked`, `optax.tree.map_params`, convergence on a parabola, Rosenbrock
and a mixed 1-D/2-D target (no context), and the loss passed as `value=`
through `optax.chain` reaching `entangle`.
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference_cegm as ref
import optax
import pytest

import cgf_optax

# A kernel [in, out], an attention-style kernel [in, heads, head_dim], a bias.
SHAPES = {"attn": {"kernel": (4, 2, 2)}, "dense": {"bias": (3,),
                                                   "kernel": (4, 3)}}
CONTEXT_SHAPES = {"attn/kernel": (2, 5, 4), "dense/kernel": (6, 4)}


def _params(dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s), dtype),
                      SHAPES, is_leaf=lambda x: isinstance(x, tuple))


def _context(dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed + 100)
  return {k: jnp.asarray(1.0 + rng.standard_normal(s), dtype)
          for k, s in CONTEXT_SHAPES.items()}


def _cegm(**kw):
  return cgf_optax.cegm(0.1, num_heads=2, adapt_rate=0.2, **kw)


def _cegm_adamw(**kw):
  return cgf_optax.cegm_adamw(1e-2, num_heads=2, adapt_rate=0.2, **kw)


FACTORIES = {
    "cegm": _cegm,
    "cegm_adamw": _cegm_adamw,
    "entangle": lambda **kw: cgf_optax.entangle(0.8, 0.2, **kw),
    "context_align": lambda **kw: cgf_optax.context_align(2, 0.5, 0.8, **kw),
    "normalize": lambda **kw: cgf_optax.normalize("leaf", **kw),
    "normalize-global": lambda **kw: cgf_optax.normalize("global", **kw),
}
ALIASES = ("cegm", "cegm_adamw")
ALL = tuple(FACTORIES)


def _extra(dtype=jnp.float32, seed=0, value=1.0):
  """The extra arguments a CEGM step takes (ignored by the others)."""
  return {"context": _context(dtype, seed), "value": jnp.asarray(value)}


def _assert_tree_close(a, b, rtol=1e-6, atol=1e-7):
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb
  for x, y in zip(la, lb, strict=True):
    np.testing.assert_allclose(np.asarray(x, np.float64),
                               np.asarray(y, np.float64), rtol=rtol, atol=atol)


def _dtypes(tree):
  return jax.tree.map(lambda x: jnp.asarray(x).dtype, tree)


# --------------------------------------------------------------------------
# jit, extra arguments, recompilation, dtypes (one compiled step per case).


# Every float dtype of the contract in one tree (so one compilation covers
# them): the kernels with a context in bfloat16 and float16, the bias in
# float32; float64 separately, under x64.
MIXED = {"attn": {"kernel": jnp.bfloat16},
         "dense": {"bias": jnp.float32, "kernel": jnp.float16}}


def _cast(tree, dtypes):
  return jax.tree.map(lambda x, d: x.astype(d), tree, dtypes)


@pytest.mark.parametrize("dtype", ["mixed", "float64"])
@pytest.mark.parametrize("name", ALL)
def test_jit_extra_args_dtypes_and_no_recompilation(name, dtype):
  """Under jit, with unknown extra kwargs: updates keep the param dtype, the
  state keeps its dtypes (both branches of a `lax.cond` agree, as Optax
  checks), and a second same-shaped call does not retrace."""
  x64 = (jax.enable_x64(True) if dtype == "float64"
         else contextlib.nullcontext())
  with x64:
    if dtype == "float64":
      dtypes = jax.tree.map(lambda _: jnp.float64, MIXED)
    else:
      dtypes = MIXED
    ctx_dtypes = {"attn/kernel": dtypes["attn"]["kernel"],
                  "dense/kernel": dtypes["dense"]["kernel"]}
    tx = FACTORIES[name]()
    params = _cast(_params(), dtypes)
    state0 = tx.init(params)
    traces = []

    @jax.jit
    def step(grads, state, extra):
      traces.append(None)
      updates, new = tx.update(grads, state, params, some_extra_arg=jnp.ones(3),
                               another=1.5, **extra)
      return updates, jax.lax.cond(True, lambda: new, lambda: state)

    state = state0
    for i in range(2):
      extra = _extra(seed=i, value=2.0 - i)
      extra["context"] = {k: v.astype(ctx_dtypes[k])
                          for k, v in extra["context"].items()}
      updates, state = step(_cast(_params(seed=i + 1), dtypes), state, extra)
      assert _dtypes(updates) == _dtypes(params)
      assert _dtypes(state) == _dtypes(state0)
      # Finite, except where Adam's own float16 arithmetic overflows (its
      # second moment underflows to 0 for small entries, as optax.adamw's
      # does): the contract asks for dtypes only there.
      for u, d in zip(jax.tree.leaves(updates), jax.tree.leaves(dtypes),
                      strict=True):
        if not (name == "cegm_adamw" and d == jnp.float16):
          assert np.all(np.isfinite(np.asarray(u, np.float32))), (name, d)
    assert len(traces) == 1


@pytest.mark.parametrize("name", ALL)
def test_init_on_shape_dtype_structs(name):
  tx = FACTORIES[name]()
  params = _params()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          params)
  shapes = lambda t: jax.tree.map(lambda x: (x.shape, x.dtype), t)
  assert shapes(tx.init(abstract)) == shapes(tx.init(params))


# --------------------------------------------------------------------------
# inject_hyperparams and schedules.

ALIAS_KW = dict(lam=0.8, adapt_rate=0.2, lam_bounds=(0.1, 0.95), num_heads=2,
                gamma=0.5, rho=0.8)


@pytest.mark.parametrize("factory,kw", [
    (cgf_optax.cegm, dict(learning_rate=0.1, **ALIAS_KW)),
    (cgf_optax.cegm_adamw, dict(learning_rate=1e-2, b1=0.8, weight_decay=0.1,
                                normalize_scope="global",
                                require_context=False, **ALIAS_KW)),
], ids=["cegm", "cegm_adamw"])
def test_inject_hyperparams_matches_plain_factory(factory, kw):
  plain = factory(**kw)
  injected = optax.inject_hyperparams(
      factory, static_args=cgf_optax.CEGM_STATIC_ARGS)(**kw)
  params = _params()
  s_plain, s_inj = plain.init(params), injected.init(params)
  step_plain = jax.jit(lambda g, s, p, e: plain.update(g, s, p, **e))
  step_inj = jax.jit(lambda g, s, p, e: injected.update(g, s, p, **e))
  for i in range(4):
    grads = _params(seed=i + 1)
    extra = _extra(seed=i, value=3.0 - 0.5 * i)
    u_plain, s_plain = step_plain(grads, s_plain, params, extra)
    u_inj, s_inj = step_inj(grads, s_inj, params, extra)
    _assert_tree_close(u_inj, u_plain, rtol=1e-5, atol=1e-7)
    _assert_tree_close(s_inj.inner_state, s_plain, rtol=1e-5, atol=1e-7)
    params = optax.apply_updates(params, u_plain)
  assert float(s_plain[0].lam) != ALIAS_KW["lam"]   # the losses moved λ
  # An injected hyper-parameter can be changed in the state (same compiled
  # step): halving the learning rate halves cegm's step.
  if factory is cgf_optax.cegm:
    grads, extra = _params(seed=9), _extra(seed=9)
    u1, _ = step_inj(grads, s_inj, params, extra)
    s_inj.hyperparams["learning_rate"] = jnp.asarray(0.05)
    u2, _ = step_inj(grads, s_inj, params, extra)
    _assert_tree_close(u2, jax.tree.map(lambda u: 0.5 * u, u1), rtol=1e-6)


# --------------------------------------------------------------------------
# MultiSteps, apply_if_finite, masked, map_params.


def _assert_reference(name, updates, grads, params, extra):
  """`updates` is one first step of FACTORIES[name] (by the NumPy reference,
  which `test_cegm_reference.py` matches to the package)."""
  kw = dict(num_heads=2, adapt_rate=0.2)
  rf = (ref.Cegm(0.1, **kw) if name == "cegm"
        else ref.CegmAdamW(1e-2, **kw))
  flat = lambda t: {k: np.asarray(v, np.float64)
                    for k, v in ref.flatten(t).items()}
  expected, _ = rf.update(flat(grads), rf.init(flat(params)), flat(params),
                          {k: np.asarray(v) for k, v in extra["context"].items()},
                          float(extra["value"]))
  actual = flat(updates)
  assert sorted(actual) == sorted(expected)
  for k in expected:
    np.testing.assert_allclose(actual[k], expected[k], rtol=2e-5, atol=2e-6,
                               err_msg=k)


@pytest.mark.parametrize("name", ALIASES)
def test_multisteps(name):
  inner = FACTORIES[name]()
  ms = optax.MultiSteps(inner, every_k_schedule=4)
  params = _params()
  state = ms.init(params)
  step = jax.jit(lambda g, s, e: ms.update(g, s, params, **e))
  grads = [_params(seed=i + 1) for i in range(8)]
  values = [5.0, 4.0, 3.0, 2.0, 1.9, 1.8, 1.7, 1.5]
  outs = []
  for i in range(8):
    u, state = step(grads[i], state, _extra(seed=i, value=values[i]))
    outs.append(u)
    if i < 3:   # the first updates are zero
      for leaf in jax.tree.leaves(u):
        np.testing.assert_array_equal(leaf, 0.0)
  # The 4th micro-step applies the inner optimizer to the mean gradient,
  # with the context and value of that call: the same as the plain chain.
  mean = jax.tree.map(lambda *g: sum(g) / 4, *grads[:4])
  _assert_reference(name, outs[3], mean, params, _extra(seed=3,
                                                        value=values[3]))
  # The extra arguments reached the inner chain: its loss is the 8th value
  # and λ moved from the 4th to the 8th loss (adapt_rate 0.2).
  ent = state.inner_opt_state[0]
  assert float(ent.prev_loss) == values[7]
  np.testing.assert_allclose(float(ent.lam), 0.9 + 0.2 * np.log(2.0 / 1.5),
                             rtol=1e-6)
  ali = state.inner_opt_state[1]
  assert int(ali.steps["dense"]["kernel"]) == 2
  # Without `context`, the error comes from inside the wrapped chain.
  with pytest.raises(ValueError, match="context"):
    ms.update(grads[0], ms.init(params), params, value=1.0)


@pytest.mark.parametrize("name", ALIASES)
def test_apply_if_finite(name):
  tx = optax.apply_if_finite(FACTORIES[name](), max_consecutive_errors=3)
  params = _params()
  state = tx.init(params)
  step = jax.jit(lambda g, s, e: tx.update(g, s, params, **e))
  u, state = step(_params(seed=1), state, _extra(value=2.0))
  assert any(np.any(leaf != 0) for leaf in jax.tree.leaves(u))
  inner_before = state.inner_state
  bad = _params(seed=2)
  bad["dense"]["kernel"] = bad["dense"]["kernel"].at[0, 0].set(jnp.nan)
  u, state = step(bad, state, _extra(value=1.0))
  for leaf in jax.tree.leaves(u):
    np.testing.assert_array_equal(leaf, 0.0)
  assert int(state.notfinite_count) == 1
  _assert_tree_close(state.inner_state, inner_before, rtol=0, atol=0)
  u, state = step(_params(seed=3), state, _extra(value=1.5))
  assert int(state.notfinite_count) == 0
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(u))
  # The value reached entangle through the wrapper: λ moved.
  np.testing.assert_allclose(float(state.inner_state[0].lam),
                             0.9 + 0.2 * np.log(2.0 / 1.5), rtol=1e-6)


@pytest.mark.parametrize("name", ALIASES)
def test_masked(name):
  mask = {"attn": {"kernel": True}, "dense": {"bias": False, "kernel": True}}
  tx = optax.masked(FACTORIES[name](), mask)
  params = _params()
  grads = _params(seed=1)
  u, _ = jax.jit(lambda g, s: tx.update(g, s, params, **_extra()))(
      grads, tx.init(params))
  # The masked-out leaf passes through untouched ...
  np.testing.assert_array_equal(u["dense"]["bias"], grads["dense"]["bias"])
  # ... and the others are what the chain gives on the kernels alone.
  sub = lambda t: {"attn": t["attn"], "dense": {"kernel": t["dense"]["kernel"]}}
  _assert_reference(name, sub(u), sub(grads), sub(params), _extra())


@pytest.mark.parametrize("name", ALL)
def test_map_params_identity(name):
  tx = FACTORIES[name]()
  state = tx.init(_params())
  mapped = optax.tree.map_params(tx, lambda v: v, state)
  _assert_tree_close(mapped, state, rtol=0, atol=0)


@pytest.mark.parametrize("name", ALL)
def test_map_params_maps_only_param_shaped_parts(name):
  """What map_params hands to `f` must be shaped like a param (contract 9).

  Its documented use, building the state's shardings from the params'
  (`map_params(opt, to_spec, state, params)`), relies on it.
  """
  tx = FACTORIES[name]()
  params = _params()
  state = tx.init(params)
  param_shapes = {p.shape for p in jax.tree.leaves(params)}
  seen = []
  optax.tree.map_params(tx, lambda v: seen.append(v.shape) or v, state)
  assert set(seen) <= param_shapes, f"mapped non-param shapes {set(seen)}"


@pytest.mark.parametrize("name", ALIASES)
def test_map_params_with_a_param_like_tree(name):
  """The documented use (optax.tree.map_params's docstring): map the state's
  param-shaped parts against a tree like the params (e.g. partition specs),
  everything else to None."""
  tx = FACTORIES[name]()
  params = _params()
  state = tx.init(params)
  seen = []

  def to_spec(value, param):
    seen.append((value.shape, param.shape))
    return param.shape

  optax.tree.map_params(tx, to_spec, state, params,
                        transform_non_params=lambda _: None)
  assert seen and all(v == p for v, p in seen), seen


# --------------------------------------------------------------------------
# Convergence (no context): parabola, Rosenbrock, mixed 1-D/2-D target.
#
# cegm's leaf-normalised steps have length η whatever the gradient, so it
# needs a decaying schedule to converge; cosine decay over the run does it.


def _parabola():
  x0 = jnp.array([-1.0, 10.0, 1.0])
  xf = jnp.array([1.0, -1.0, 1.0])
  return x0, xf, lambda p: jnp.sum((p - xf) ** 2)


def _rosenbrock():
  x0 = jnp.array([0.0, 0.0])
  xf = jnp.array([1.0, 1.0])
  return x0, xf, lambda p: (1 - p[0]) ** 2 + 100 * (p[1] - p[0] ** 2) ** 2


def _mixed():
  x0 = {"a": jnp.array([3.0, -2.0]), "b": jnp.array([[1.0, 2.0], [-1.0, 0.5]])}
  xf = {"a": jnp.array([-1.0, 1.0]), "b": jnp.array([[0.0, 1.0], [2.0, -1.0]])}
  return x0, xf, lambda p: sum(jnp.sum((p[k] - xf[k]) ** 2) for k in p)


NUM_STEPS = 10_000


CEGM = (cgf_optax.cegm, dict(
    learning_rate=optax.cosine_decay_schedule(0.3, NUM_STEPS)))
CEGM_ADAPTIVE = (cgf_optax.cegm, dict(
    learning_rate=optax.cosine_decay_schedule(0.3, NUM_STEPS),
    adapt_rate=0.05, normalize_scope="global"))
CEGM_ADAMW = (cgf_optax.cegm_adamw, dict(
    learning_rate=optax.cosine_decay_schedule(3e-2, NUM_STEPS),
    weight_decay=0.0))


@pytest.mark.parametrize("alias,kw,target", [
    (*CEGM, _parabola), (*CEGM, _rosenbrock), (*CEGM, _mixed),
    (*CEGM_ADAPTIVE, _rosenbrock),
    (*CEGM_ADAMW, _parabola), (*CEGM_ADAMW, _rosenbrock), (*CEGM_ADAMW, _mixed),
], ids=["cegm-parabola", "cegm-rosenbrock", "cegm-mixed",
        "cegm-adaptive-global-rosenbrock", "cegm_adamw-parabola",
        "cegm_adamw-rosenbrock", "cegm_adamw-mixed"])
def test_converges_without_context(alias, kw, target):
  tx = alias(**kw, require_context=False)
  x0, xf, objective = target()

  @jax.jit
  def run(x):
    def step(carry, _):
      x, state = carry
      loss, grads = jax.value_and_grad(objective)(x)
      updates, state = tx.update(grads, state, x, value=loss)
      return (optax.apply_updates(x, updates), state), None

    (x, _), _ = jax.lax.scan(step, (x, tx.init(x)), None, length=NUM_STEPS)
    return x

  x = run(x0)
  for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(xf), strict=True):
    np.testing.assert_allclose(a, b, rtol=3e-2, atol=3e-2)


# --------------------------------------------------------------------------
# The loss, passed as `value=` through optax.chain, reaches entangle.


def test_value_through_chain_adapts_lam():
  tx = optax.chain(optax.clip_by_global_norm(10.0),
                   cgf_optax.cegm_adamw(0.1, lam=0.5, adapt_rate=0.2,
                                        require_context=False))
  params = _params()
  state = tx.init(params)
  step = jax.jit(lambda g, s, v: tx.update(g, s, params, value=v))
  _, state = step(_params(seed=1), state, 2.0)
  ent = state[1][0]
  assert float(ent.lam) == 0.5           # the first loss only sets L_{t-1}
  assert float(ent.prev_loss) == 2.0
  _, state = step(_params(seed=2), state, 1.0)
  ent = state[1][0]
  # g = log(L_{t-1} / L_t), the default `loss_signal`.
  np.testing.assert_allclose(float(ent.lam), 0.5 + 0.2 * np.log(2.0),
                             rtol=1e-6)
  # (Without `value` λ stays fixed: `test_cegm_reference.py`, entangle.)
