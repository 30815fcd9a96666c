"""The CEGM transforms and aliases against the NumPy float64 reference.

The package runs in float32 (eagerly, which is cheaper here than compiling
every chain; one case of each alias runs under ``jax.jit``, and
`test_cegm_contract.py` checks jit against eager), the reference
(`numpy_reference_cegm.py`, written from the docstrings) in float64, over 6
steps with the state carried, gradients and contexts that change every step,
contexts of shape ``[batch, seq, fan_in]`` and ``[tokens, fan_in]``, 2-D and
3-D (``[in, heads, head_dim]``) kernels, and leaves without a context.

Tolerances: every output is O(1e-2..1) (normalised directions, or gradients of
unit scale) and comes out of a few dozen float32 operations per step (a
softmax over <= 6 tokens, norms over <= 48 entries, Adam's moment ratio), so
its float32 rounding error is ~10 ulp (~1e-6 relative), compounded over 6
steps of state; ``rtol=2e-5, atol=2e-6`` leaves a 10x margin while still
catching any wrong formula (a changed coefficient, a missed bias correction
or a wrong axis moves the results by >= 1e-2).
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference_cegm as ref
import optax
import pytest

import cgf_optax

RTOL, ATOL = 2e-5, 2e-6
STEPS = 6

# Sorted paths: attn/qkv/kernel [in, heads, hd], head/kernel (fan-in 5: no
# heads for num_heads=2, never a context), mlp/bias, mlp/kernel, out/kernel
# (2-D, no context: passes through), scale (a scalar).
SHAPES = {
    "attn": {"qkv": {"kernel": (8, 2, 3)}},
    "head": {"kernel": (5, 3)},
    "mlp": {"bias": (6,), "kernel": (8, 6)},
    "out": {"kernel": (6, 4)},
    "scale": (),
}
# Context shapes: [batch, seq, fan_in] for the 3-D kernel, [tokens, fan_in]
# for the 2-D one.
CONTEXT_SHAPES = {"attn/qkv/kernel": (2, 3, 8), "mlp/kernel": (5, 8)}
LOSSES = (2.0, 1.5, 1.8, float("nan"), 1.2, float("inf"))


def _tree(rng, scale=1.0):
  return jax.tree.map(
      lambda s: jnp.asarray(scale * rng.standard_normal(s), jnp.float32),
      SHAPES, is_leaf=lambda x: isinstance(x, tuple))


def _contexts(rng, step):
  """Contexts with a mean direction (so the EMA matters) plus noise."""
  out = {}
  for path, shape in CONTEXT_SHAPES.items():
    base = np.linspace(-1.0, 1.0, shape[-1]) + 0.3 * step
    c = base + rng.standard_normal(shape)
    out[path] = jnp.asarray(c, jnp.float32)
  if step == 2:      # a step where one kernel has no context
    del out["mlp/kernel"]
  return out


def _flat(tree):
  """A package tree (nested dicts) -> ``{path: float64 array or None}``."""
  return {k: None if v is None else np.asarray(v, np.float64)
          for k, v in ref.flatten(tree).items()}


def _close(actual, expected, what):
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected,
                             rtol=RTOL, atol=ATOL, err_msg=what)


def _close_flat(actual_tree, expected_flat, what):
  actual = _flat(actual_tree)
  assert sorted(actual) == sorted(expected_flat), what
  for k, e in expected_flat.items():
    if e is None:
      assert actual[k] is None, f"{what}: {k}"
    else:
      _close(actual[k], e, f"{what}: {k}")


def _np(tree):
  return {k: np.asarray(v, np.float64) for k, v in ref.flatten(tree).items()}


# --------------------------------------------------------------------------
# entangle.


@pytest.mark.parametrize("loss_signal", ["log_ratio", "relative"])
@pytest.mark.parametrize("adapt_rate", [0.0, 0.5])
def test_entangle_matches_reference(adapt_rate, loss_signal):
  rng = np.random.default_rng(0)
  kw = dict(lam=0.6, adapt_rate=adapt_rate, lam_bounds=(0.2, 0.95),
            loss_signal=loss_signal)
  tx, rf = cgf_optax.entangle(**kw), ref.Entangle(**kw)
  params = _tree(rng)
  state, rstate = tx.init(params), rf.init(_np(params))
  update = tx.update
  # Values: a loss every step but one (step 4: no `value`, lam stays fixed);
  # the NaN and inf losses must change nothing.
  values = [2.0, 1.5, 1.8, float("nan"), None, 1.2, float("inf"), 1.0]
  for step, value in enumerate(values):
    grads = _tree(rng)
    if step == 5:   # a non-finite gradient entry must not enter G_{t-1}
      grads["mlp"]["kernel"] = grads["mlp"]["kernel"].at[1, 2].set(jnp.nan)
    kwargs = {} if value is None else {"value": jnp.float32(value)}
    out, state = update(grads, state, **kwargs)
    rout, rstate = rf.update(_np(grads), rstate, value)
    for k, e in rout.items():
      np.testing.assert_allclose(np.asarray(ref.flatten(out)[k], np.float64),
                                 e, rtol=RTOL, atol=ATOL,
                                 err_msg=f"step {step}: {k}")
    _close_flat(state.prev, rstate["prev"], f"step {step}: prev")
    _close(state.lam, rstate["lam"], f"step {step}: lam")
    _close(state.prev_loss, rstate["prev_loss"], f"step {step}: prev_loss")
    assert bool(state.has_loss) == rstate["has_loss"], step
    assert int(state.count) == step + 1
  if adapt_rate:
    assert float(state.lam) != kw["lam"]     # the losses did move lam
  else:
    assert float(state.lam) == np.float32(kw["lam"])


# --------------------------------------------------------------------------
# context_align.


@pytest.mark.parametrize("num_heads", [1, 2])
def test_context_align_matches_reference(num_heads):
  rng = np.random.default_rng(1)
  kw = dict(num_heads=num_heads, gamma=0.7, rho=0.8)
  tx, rf = cgf_optax.context_align(**kw), ref.ContextAlign(**kw)
  params = _tree(rng)
  state, rstate = tx.init(params), rf.init(_np(params))
  _close_flat(state.context, rstate["ema"], "init")
  update = tx.update
  for step in range(STEPS):
    grads = _tree(rng)
    ctx = _contexts(rng, step)
    if step == 4:   # a non-finite context: its EMA must not change
      ctx["attn/qkv/kernel"] = ctx["attn/qkv/kernel"].at[0, 1, 3].set(jnp.inf)
    out, state = update(grads, state, context=ctx)
    rout, rstate = rf.update(_np(grads), rstate,
                             {k: np.asarray(v) for k, v in ctx.items()})
    _close_flat(out, rout, f"step {step}: updates")
    _close_flat(state.context, rstate["ema"], f"step {step}: EMA")
    steps = {k: None if v is None else int(v)
             for k, v in ref.flatten(state.steps).items()}
    assert steps == rstate["steps"], step
  # Leaves without a context passed through bit for bit.
  np.testing.assert_array_equal(out["out"]["kernel"], grads["out"]["kernel"])
  np.testing.assert_array_equal(out["mlp"]["bias"], grads["mlp"]["bias"])
  np.testing.assert_array_equal(out["scale"], grads["scale"])
  # The amplification really happened on the kernels with a context.
  assert not np.allclose(out["mlp"]["kernel"], grads["mlp"]["kernel"])


def test_context_align_first_step_is_mean_pooling():
  """At the first step the pooled context is the token mean (m_hat = 0)."""
  rng = np.random.default_rng(2)
  tx = cgf_optax.context_align(num_heads=2, gamma=1.0, rho=0.9)
  params = {"w": jnp.zeros((4, 3))}
  c = jnp.asarray(rng.standard_normal((7, 4)), jnp.float32)
  g = {"w": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32)}
  out, state = tx.update(g, tx.init(params), context={"w": c})
  mean = np.asarray(c, np.float64).mean(0)
  # EMA after one step: (1 - rho) * mean, per head.
  np.testing.assert_allclose(state.context["w"],
                             0.1 * mean.reshape(2, 2), rtol=1e-5, atol=1e-7)
  Q = np.zeros((4, 2))
  for h in range(2):
    u = mean[2 * h:2 * h + 2]
    Q[2 * h:2 * h + 2, h] = u / np.linalg.norm(u)
  G = np.asarray(g["w"], np.float64)
  np.testing.assert_allclose(out["w"], G + Q @ Q.T @ G, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------
# normalize.


@pytest.mark.parametrize("scope", ["leaf", "global"])
def test_normalize_matches_reference(scope):
  rng = np.random.default_rng(3)
  tx, rf = cgf_optax.normalize(scope, eps=1e-3), ref.Normalize(scope, 1e-3)
  params = _tree(rng)
  state = tx.init(params)
  update = tx.update
  for step in range(3):
    grads = _tree(rng, scale=10.0 ** (step - 1))
    out, state = update(grads, state)
    rout, rstate = rf.update(_np(grads))
    _close_flat(out, rout, f"step {step}")
    if scope == "global":
      _close(state.norm, rstate["norm"], "norm")
    else:
      _close_flat(state.norm, rstate["norm"], "norms")


# --------------------------------------------------------------------------
# The aliases.


def _run_alias(tx, rf, *, seed, move_params, jit=False):
  rng = np.random.default_rng(seed)
  params = _tree(rng)
  state, rstate = tx.init(params), rf.init(_np(params))
  update = jax.jit(tx.update) if jit else tx.update
  for step in range(STEPS):
    grads = _tree(rng)
    ctx = _contexts(rng, step)
    value = LOSSES[step % len(LOSSES)]
    out, state = update(grads, state, params, context=ctx,
                        value=jnp.float32(value))
    rout, rstate = rf.update(_np(grads), rstate, _np(params),
                             {k: np.asarray(v) for k, v in ctx.items()}, value)
    _close_flat(out, rout, f"step {step}: updates")
    ent, ali = state[0], state[1]
    _close(ent.lam, rstate["entangle"]["lam"], f"step {step}: lam")
    _close_flat(ent.prev, rstate["entangle"]["prev"], f"step {step}: prev")
    _close_flat(ali.context, rstate["align"]["ema"], f"step {step}: EMA")
    if move_params:
      params = optax.apply_updates(params, out)
  return state, rstate


@pytest.mark.parametrize("num_heads,scope", [(1, "leaf"), (2, "leaf"),
                                             (2, "global")])
def test_cegm_matches_reference(num_heads, scope):
  lr = optax.linear_schedule(0.3, 0.05, STEPS)
  kw = dict(lam=0.7, adapt_rate=0.3, lam_bounds=(0.1, 0.9),
            num_heads=num_heads, gamma=0.5, rho=0.75, normalize_scope=scope)
  tx = cgf_optax.cegm(lr, **kw)
  rf = ref.Cegm(lambda t: 0.3 + (0.05 - 0.3) * min(t, STEPS) / STEPS, **kw)
  _run_alias(tx, rf, seed=4 + num_heads, move_params=True,
             jit=scope == "global")


@pytest.mark.parametrize("num_heads,scope", [(1, "leaf"), (2, "global"),
                                             (2, None)])
def test_cegm_adamw_matches_reference(num_heads, scope):
  kw = dict(lam=0.8, adapt_rate=0.2, num_heads=num_heads, gamma=1.5,
            rho=0.9, normalize_scope=scope)
  # One case with the learning rate as a constant schedule: it must give
  # what the scalar gives (the Optax contract), i.e. the reference.
  lr = optax.constant_schedule(1e-2) if num_heads == 1 else 1e-2
  tx = cgf_optax.cegm_adamw(lr, 0.8, 0.95, 1e-8, 0.1, **kw)
  rf = ref.CegmAdamW(1e-2, 0.8, 0.95, 1e-8, 0.1, **kw)
  state, rstate = _run_alias(tx, rf, seed=7 + num_heads, move_params=True,
                             jit=scope == "global")
  adam = state[3]
  _close_flat(adam.mu, rstate["mu"], "mu")
  _close_flat(adam.nu, rstate["nu"], "nu")
  assert int(adam.count) == STEPS
