"""`cgf_optax.decompose` against the NumPy reference, and its properties."""

import re
import subprocess
import sys
import textwrap

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cgf_optax

# float32 package vs float64 reference. Parts are O(1) here (inputs are O(1)).
TOL = dict(rtol=1e-4, atol=1e-5)
STRATEGIES = ("lowrank", "temporal", "mean")
SETTINGS = settings(max_examples=25, deadline=None)

# A 2-D kernel (square), a stacked [L, in, out] leaf, a bias, a scalar, a tall
# and a wide matrix.
SHAPES = {
    "dense/kernel": (6, 6),
    "dense/bias": (6,),
    "stack/kernel": (3, 4, 5),
    "scale": (),
    "tall": (10, 4),
    "wide": (4, 9),
}


spectral, f32 = ref.spectral, ref.f32


def grad_sequence(rng, steps, shapes=SHAPES):
  return ref.grad_sequence(rng, steps, shapes)


def make_grads(rng, shapes=SHAPES):
  return ref.grad_sequence(rng, 1, shapes)[0]


def to_jax(flat, dtype=jnp.float32):
  return ref.unflatten({p: jnp.asarray(x, dtype) for p, x in flat.items()})


def assert_parts_close(got, want, **tol):
  assert set(got) == set(want)
  for path in want:
    for s in ref.SCALES:
      g, w = got[path][s], want[path][s]
      assert (g is None) == (w is None), (path, s)
      if w is not None:
        np.testing.assert_allclose(g, w, err_msg=f"{path}.{s}", **(tol or TOL))


def run_against_reference(tx, rtx, grads_seq, check_state=True):
  """Runs ``tx`` (jitted) and ``rtx`` over the gradients; compares each step.

  Precision note: the float32 subspace iteration keeps about eps32 / cos θ of
  absolute accuracy, θ the largest principal angle between the random start
  and the top subspace. With cos θ >= 0.01 (almost every start) the tolerance
  is TOL; a start nearly orthogonal to a top direction (cos θ ~ 1e-3, seen
  with some seeds) differs from float64 by a few 1e-5, as a pure-NumPy
  float32 iteration does too, so ``atol`` is widened by 0.01 / cos θ then.
  """
  params = to_jax(grads_seq[0])
  state = tx.init(params)
  rtx.init({p: np.zeros_like(x) for p, x in grads_seq[0].items()},
           basis=ref.as_flat(state.basis))
  slack = max(1.0, 0.01 / max(rtx.start_cosine(grads_seq[0]), 1e-4))
  tol = dict(TOL, atol=TOL["atol"] * slack)
  update = jax.jit(tx.update)
  for step, flat in enumerate(grads_seq):
    out, state = update(to_jax(flat), state)
    want = rtx.update(flat)
    got = ref.as_flat(out)
    try:
      assert_parts_close(got, want, **tol)
    except AssertionError as e:
      raise AssertionError(f"step {step}: {e}") from e
    if not check_state:
      continue
    assert int(state.count) == step + 1
    basis = ref.as_flat(state.basis)
    for path, plan in rtx.plans.items():
      if plan.kind == "lowrank":
        # Q's columns are fixed only up to sign (and, within a band, up to
        # rotation): QR's sign convention is not part of the maths, so the
        # bases are compared through their projectors Q Qᵀ, which are unique.
        q = basis[path]
        for band, cols in (("global", slice(0, plan.rank)),
                           ("intermediate", slice(plan.rank, None))):
          qb = q[..., cols]
          np.testing.assert_allclose(
              qb @ np.swapaxes(qb, -1, -2), rtx.projector(path, band),
              err_msg=f"step {step} {path} {band}", **tol)
      elif plan.kind == "temporal":
        np.testing.assert_allclose(ref.as_flat(state.slow)[path],
                                   rtx.slow[path], **TOL)
        if rtx.num_scales == 3:
          np.testing.assert_allclose(ref.as_flat(state.fast)[path],
                                     rtx.fast[path], **TOL)
  return state, got


CONFIGS = [
    ("lowrank", 2, 1), ("lowrank", 2, 3), ("lowrank", 3, 1), ("lowrank", 3, 3),
    ("temporal", 2, 1), ("temporal", 3, 1), ("mean", 2, 1), ("mean", 3, 1),
]


@pytest.mark.parametrize("strategy,num_scales,refresh_every", CONFIGS)
def test_matches_reference(strategy, num_scales, refresh_every, seed=0):
  rng = np.random.default_rng([seed, CONFIGS.index(
      (strategy, num_scales, refresh_every))])
  kw = dict(rank=2, refresh_every=refresh_every, intermediate_rank=1,
            fast_decay=0.8, slow_decay=0.95)
  tx = cgf_optax.decompose(strategy, num_scales, **kw)
  rtx = ref.DecomposeRef(strategy, num_scales, **kw)
  run_against_reference(tx, rtx, grad_sequence(rng, 6))


def test_matches_reference_more_power_iterations():
  rng = np.random.default_rng(1)
  kw = dict(rank=1, refresh_every=2, intermediate_rank=2, power_iters=2,
            init_power_iters=3)
  tx = cgf_optax.decompose("lowrank", 3, **kw)
  rtx = ref.DecomposeRef("lowrank", 3, **kw)
  run_against_reference(tx, rtx, grad_sequence(rng, 5))


def test_refresh_every_step_matches_reference():
  """refresh_every=1 with equal iteration counts: the conditional-free path."""
  rng = np.random.default_rng(3)
  kw = dict(rank=2, refresh_every=1, power_iters=2, init_power_iters=2)
  tx = cgf_optax.decompose("lowrank", 2, **kw)
  rtx = ref.DecomposeRef("lowrank", 2, **kw)
  run_against_reference(tx, rtx, grad_sequence(rng, 4))


@pytest.mark.parametrize("num_scales", [2, 3])
def test_same_shape_leaves_refresh_like_single_leaves(num_scales):
  """Leaves of one shape share a batched QR; each must still get exactly
  the basis it gets alone (and the NumPy reference's), including a zero
  gradient (keeps its basis) next to non-zero ones."""
  rng = np.random.default_rng(4)
  shapes = {f"layer{i}/w": (8, 5) for i in range(3)} | {"odd": (5, 8)}
  kw = dict(rank=2, intermediate_rank=1, refresh_every=2, power_iters=2,
            init_power_iters=3)
  seq = grad_sequence(rng, 4, shapes)
  seq[2]["layer1/w"] = np.zeros((8, 5), np.float32)
  together = cgf_optax.decompose("lowrank", num_scales, **kw)
  rtx = ref.DecomposeRef("lowrank", num_scales, **kw)
  state, _ = run_against_reference(together, rtx, seq)
  start = ref.as_flat(together.init(to_jax(seq[0])).basis)
  final = ref.as_flat(state.basis)
  for path in shapes:
    alone = cgf_optax.decompose("lowrank", num_scales, **kw)
    st = alone.init(to_jax({path: seq[0][path]}))
    st = st._replace(basis=ref.unflatten({path: jnp.asarray(start[path])}))
    update = jax.jit(alone.update)
    for g in seq:
      _, st = update(to_jax({path: g[path]}), st)
    np.testing.assert_allclose(ref.as_flat(st.basis)[path], final[path],
                               rtol=1e-5, atol=1e-5, err_msg=path)


def test_many_same_shape_leaves_run_on_cpu():
  """A transformer-shaped tree (10 layers, four shapes): several steps run
  to completion. (Several batched LAPACK QRs in one CPU program were seen to
  hang XLA's CPU runtime; the CPU path does one QR per leaf.) In a
  subprocess, so that a hang fails the test instead of the suite."""
  code = textwrap.dedent("""
      import jax, jax.numpy as jnp, cgf_optax
      d = 256
      layer = lambda: {"qkv": (d, 3 * d), "o": (d, d), "up": (d, 4 * d),
                       "down": (4 * d, d)}
      shapes = {"embed": (2048, d), "layers": [layer() for _ in range(10)]}
      leaves, tdef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
      keys = jax.random.split(jax.random.key(0), len(leaves))
      g = tdef.unflatten([jax.random.normal(k, s) for k, s in zip(keys, leaves)])
      for kw in ({}, {"refresh_every": 1, "init_power_iters": 1}):
        tx = cgf_optax.decompose("lowrank", **kw)
        state, update = tx.init(g), jax.jit(tx.update)
        for _ in range(4):
          _, state = update(g, state)
        jax.block_until_ready(state)
      print("ok")
  """)
  r = subprocess.run([sys.executable, "-c", code], capture_output=True,
                     text=True, timeout=240)
  assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def _hlo_ops(tx, grads) -> dict[str, int]:
  """Control-flow instructions of the compiled update."""
  state = tx.init(grads)
  text = jax.jit(tx.update).lower(grads, state).compile().as_text()
  return {op: len(re.findall(rf"\b{op}\(", text))
          for op in ("conditional", "while")}


@pytest.mark.parametrize("kw, conditionals", [
    (dict(refresh_every=1, power_iters=1, init_power_iters=1), 0),
    (dict(refresh_every=1, power_iters=1, init_power_iters=4), 1),
    (dict(refresh_every=10), 1),
    (dict(refresh_every=10, stagger=True), 1),
    (dict(refresh_every=10, power_iters=3, init_power_iters=5), 1),
])
def test_compiled_update_control_flow(kw, conditionals):
  """At most one conditional (the refresh), never a device-side loop: the
  subspace iterations are unrolled; none when every step refreshes the same
  way."""
  g = {"w": jnp.ones((6, 4)), "b": jnp.ones(4)}
  ops = _hlo_ops(cgf_optax.decompose("lowrank", 2, rank=2, **kw), g)
  assert ops == {"conditional": conditionals, "while": 0}


@pytest.mark.parametrize("num_scales", [2, 3])
def test_rank_larger_than_matrix_is_clamped(num_scales):
  """rank > min(m, n): the projection is the identity and local is zero."""
  rng = np.random.default_rng(2)
  tx = cgf_optax.decompose("lowrank", num_scales, rank=50, refresh_every=1)
  rtx = ref.DecomposeRef("lowrank", num_scales, rank=50, refresh_every=1)
  grads = grad_sequence(rng, 3)
  state, out = run_against_reference(tx, rtx, grads)
  for path, q in ref.as_flat(state.basis).items():
    if q is not None:     # the whole smaller side is tracked
      assert q.shape[-1] == q.shape[-2] == min(SHAPES[path][-2:])
  for path, parts in out.items():
    if len(SHAPES[path]) >= 2:
      assert parts["intermediate"] is None
      np.testing.assert_allclose(parts["global_"], grads[-1][path], **TOL)
      np.testing.assert_allclose(parts["local"], 0.0, atol=1e-5)


# ----------------------------------------------------------------------------
# Leaf rules and per-path overrides.


def _one_step(tx, grads):
  out, state = jax.jit(tx.update)(to_jax(grads), tx.init(to_jax(grads)))
  return ref.as_flat(out), state


def test_default_leaf_rules():
  rng = np.random.default_rng(3)
  grads = make_grads(rng)
  out, state = _one_step(cgf_optax.decompose("lowrank", 3, rank=2), grads)
  for path in ("dense/bias", "scale"):    # vectors and scalars: whole, local
    np.testing.assert_array_equal(out[path]["local"], grads[path])
    assert out[path]["intermediate"] is None and out[path]["global_"] is None
  basis = ref.as_flat(state.basis)
  assert basis["dense/bias"] is None and basis["scale"] is None
  assert basis["stack/kernel"].shape == (3, 4, 4)    # a batch of 3 matrices
  assert basis["tall"].shape == (1, 4, 4)            # the smaller (fan-out) side
  assert basis["wide"].shape == (1, 4, 4)            # the smaller (fan-in) side
  assert basis["dense/kernel"].shape == (1, 6, 4)    # rank + intermediate_rank
  # The stacked leaf is split matrix by matrix, as three separate leaves are.
  layers = {f"l{i}": grads["stack/kernel"][i] for i in range(3)}
  out_layers, _ = _one_step(
      cgf_optax.decompose("lowrank", 3, rank=2, init_power_iters=30), layers)
  out_stack, _ = _one_step(
      cgf_optax.decompose("lowrank", 3, rank=2, init_power_iters=30),
      {"stack": grads["stack/kernel"]})
  for i in range(3):
    for s in ref.SCALES:
      np.testing.assert_allclose(out_stack["stack"][s][i], out_layers[f"l{i}"][s],
                                 **TOL)

  out, _ = _one_step(cgf_optax.decompose("mean", vector_scale="global"), grads)
  for path in ("dense/bias", "scale"):
    np.testing.assert_array_equal(out[path]["global_"], grads[path])
    assert out[path]["local"] is None


def test_overrides_mapping_path_regex():
  rng = np.random.default_rng(4)
  shapes = {"dense/kernel": (6, 5), "dense/bias": (5,), "stack/kernel": (2, 4, 6),
            "other": (5, 6)}
  overrides = {"bias": "global", "kernel": "mean"}
  tx = cgf_optax.decompose("lowrank", 2, rank=2, overrides=overrides)
  rtx = ref.DecomposeRef("lowrank", 2, rank=2, overrides=overrides)
  grads = grad_sequence(rng, 4, shapes)
  state, out = run_against_reference(tx, rtx, grads)
  g = grads[-1]
  # "bias" -> the whole leaf is global.
  np.testing.assert_array_equal(out["dense/bias"]["global_"], g["dense/bias"])
  assert out["dense/bias"]["local"] is None
  # "kernel" -> mean over the fan-in axis (per layer for the stacked leaf).
  for path in ("dense/kernel", "stack/kernel"):
    np.testing.assert_allclose(
        out[path]["global_"],
        np.broadcast_to(g[path].mean(axis=-2, keepdims=True), g[path].shape),
        **TOL)
  # Everything else: the transform's strategy (lowrank keeps a basis).
  basis = ref.as_flat(state.basis)
  assert basis["other"] is not None
  assert basis["dense/kernel"] is None and basis["stack/kernel"] is None


def test_overrides_callable_and_leaf_rule():
  rng = np.random.default_rng(5)

  def rule(path, leaf):
    if leaf.ndim == 1:
      return "temporal"
    if path == "scale":
      return "mean"
    if path == "wide":
      return cgf_optax.LeafRule(strategy="mean",
                                axes=cgf_optax.MatrixAxes(fan_in=1, fan_out=0))
    return None

  kw = dict(rank=2, overrides=rule, slow_decay=0.9)
  tx = cgf_optax.decompose("lowrank", 2, **kw)
  rtx = ref.DecomposeRef("lowrank", 2, **kw)
  seq = grad_sequence(rng, 3)
  state, out = run_against_reference(tx, rtx, seq)
  grads = seq[-1]
  # A scalar sent to "mean" is its own mean: all global.
  np.testing.assert_allclose(out["scale"]["global_"], grads["scale"], **TOL)
  np.testing.assert_allclose(out["scale"]["local"], 0.0, atol=1e-6)
  # The swapped axes make the mean run over the last axis.
  np.testing.assert_allclose(
      out["wide"]["global_"],
      np.broadcast_to(grads["wide"].mean(axis=1, keepdims=True), (4, 9)), **TOL)
  assert ref.as_flat(state.slow)["dense/bias"] is not None


def test_vector_mean_override():
  g = {"b": np.array([1.0, 2.0, 6.0])}
  out, _ = _one_step(cgf_optax.decompose("mean", 3, overrides={"b": "mean"}), g)
  np.testing.assert_allclose(out["b"]["global_"], [3.0, 3.0, 3.0], **TOL)
  np.testing.assert_allclose(out["b"]["local"], [-2.0, -1.0, 3.0], **TOL)


def test_lowrank_override_on_a_vector_is_an_error():
  tx = cgf_optax.decompose("mean", overrides={"b": "lowrank"})
  with pytest.raises(ValueError, match="lowrank"):
    tx.init({"b": jnp.zeros(3)})


CONV = (3, 3, 2, 4)   # [h, w, in, out]


@pytest.mark.parametrize("num_scales", [2, 3])
def test_conv_kernel_matrix_axes_and_flatten(num_scales):
  rng = np.random.default_rng(6)
  g = {"conv": rng.standard_normal(CONV)}
  axes = cgf_optax.MatrixAxes(fan_in=(0, 1, 2), fan_out=3)
  flat_mean = g["conv"].mean(axis=(0, 1, 2), keepdims=True)
  by_axes, _ = _one_step(
      cgf_optax.decompose("mean", num_scales, overrides={"conv": axes}), g)
  by_flatten, _ = _one_step(
      cgf_optax.decompose("mean", num_scales, nd_rule="flatten"), g)
  by_batch, _ = _one_step(cgf_optax.decompose("mean", num_scales), g)
  if num_scales == 2:
    want_flat = np.broadcast_to(flat_mean, CONV)
    want_batch = np.broadcast_to(g["conv"].mean(axis=2, keepdims=True), CONV)
  else:    # global = the mean of the whole matrix (of each matrix for "batch")
    want_flat = np.broadcast_to(g["conv"].mean(), CONV)
    want_batch = np.broadcast_to(g["conv"].mean(axis=(2, 3), keepdims=True),
                                 CONV)
    np.testing.assert_allclose(
        by_axes["conv"]["intermediate"],
        np.broadcast_to(flat_mean - g["conv"].mean(), CONV), **TOL)
  np.testing.assert_allclose(by_axes["conv"]["global_"], want_flat, **TOL)
  np.testing.assert_allclose(by_flatten["conv"]["global_"], want_flat, **TOL)
  np.testing.assert_allclose(by_batch["conv"]["global_"], want_batch, **TOL)

  # lowrank on the same views: basis shapes, and the reference over steps.
  for kw, shape in ((dict(overrides={"conv": axes}), (1, 4, 4)),
                    (dict(nd_rule="flatten"), (1, 4, 4)),
                    (dict(), (9, 2, 3))):
    tx = cgf_optax.decompose("lowrank", num_scales, rank=2, intermediate_rank=1,
                             refresh_every=2, **kw)
    rtx = ref.DecomposeRef("lowrank", num_scales, rank=2, intermediate_rank=1,
                           refresh_every=2, **kw)
    assert ref.as_flat(tx.init(to_jax(g)).basis)["conv"].shape[:2] == shape[:2]
    # One [18, 4] matrix, or nine [2, 4] matrices, with a clear spectrum.
    mats = (spectral(rng, 1, 18, 4, 4) if shape[0] == 1
            else spectral(rng, 9, 2, 4, 4))
    run_against_reference(tx, rtx, [{"conv": f32(x.reshape(CONV))}
                                    for x in mats])


def test_attention_kernel_matrix_axes():
  rng = np.random.default_rng(7)
  g = {"attn": rng.standard_normal((5, 2, 3))}       # [embed, heads, head_dim]
  axes = cgf_optax.MatrixAxes(fan_in=0, fan_out=(1, 2))
  out, _ = _one_step(cgf_optax.decompose("mean", overrides={"attn": axes}), g)
  np.testing.assert_allclose(
      out["attn"]["global_"],
      np.broadcast_to(g["attn"].mean(axis=0, keepdims=True), (5, 2, 3)), **TOL)
  state = cgf_optax.decompose("lowrank", rank=2, overrides={"attn": axes}).init(
      to_jax(g))
  assert state.basis["attn"].shape == (1, 5, 2)      # one [5, 6] matrix


# ----------------------------------------------------------------------------
# Properties.

# No subnormals: XLA on CPU flushes them to zero.
FINITE = st.floats(-100, 100, width=32, allow_nan=False, allow_infinity=False,
                   allow_subnormal=False)
_JITTED = {}


def jitted(strategy, num_scales, **kw):
  """(tx, jit(tx.update)), one per configuration, so that hypothesis examples
  of one configuration share one compilation (the trees have fixed shapes;
  hypothesis draws the values)."""
  key = (strategy, num_scales, repr(sorted(kw.items())))
  if key not in _JITTED:
    tx = cgf_optax.decompose(strategy, num_scales, **kw)
    _JITTED[key] = (tx, jax.jit(tx.update))
  return _JITTED[key]


def draw_tree(data, shapes, elements=FINITE):
  return {p: data.draw(hnp.arrays(np.float32, shape, elements=elements),
                       label=p) for p, shape in shapes.items()}


# Leaves of rank 0 to 4, once per strategy: lowrank is the default, and
# overrides send the "mean/" and "temporal/" leaves (vectors and scalars
# included) to the other two strategies. One transform (and one compilation)
# per (num_scales, dtype) covers all three strategies.
_LEAVES = {"r0": (), "r1": (3,), "r2": (3, 5), "r2t": (5, 2), "r3": (2, 3, 4),
           "r4": (2, 2, 3, 2)}
SUM_SHAPES = {f"{s}/{p}": shape for s in STRATEGIES for p, shape in _LEAVES.items()}
SUM_OVERRIDES = (("^mean/", "mean"), ("^temporal/", "temporal"))


@SETTINGS
@given(data=st.data(), num_scales=st.sampled_from([2, 3]), bf16=st.booleans())
def test_parts_sum_to_input(data, num_scales, bf16):
  tx, update = jitted("lowrank", num_scales, rank=2, refresh_every=1,
                      overrides=dict(SUM_OVERRIDES))
  dtype = jnp.bfloat16 if bf16 else jnp.float32
  state = tx.init(ref.unflatten(
      {p: jnp.zeros(x, dtype) for p, x in SUM_SHAPES.items()}))
  scale = dict.fromkeys(SUM_SHAPES, 0.0)
  for _ in range(2):     # two steps: the temporal EMAs hold something
    g = {p: jnp.asarray(x, dtype) for p, x in draw_tree(data, SUM_SHAPES).items()}
    out, state = update(ref.unflatten(g), state)
    for path, parts in ref.flatten(out).items():
      assert all(p is None or p.dtype == dtype for p in parts)
      g64 = np.asarray(g[path], np.float64)
      # Temporal parts are as large as past gradients: the tolerance scales
      # with the largest gradient norm seen. One rounding per part: bfloat16
      # has 8 bits of mantissa, float32 24.
      scale[path] = max(scale[path], float(np.linalg.norm(g64)))
      total = ref.parts_total(ref.parts_of(parts))
      tol = (2e-2 if bf16 else 2e-6) * scale[path] + 1e-30
      np.testing.assert_allclose(total, g64, rtol=0, atol=tol, err_msg=path)
    # The overrides did reach the vectors and scalars.
    assert out["temporal"]["r1"].global_ is not None
    assert out["mean"]["r0"].global_ is not None
    assert out["lowrank"]["r1"].global_ is None


RANK_SHAPES = {"wide": (3, 6), "tall": (6, 3), "square": (4, 4),
               "stack": (2, 3, 5)}


@SETTINGS
@given(data=st.data(), rank=st.sampled_from([1, 2]),
       num_scales=st.sampled_from([2, 3]))
def test_lowrank_global_part_has_rank_at_most_r(data, rank, num_scales):
  tx, update = jitted("lowrank", num_scales, rank=rank, intermediate_rank=1,
                      refresh_every=1)
  g = draw_tree(data, RANK_SHAPES)
  out, _ = update(g, tx.init(g))
  for path, shape in RANK_SHAPES.items():
    gm = np.asarray(g[path], np.float64).reshape((-1,) + shape[-2:])
    s = min(shape[-2:])
    r = min(rank, s)
    checks = [(out[path].global_, r)]
    if num_scales == 3 and r < s:
      checks.append((out[path].intermediate, 1))
    top = np.linalg.svd(gm, compute_uv=False)[:, :1]
    for part, k in checks:
      sv = np.linalg.svd(np.asarray(part, np.float64).reshape(gm.shape),
                         compute_uv=False)
      # Singular values beyond k are float32 rounding noise.
      assert np.all(sv[:, k:] <= 1e-5 * top), (path, sv, k)


CONVERGE_SHAPES = {"wide": (3, 7), "tall": (8, 4), "square": (5, 5)}


@SETTINGS
@given(data=st.data(), rank=st.sampled_from([1, 2]),
       num_scales=st.sampled_from([2, 3]), seed=st.integers(0, 2**32 - 1))
def test_lowrank_subspace_converges_to_svd(data, rank, num_scales, seed):
  """A fixed gradient, σ_{r+1} <= σ_r / 5: the bands converge to the SVD's."""
  tx, update = jitted("lowrank", num_scales, rank=rank, intermediate_rank=1,
                      refresh_every=1, power_iters=1, init_power_iters=1)
  rng = np.random.default_rng(seed)
  g, sides, bands = {}, {}, {}
  for path, (m, n) in CONVERGE_SHAPES.items():
    s = min(m, n)
    r = min(rank, s)
    ir = 1 if num_scales == 3 and r < s else 0
    sig = np.concatenate([
        data.draw(hnp.arrays(np.float64, r, elements=st.floats(40, 80))),
        data.draw(hnp.arrays(np.float64, ir, elements=st.floats(4, 8))),
        data.draw(hnp.arrays(np.float64, s - r - ir,
                             elements=st.floats(0, 0.8)))])
    u = np.linalg.qr(rng.standard_normal((m, s)))[0]
    v = np.linalg.qr(rng.standard_normal((n, s)))[0]
    g[path] = f32((u * sig) @ v.T)
    # The basis lives on the smaller side: left singular vectors for a wide
    # (or square) matrix, right ones for a tall matrix.
    sides[path] = u if m <= n else v
    bands[path] = [(slice(0, r), slice(0, r))]
    if ir:
      bands[path].append((slice(r, r + ir), slice(r, r + ir)))
  gj = {p: jnp.asarray(x, jnp.float32) for p, x in g.items()}
  state = tx.init(gj)
  for _ in range(10):
    out, state = update(gj, state)
  for path, (m, n) in CONVERGE_SHAPES.items():
    q = np.asarray(state.basis[path][0], np.float64)
    side = sides[path]
    for qcols, scols in bands[path]:
      p, p_svd = q[:, qcols] @ q[:, qcols].T, side[:, scols] @ side[:, scols].T
      assert np.linalg.norm(p - p_svd, 2) < 1e-3, path
    r = bands[path][0][0].stop
    p_svd = side[:, :r] @ side[:, :r].T
    want = p_svd @ g[path] if m <= n else g[path] @ p_svd
    np.testing.assert_allclose(np.asarray(out[path].global_, np.float64), want,
                               rtol=0, atol=1e-4 * np.abs(g[path]).max())
