"""`cgf_optax.cgfm` and `cgf_optax.cgfm_adamw` against the NumPy reference.

Each alias runs (jitted) for several steps on a tree with a square kernel, a
stacked [L, in, out] leaf, a bias, a scalar, a tall and a wide matrix; the
gradients change every step, the params move, the state is carried. The
reference gets the package's random initial basis (``lowrank``) and nothing
else from it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import optax
import pytest

import cgf_optax

SHAPES = {
    "dense/kernel": (6, 6),
    "dense/bias": (6,),
    "stack/kernel": (3, 4, 5),
    "scale": (),
    "tall": (10, 4),
    "wide": (4, 9),
}
STEPS = 6


def to_jax(flat):
  return ref.unflatten({p: jnp.asarray(x, jnp.float32) for p, x in flat.items()})


def start_slack(dref, g0):
  """How much to widen ``atol`` for a badly placed random start.

  The float32 subspace iteration keeps about eps32 / cos θ of accuracy, θ the
  largest principal angle between the random initial basis and the top
  singular subspace. With cos θ >= 0.01 (almost every start) the tolerance is
  as stated; a start nearly orthogonal to a top direction (cos θ ~ 3e-3 for
  one leaf here) legitimately differs from float64 by a few times more, as a
  pure-NumPy float32 iteration does too.
  """
  return max(1.0, 0.01 / max(dref.start_cosine(g0), 1e-4))


def run(tx, rtx, seed, tol):
  """Runs both for STEPS steps; compares the updates and the params."""
  rng = np.random.default_rng(seed)
  params = {p: ref.f32(rng.standard_normal(s)) for p, s in SHAPES.items()}
  grads = ref.grad_sequence(rng, STEPS, SHAPES)
  state = tx.init(to_jax(params))
  rtx.init(params, basis=ref.as_flat(state[0].basis))
  tol = dict(tol, atol=tol["atol"] * start_slack(rtx.decompose, grads[0]))
  update = jax.jit(tx.update)
  p_pkg, p_ref = to_jax(params), dict(params)
  budget = dict.fromkeys(params, 0.0)
  for step, g in enumerate(grads):
    u, state = update(to_jax(g), state, p_pkg)
    want = rtx.update(g, p_ref)
    got = ref.as_flat(u)
    for path in want:
      np.testing.assert_allclose(got[path], want[path], err_msg=f"{step} {path}",
                                 **tol)
      budget[path] += tol["atol"] + tol["rtol"] * np.abs(want[path]).max()
    p_pkg = optax.apply_updates(p_pkg, u)
    p_ref = {p: p_ref[p] + want[p] for p in p_ref}
  # The params differ by at most the updates' differences, summed, plus the
  # float32 rounding of each addition.
  got = ref.as_flat(p_pkg)
  for path in p_ref:
    np.testing.assert_allclose(got[path], p_ref[path], err_msg=path, rtol=1e-6,
                               atol=budget[path])
  return state


# ----------------------------------------------------------------------------
# cgfm: θ ← θ − η_t (1 + ‖∇adj‖/‖∇adj,0‖) ∇adj.

CGFM_CONFIGS = {
    "lowrank2": dict(strategy="lowrank", num_scales=2, refresh_every=1),
    "lowrank3-refresh3-schedule": dict(
        strategy="lowrank", num_scales=3, refresh_every=3,
        learning_rate=optax.cosine_decay_schedule(0.1, 6)),
    "temporal3-weights": dict(strategy="temporal", num_scales=3, local=0.8,
                              intermediate=1.5, global_=0.3),
    "mean2-leaf-maxfactor": dict(strategy="mean", num_scales=2, scope="leaf",
                                 max_factor=1.7),
    "lowrank2-momentum-ema": dict(strategy="lowrank", num_scales=2,
                                  refresh_every=2, momentum=0.9,
                                  reference="ema",
                                  global_=lambda path: 0.2 if "stack" in path
                                  else 0.6),
    "mean3-nesterov-overrides": dict(strategy="mean", num_scales=3,
                                     momentum=0.5, nesterov=True,
                                     overrides={"bias": "global",
                                                "wide": "lowrank"}),
}


@pytest.mark.parametrize("name", list(CGFM_CONFIGS))
def test_cgfm_matches_reference(name):
  kw = dict(CGFM_CONFIGS[name])
  lr = kw.pop("learning_rate", 0.1)
  kw.setdefault("rank", 2)
  if kw.get("num_scales") == 3 and kw["strategy"] == "lowrank":
    kw["intermediate_rank"] = 1
  tx = cgf_optax.cgfm(lr, **kw)
  rtx = ref.CGFMRef(lr, **kw)
  state = run(tx, rtx, list(CGFM_CONFIGS).index(name),
              tol=dict(rtol=1e-4, atol=1e-6))   # updates are O(η) = O(0.1)
  # The modulation factor reached the step: the last factor matches.
  mod_state = state[2]
  if kw.get("scope", "global") == "global":
    np.testing.assert_allclose(mod_state.factor, rtx.modulate.factor, rtol=1e-5)


def test_cgfm_first_step_is_twice_the_adjusted_gradient():
  """At step 0, ‖∇adj‖ = ‖∇adj,0‖: the factor is exactly 2."""
  params = {"w": jnp.array([[1.0, 2.0], [3.0, 6.0]])}
  tx = cgf_optax.cgfm(0.5, strategy="mean", local=1.0, global_=0.0)
  u, _ = tx.update(params, tx.init(params), params)
  # ∇adj = g − column means = [[-1, -2], [1, 2]]; step = −0.5 · 2 · ∇adj.
  np.testing.assert_allclose(u["w"], [[1.0, 2.0], [-1.0, -2.0]], rtol=1e-6)


# ----------------------------------------------------------------------------
# cgfm_adamw: u = −η_t (f_t · Adam(∇adj) + wd · θ), f_t from ‖∇adj‖.

ADAMW_CONFIGS = {
    "lowrank2": dict(strategy="lowrank", num_scales=2, refresh_every=1),
    "lowrank3-refresh3": dict(strategy="lowrank", num_scales=3, refresh_every=3,
                              weight_decay=0.1),
    "temporal2-schedule": dict(
        strategy="temporal", num_scales=2,
        learning_rate=optax.linear_schedule(0.01, 0.001, 5)),
    "mean3-nomaxfactor": dict(strategy="mean", num_scales=3, max_factor=None,
                              b1=0.8, b2=0.95),
    "mean2-nomodulation": dict(strategy="mean", num_scales=2, modulate=False,
                               weight_decay=0.05),
    "lowrank2-leaf-ema": dict(strategy="lowrank", num_scales=2, scope="leaf",
                              reference="ema", max_factor=1.8),
}


@pytest.mark.parametrize("name", list(ADAMW_CONFIGS))
def test_cgfm_adamw_matches_reference(name):
  kw = dict(ADAMW_CONFIGS[name])
  lr = kw.pop("learning_rate", 0.01)
  kw.setdefault("rank", 2)
  if kw.get("num_scales") == 3 and kw["strategy"] == "lowrank":
    kw["intermediate_rank"] = 1
  kw.setdefault("weight_decay", 0.01)
  tx = cgf_optax.cgfm_adamw(lr, **kw)
  rtx = ref.CGFMAdamWRef(lr, **kw)
  # Adam divides by sqrt(v̂): an entry of ∇adj that is small relative to the
  # leaf carries its float32 rounding error (~1e-7 ‖∇adj‖) amplified in
  # relative terms, so updates (O(η) = O(0.01)) match to ~1e-4 relative.
  run(tx, rtx, 100 + list(ADAMW_CONFIGS).index(name),
      tol=dict(rtol=1e-4, atol=1e-7))


def test_cgfm_adamw_factor_reaches_the_step():
  """With wd = 0 and b1 = 0, the step is −η f sign-like(g): f is visible."""
  params = {"w": jnp.zeros(2)}
  tx = cgf_optax.cgfm_adamw(1.0, b1=0.0, b2=0.0, adam_eps=1e-30, weight_decay=0.0,
                            max_factor=None)
  state = tx.init(params)
  u, state = tx.update({"w": jnp.array([3.0, 4.0])}, state, params)
  np.testing.assert_allclose(u["w"], [-2.0, -2.0], rtol=1e-6)    # f = 1 + 5/5
  u, state = tx.update({"w": jnp.array([0.0, 10.0])}, state, params)
  # Adam with b1 = b2 = 0 is sign(g) (0 where g is 0); f = 1 + 10/5.
  np.testing.assert_allclose(u["w"], [0.0, -3.0], rtol=1e-6)
