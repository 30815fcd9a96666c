"""An independent NumPy (float64) re-implementation of the cgf_optax maths.

Written from the transforms' docstrings (and the CGFM part of the design
note), not by calling the package: nothing here imports ``cgf_optax`` or
``jax``. The tests run the package's transforms under ``jax.jit`` in float32
and compare them, step by step with the state carried, to these classes.

Trees are nested dicts with string keys; the reference works on *flat* dicts
``{"dense/kernel": leaf}`` whose keys are the leaves' paths written the way
the package documents them (``'layers/0/attn/kernel'``). A decomposed leaf is
a dict ``{"local": ..., "intermediate": ..., "global_": ...}`` whose missing
parts are ``None``.

The one thing the reference cannot re-derive is the random initial basis of
``lowrank``: it takes it from the package (``tx.init(params).basis``), since
the start of the subspace iteration is random by design.

Contents: tree helpers (``flatten``, ``unflatten``, ``as_flat``), the
transforms (``DecomposeRef``, ``ScaleRef``, ``ModulateRef``), the aliases
(``CGFMRef``, ``CGFMAdamWRef``) and test-data generators (``spectral``,
``grad_sequence``).
"""

import inspect
import math
import re

import numpy as np

SCALES = ("local", "intermediate", "global_")
WHOLE = {"local": "local", "intermediate": "intermediate", "global": "global_",
         "global_": "global_"}
STRATEGIES = ("lowrank", "temporal", "mean")


# --------------------------------------------------------------------------
# Trees.


def flatten(tree, prefix=""):
  """Nested dicts -> ``{"a/b": leaf}`` (keys sorted, as JAX orders dicts)."""
  if isinstance(tree, dict):
    out = {}
    for k in sorted(tree):
      out.update(flatten(tree[k], f"{prefix}/{k}" if prefix else str(k)))
    return out
  return {prefix: tree}


def unflatten(flat):
  """``{"a/b": leaf}`` -> nested dicts."""
  out = {}
  for path, leaf in flat.items():
    *head, last = path.split("/")
    node = out
    for k in head:
      node = node.setdefault(k, {})
    node[last] = leaf
  return out


def parts_of(x):
  """A ``Scales``-like object (attributes local/intermediate/global_) -> dict."""
  return {s: None if getattr(x, s) is None
          else np.asarray(getattr(x, s), np.float64) for s in SCALES}


def is_parts(x):
  return isinstance(x, dict) and set(x) == set(SCALES)


def parts_total(parts):
  present = [p for p in parts.values() if p is not None]
  out = present[0]
  for p in present[1:]:
    out = out + p
  return out


# --------------------------------------------------------------------------
# Leaves as batches of matrices [batch, m, n] (m = fan-in, n = fan-out).


class View:
  """How a leaf of ``shape`` is seen as ``[batch, m, n]``."""

  def __init__(self, shape, fan_in=-2, fan_out=-1):
    nd = len(shape)
    as_axes = lambda a: tuple(
        x % nd for x in ((a,) if isinstance(a, int) else tuple(a)))
    fi, fo = as_axes(fan_in), as_axes(fan_out)
    batch_axes = tuple(a for a in range(nd) if a not in fi + fo)
    self.shape = tuple(shape)
    self.perm = batch_axes + fi + fo
    self.batch = math.prod(shape[a] for a in batch_axes)
    self.m = math.prod(shape[a] for a in fi)
    self.n = math.prod(shape[a] for a in fo)

  def to_matrix(self, x):
    return np.transpose(x, self.perm).reshape(self.batch, self.m, self.n)

  def from_matrix(self, x):
    x = np.broadcast_to(x, (self.batch, self.m, self.n))
    x = x.reshape([self.shape[a] for a in self.perm])
    return np.transpose(x, np.argsort(self.perm))


def _swap(x):
  return np.swapaxes(x, -1, -2)


# --------------------------------------------------------------------------
# decompose.


class Plan:
  def __init__(self, kind, scale=None, view=None, rank=0, k=0):
    self.kind, self.scale, self.view, self.rank, self.k = (
        kind, scale, view, rank, k)

  @property
  def left(self):
    """The basis lives on the smaller side: fan-in when ``m <= n``."""
    return self.view.m <= self.view.n

  @property
  def basis_shape(self):
    return (self.view.batch, min(self.view.m, self.view.n), self.k)


class DecomposeRef:
  """``decompose``: G = local + intermediate + global, per leaf, with state."""

  def __init__(self, strategy="lowrank", num_scales=2, rank=8, refresh_every=10,
               intermediate_rank=None, power_iters=1, init_power_iters=4,
               fast_decay=0.9, slow_decay=0.99, vector_scale="local",
               nd_rule="batch", overrides=None):
    self.strategy = strategy
    self.num_scales = num_scales
    self.rank = rank
    self.refresh_every = refresh_every
    self.intermediate_rank = (rank if intermediate_rank is None
                              else intermediate_rank)
    self.power_iters = power_iters
    self.init_power_iters = init_power_iters
    self.fast_decay = fast_decay
    self.slow_decay = slow_decay
    self.vector_scale = vector_scale
    self.nd_rule = nd_rule
    self.overrides = overrides

  # Leaf rules ------------------------------------------------------------

  @staticmethod
  def _rule(value):
    """-> (strategy or None, (fan_in, fan_out) or None), by duck typing."""
    if value is None:
      return None, None
    if isinstance(value, str):
      return value, None
    if hasattr(value, "fan_in"):          # a MatrixAxes
      return None, (value.fan_in, value.fan_out)
    axes = value.axes                      # a LeafRule
    return value.strategy, (None if axes is None
                            else (axes.fan_in, axes.fan_out))

  def _lookup(self, path, leaf):
    if self.overrides is None:
      return None, None
    if callable(self.overrides):
      return self._rule(self.overrides(path, leaf))
    for pattern, value in self.overrides.items():   # first match wins
      if re.search(pattern, path):
        return self._rule(value)
    return None, None

  def plan(self, path, leaf):
    rule_strategy, axes = self._lookup(path, leaf)
    strat = rule_strategy or self.strategy
    shape = np.shape(leaf)
    if strat in WHOLE:
      return Plan("whole", scale=WHOLE[strat])
    if len(shape) < 2 and axes is None:
      if rule_strategy is None or 0 in shape:
        return Plan("whole", scale=WHOLE[self.vector_scale])
      if strat == "lowrank":
        raise ValueError(f"lowrank asked for the non-matrix leaf {path}")
      return Plan(strat)                    # vector "temporal" or "mean"
    if strat == "temporal":
      return Plan("temporal")
    if axes is None:
      if len(shape) == 2 or self.nd_rule == "batch":
        axes = (-2, -1)
      else:                                 # "flatten": all but the last
        axes = (tuple(range(len(shape) - 1)), len(shape) - 1)
    view = View(shape, *axes)
    if 0 in shape:
      return Plan("whole", scale=WHOLE[self.vector_scale])
    if strat == "mean":
      return Plan("mean", view=view)
    s = min(view.m, view.n)
    r = min(self.rank, s)                   # rank clamped per leaf
    extra = self.intermediate_rank if self.num_scales == 3 else 0
    return Plan("lowrank", view=view, rank=r, k=min(r + extra, s))

  # State -----------------------------------------------------------------

  def init(self, params, basis=None, seed=0):
    """``params``/``basis``: flat dicts; ``basis`` from the package's state."""
    self.plans = {p: self.plan(p, x) for p, x in params.items()}
    self.count = 0
    self.basis, self.slow, self.fast = {}, {}, {}
    rng = np.random.default_rng(seed)
    for path, plan in self.plans.items():
      if plan.kind == "lowrank":
        if basis is not None:
          q = np.asarray(basis[path], np.float64)
          assert q.shape == plan.basis_shape, (path, q.shape, plan.basis_shape)
        else:
          q = np.linalg.qr(rng.standard_normal(plan.basis_shape))[0]
        self.basis[path] = q
      elif plan.kind == "temporal":
        self.slow[path] = np.zeros(np.shape(params[path]))
        self.fast[path] = np.zeros(np.shape(params[path]))
    return self

  def projector(self, path, band="global"):
    """The projector Q Qᵀ of the global (or intermediate) band of a leaf."""
    plan, q = self.plans[path], self.basis[path]
    q = q[..., :plan.rank] if band == "global" else q[..., plan.rank:]
    return q @ _swap(q)

  def start_cosine(self, grads):
    """The smallest cosine of the principal angles between the current bases
    and the top-k singular subspaces of ``grads`` (1 without lowrank leaves).

    Called after :meth:`init` with the first gradient, it measures how well
    the random start is placed: float32 subspace iteration keeps about
    ``eps32 / cos`` of absolute accuracy in the projector, so comparisons
    with the float32 package are scaled by it.
    """
    c = 1.0
    for path, plan in self.plans.items():
      if plan.kind == "lowrank":
        gm = self._oriented(plan, np.asarray(grads[path], np.float64))
        u = np.linalg.svd(gm)[0][..., :plan.k]
        cos = np.linalg.svd(_swap(u) @ self.basis[path], compute_uv=False)
        c = min(c, float(cos.min()))
    return c

  # Update ----------------------------------------------------------------

  def _oriented(self, plan, g):
    gm = plan.view.to_matrix(g)
    return gm if plan.left else _swap(gm)

  def _refresh(self, gm, q0, iters, rank):
    q = q0
    for _ in range(iters):                  # Q <- qr(G Gᵀ Q)
      q = np.linalg.qr(gm @ (_swap(gm) @ q))[0]
    if self.num_scales == 3 and q.shape[-1] > rank:
      b = _swap(q) @ gm                      # Rayleigh–Ritz: order by σ
      w, vecs = np.linalg.eigh(b @ _swap(b))
      order = np.argsort(-w, axis=-1)
      vecs = np.take_along_axis(vecs, order[:, None, :], axis=-1)
      q = q @ vecs
    # A non-finite or all-zero gradient keeps the previous basis.
    ok = (np.isfinite(gm).all(axis=(1, 2)) & (np.abs(gm).sum(axis=(1, 2)) > 0)
          & np.isfinite(q).all(axis=(1, 2)))
    return np.where(ok[:, None, None], q, q0)

  def _lowrank(self, plan, g, q):
    gm = self._oriented(plan, g)
    qg, qi = q[..., :plan.rank], q[..., plan.rank:]
    glob = qg @ (_swap(qg) @ gm)
    inter = qi @ (_swap(qi) @ gm) if plan.k > plan.rank else None
    local = gm - glob - (0 if inter is None else inter)

    def back(x):
      return plan.view.from_matrix(x if plan.left else _swap(x))

    return dict(local=back(local),
                intermediate=None if inter is None else back(inter),
                global_=back(glob))

  def _mean(self, plan, g):
    if plan.view is None:                    # a vector sent to "mean"
      glob = np.broadcast_to(np.mean(g), np.shape(g))
      return dict(local=g - glob, intermediate=None, global_=glob)
    gm = plan.view.to_matrix(g)
    col = gm.mean(axis=1, keepdims=True)     # mean over the fan-in axis
    if self.num_scales == 2:
      glob = plan.view.from_matrix(col)
      return dict(local=g - glob, intermediate=None, global_=glob)
    total = col.mean(axis=2, keepdims=True)  # mean of the whole matrix
    glob = plan.view.from_matrix(total)
    colb = plan.view.from_matrix(col)
    return dict(local=g - colb, intermediate=colb - glob, global_=glob)

  def _temporal(self, path, g):
    ok = np.isfinite(g)
    t = self.count + 1

    def ema(m, decay):
      return np.where(ok, decay * m + (1 - decay) * g, m)

    self.slow[path] = ema(self.slow[path], self.slow_decay)
    s_hat = self.slow[path] / (1 - self.slow_decay ** t)
    if self.num_scales == 2:
      return dict(local=g - s_hat, intermediate=None, global_=s_hat)
    self.fast[path] = ema(self.fast[path], self.fast_decay)
    f_hat = self.fast[path] / (1 - self.fast_decay ** t)
    return dict(local=g - f_hat, intermediate=f_hat - s_hat, global_=s_hat)

  def update(self, grads):
    """``grads``: flat dict -> flat dict of parts dicts."""
    grads = {p: np.asarray(g, np.float64) for p, g in grads.items()}
    if self.count % self.refresh_every == 0:
      iters = self.init_power_iters if self.count == 0 else self.power_iters
      for path, plan in self.plans.items():
        if plan.kind == "lowrank":
          gm = self._oriented(plan, grads[path])
          self.basis[path] = self._refresh(gm, self.basis[path], iters,
                                           plan.rank)
    out = {}
    for path, plan in self.plans.items():
      g = grads[path]
      if plan.kind == "whole":
        out[path] = {s: (g if s == plan.scale else None) for s in SCALES}
      elif plan.kind == "lowrank":
        out[path] = self._lowrank(plan, g, self.basis[path])
      elif plan.kind == "mean":
        out[path] = self._mean(plan, g)
      else:
        out[path] = self._temporal(path, g)
    self.count += 1
    return out


# --------------------------------------------------------------------------
# scale_by_scales.


def _is_path_fn(fn):
  try:
    params = list(inspect.signature(fn).parameters)
  except (TypeError, ValueError):
    return False
  return bool(params) and params[0] == "path"


class ScaleRef:
  """``scale_by_scales``: Σ_s λ_s part_s, λ a number, schedule or path fn."""

  def __init__(self, local=1.0, intermediate=1.0, global_=1.0):
    self.weights = dict(local=local, intermediate=intermediate,
                        global_=global_)
    self.count = 0

  def weight(self, name, path):
    w = self.weights[name]
    if callable(w) and _is_path_fn(w):
      w = w(path)
    if callable(w):
      w = w(self.count)                      # the transform's own step count
    return float(w)

  def update(self, parts):
    out = {}
    for path, x in parts.items():
      if not is_parts(x):
        out[path] = np.asarray(x, np.float64)   # plain leaves pass through
        continue
      out[path] = sum(self.weight(s, path) * x[s] for s in SCALES
                      if x[s] is not None)
    self.count += 1
    return out


# --------------------------------------------------------------------------
# modulate_by_gradient_norm.


def _sq_norm(x):
  if is_parts(x):
    return sum(_sq_norm(p) for p in x.values() if p is not None)
  return float(np.sum(np.square(np.asarray(x, np.float64))))


class ModulateRef:
  """``modulate_by_gradient_norm``: factor = 1 + ‖g‖ / ‖g₀‖ (bounded)."""

  def __init__(self, reference="first", max_factor=None, scope="global",
               eps=1e-12, ema_decay=0.99):
    self.reference, self.max_factor, self.scope = reference, max_factor, scope
    self.eps, self.ema_decay = eps, ema_decay
    self.ref, self.steps = {}, {}
    self.factor = None

  def factor_of(self, key, norm):
    ref, steps = self.ref.get(key, 0.0), self.steps.get(key, 0)
    ok = np.isfinite(norm)
    if self.reference == "first":
      # The reference is the first finite, non-zero norm.
      if ok and steps == 0 and norm > 0:
        ref, steps = norm, 1
      denom = ref
    else:
      # A bias-corrected EMA of the norm that includes the current one.
      d = self.ema_decay
      if ok:
        ref, steps = d * ref + (1 - d) * norm, steps + 1
      denom = ref / (1 - d ** steps) if steps > 0 else 0.0
    self.ref[key], self.steps[key] = ref, steps
    ratio = norm / max(denom, self.eps) if ok and denom > 0 else 0.0
    f = 1.0 + ratio
    if self.max_factor is not None:
      f = min(f, self.max_factor)
    return f

  def factors(self, updates):
    """Computes (and records in the state) the factor of each leaf."""
    if self.scope == "global":
      norm = math.sqrt(sum(_sq_norm(x) for x in updates.values()))
      f = self.factor_of("", norm)
      self.factor = f
      return {p: f for p in updates}
    self.factor = {p: self.factor_of(p, math.sqrt(_sq_norm(x)))
                   for p, x in updates.items()}
    return self.factor

  def update(self, updates):
    fs = self.factors(updates)

    def mul(x, f):
      if is_parts(x):
        return {s: None if p is None else p * f for s, p in x.items()}
      return np.asarray(x, np.float64) * f

    return {p: mul(x, fs[p]) for p, x in updates.items()}


# --------------------------------------------------------------------------
# The aliases.


def _lr(learning_rate, count):
  return float(learning_rate(count) if callable(learning_rate)
               else learning_rate)


class CGFMRef:
  """``cgfm``: θ ← θ − η_t · factor · ∇adj (optional heavy-ball momentum)."""

  def __init__(self, learning_rate, *, strategy="lowrank", num_scales=2,
               rank=8, refresh_every=10, intermediate_rank=None,
               power_iters=1, local=1.0, intermediate=1.0, global_=0.5,
               reference="first", max_factor=None, scope="global",
               momentum=None, nesterov=False, overrides=None):
    self.lr = learning_rate
    self.decompose = DecomposeRef(
        strategy, num_scales, rank, refresh_every,
        intermediate_rank=intermediate_rank, power_iters=power_iters,
        overrides=overrides)
    self.scale = ScaleRef(local, intermediate, global_)
    self.modulate = ModulateRef(reference, max_factor, scope)
    self.momentum, self.nesterov = momentum, nesterov

  def init(self, params, basis=None):
    self.decompose.init(params, basis)
    self.trace = {p: np.zeros(np.shape(x)) for p, x in params.items()}
    self.count = 0
    return self

  def update(self, grads, params=None):
    del params
    adj = self.scale.update(self.decompose.update(grads))
    u = self.modulate.update(adj)
    if self.momentum is not None:
      for p in u:
        self.trace[p] = u[p] + self.momentum * self.trace[p]
        u[p] = (u[p] + self.momentum * self.trace[p] if self.nesterov
                else self.trace[p])
    lr = _lr(self.lr, self.count)
    self.count += 1
    return {p: -lr * x for p, x in u.items()}


class CGFMAdamWRef:
  """``cgfm_adamw``: −η_t (f_t · Adam(∇adj) + wd · θ), f_t from ‖∇adj‖."""

  def __init__(self, learning_rate, b1=0.9, b2=0.999, eps=1e-8,
               weight_decay=1e-4, *, strategy="lowrank", num_scales=2, rank=8,
               refresh_every=10, intermediate_rank=None, power_iters=1,
               local=1.0, intermediate=1.0, global_=0.5, modulate=True,
               reference="first", max_factor=2.0, scope="global",
               overrides=None):
    self.lr, self.b1, self.b2, self.eps, self.wd = (
        learning_rate, b1, b2, eps, weight_decay)
    self.decompose = DecomposeRef(
        strategy, num_scales, rank, refresh_every,
        intermediate_rank=intermediate_rank, power_iters=power_iters,
        overrides=overrides)
    self.scale = ScaleRef(local, intermediate, global_)
    self.modulate = (ModulateRef(reference, max_factor, scope) if modulate
                     else None)

  def init(self, params, basis=None):
    self.decompose.init(params, basis)
    self.mu = {p: np.zeros(np.shape(x)) for p, x in params.items()}
    self.nu = {p: np.zeros(np.shape(x)) for p, x in params.items()}
    self.count = 0
    return self

  def update(self, grads, params):
    adj = self.scale.update(self.decompose.update(grads))
    fs = (self.modulate.factors(adj) if self.modulate is not None
          else dict.fromkeys(adj, 1.0))
    t = self.count + 1
    lr = _lr(self.lr, self.count)
    out = {}
    for p, g in adj.items():
      self.mu[p] = self.b1 * self.mu[p] + (1 - self.b1) * g
      self.nu[p] = self.b2 * self.nu[p] + (1 - self.b2) * g * g
      mu_hat = self.mu[p] / (1 - self.b1 ** t)
      nu_hat = self.nu[p] / (1 - self.b2 ** t)
      direction = fs[p] * mu_hat / (np.sqrt(nu_hat) + self.eps)
      out[p] = -lr * (direction + self.wd * np.asarray(params[p], np.float64))
    self.count += 1
    return out


def as_flat(tree):
  """A package output tree (nested dicts of arrays / ``Scales`` / ``None``)
  -> a flat dict of float64 arrays, parts dicts and ``None``."""
  out = {}
  for path, x in flatten(tree).items():
    if x is None:
      out[path] = None
    elif all(hasattr(x, s) for s in SCALES):
      out[path] = parts_of(x)
    else:
      out[path] = np.asarray(x, np.float64)
  return out


# --------------------------------------------------------------------------
# Test data.


def spectral(rng, batch, m, n, steps, ratio=0.6, drift=0.3):
  """``steps`` gradients ``U_t diag(σ_t) V_tᵀ`` (a batch of [m, n] each).

  Singular values fall by ~``ratio`` each, and the singular vectors drift
  around a fixed pair (U, V) from step to step, as a training gradient's do.
  Random Gaussian matrices of these sizes sometimes have two nearly equal
  singular values, and gradients with unrelated singular vectors every step
  make the tracked subspace a product of many unrelated projections; both
  make the split ill-conditioned, so that float32 and float64 legitimately
  pick different directions. A clear spectrum and a drifting subspace keep
  the comparison well posed.
  """
  s = min(m, n)
  u0 = rng.standard_normal((batch, m, s))
  v0 = rng.standard_normal((batch, n, s))
  out = []
  for _ in range(steps):
    u = np.linalg.qr(u0 + drift * rng.standard_normal(u0.shape))[0]
    v = np.linalg.qr(v0 + drift * rng.standard_normal(v0.shape))[0]
    sig = ratio ** np.arange(s) * (1 + 0.2 * rng.uniform(size=(batch, s)))
    out.append(2.0 * (u * sig[:, None, :]) @ np.swapaxes(v, -1, -2))
  return out


def f32(x):
  """float32-representable float64: the package and the reference see the
  same numbers."""
  return np.float64(np.float32(x))


def grad_sequence(rng, steps, shapes):
  """``steps`` flat gradient dicts for leaves of the given shapes."""
  seq = [{} for _ in range(steps)]
  for path, shape in shapes.items():
    if len(shape) < 2:
      xs = [rng.standard_normal(shape) for _ in range(steps)]
    else:
      xs = [x.reshape(shape) for x in
            spectral(rng, int(np.prod(shape[:-2])), *shape[-2:], steps)]
    for d, x in zip(seq, xs, strict=True):
      d[path] = f32(x)
  return seq
