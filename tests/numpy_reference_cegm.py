"""An independent NumPy (float64) re-implementation of the CEGM transforms.

Written from the docstrings of ``cgf_optax.entangle``, ``context_align``,
``normalize``, ``cegm`` and ``cegm_adamw`` (and the CEGM part of the design
note), not by calling the package: nothing here imports ``cgf_optax`` or
``jax``. The tests run the package under ``jax.jit`` in float32 and compare it,
step by step with the state carried, to these classes.

Trees are nested dicts with string keys; the reference works on *flat* dicts
``{"attn/qkv/kernel": leaf}`` keyed by the leaves' paths, written the way the
package documents them (``'a/b/kernel'``), which is also the key format of the
``context`` mapping.

The maths, per the docstrings:

* entangle: ``G_t = lam * G + (1 - lam) * G_{t-1}``, ``G_0 = 0``; entries of a
  non-finite gradient do not enter ``G_{t-1}``. After the step, with a finite
  loss ``L_t`` and a previous finite loss ``L_{t-1}``:
  ``lam <- clip(lam + adapt_rate * clip(g, -1, 1), lo, hi)`` with
  ``g = log(L_{t-1} / L_t)`` (0 unless both are positive; the default
  ``loss_signal``) or ``g = (L_{t-1} - L_t) / |L_{t-1}|`` ("relative");
  the first loss only sets ``L_{t-1}``; a NaN/inf loss changes nothing.
* context_align, per kernel ``W[n_in, ...]`` with a context ``C[..., n_in]``
  and heads of size ``d = n_in / H``: the bias-corrected EMA ``m_hat_h``
  (zero before the first context) is the query of a softmax pooling over the
  tokens with temperature ``1/sqrt(d)`` (so plain mean pooling at the first
  step); ``m_h <- rho m_h + (1 - rho) c_h``; ``u_h`` is the new bias-corrected
  EMA, unit-normalised (heads of norm <= eps left out), placed in head ``h``'s
  slice of the input axis; ``E = G + gamma Q Q^T G`` on axis 0 with
  ``Q = [u_h]``. A context with a non-finite entry leaves the EMA unchanged.
* normalize: ``E / (||E||_2 + eps)``, per leaf or over the whole tree.
"""

import math

import numpy as np
from numpy_reference import flatten, unflatten  # noqa: F401  (re-exported)

# --------------------------------------------------------------------------
# Trees.


def f64(flat):
  return {k: np.asarray(v, np.float64) for k, v in flat.items()}


# --------------------------------------------------------------------------
# entangle.


class Entangle:
  """``G_t = lam G + (1 - lam) G_{t-1}`` with lam adapted from the loss."""

  def __init__(self, lam=0.9, adapt_rate=0.0, lam_bounds=(0.05, 1.0),
               loss_signal="log_ratio"):
    self.loss_signal = loss_signal
    self.lam0 = float(lam)
    self.adapt_rate = float(adapt_rate)
    self.lo, self.hi = (float(b) for b in lam_bounds)

  def init(self, params):
    return {"lam": self.lam0, "prev_loss": 0.0, "has_loss": False,
            "prev": {k: np.zeros(np.shape(v)) for k, v in params.items()}}

  def update(self, grads, state, value=None):
    lam = state["lam"]
    out, prev = {}, {}
    for k, g in f64(grads).items():
      mixed = lam * g + (1.0 - lam) * state["prev"][k]
      out[k] = mixed
      prev[k] = np.where(np.isfinite(g), mixed, state["prev"][k])
    new_lam, prev_loss = lam, state["prev_loss"]
    has_loss = state["has_loss"]
    if value is not None:
      loss = float(value)
      if math.isfinite(loss):
        if has_loss:
          if self.loss_signal == "relative":
            rel = (prev_loss - loss) / max(abs(prev_loss), 1e-12)
          elif prev_loss > 0 and loss > 0:
            rel = math.log(prev_loss / loss)
          else:
            rel = 0.0
          rel = min(max(rel, -1.0), 1.0)
          new_lam = min(max(lam + self.adapt_rate * rel, self.lo), self.hi)
        prev_loss, has_loss = loss, True
    return out, {"lam": new_lam, "prev_loss": prev_loss,
                 "has_loss": has_loss, "prev": prev}


# --------------------------------------------------------------------------
# context_align.


def softmax(x, axis=0):
  with np.errstate(invalid="ignore"):
    z = np.exp(x - np.max(x, axis=axis, keepdims=True))
  return z / np.sum(z, axis=axis, keepdims=True)


class ContextAlign:
  """``E = G + gamma Q Q^T G`` with Q from per-head pooled, EMA'd contexts."""

  def __init__(self, num_heads=1, gamma=1.0, rho=0.9, eps=1e-12):
    self.num_heads = int(num_heads)
    self.gamma = float(gamma)
    self.rho = float(rho)
    self.eps = float(eps)

  def has_state(self, shape):
    return (len(shape) >= 2 and shape[0] > 0
            and shape[0] % self.num_heads == 0)

  def init(self, params):
    H = self.num_heads
    ema, steps = {}, {}
    for k, p in params.items():
      shape = np.shape(p)
      if self.has_state(shape):
        ema[k] = np.zeros((H, shape[0] // H))
        steps[k] = 0
      else:
        ema[k], steps[k] = None, None
    return {"ema": ema, "steps": steps}

  def update(self, grads, state, context=None):
    context = {} if context is None else context
    H, rho = self.num_heads, self.rho
    out, ema, steps = {}, dict(state["ema"]), dict(state["steps"])
    for k, g in f64(grads).items():
      if k not in context:
        out[k] = g
        continue
      n_in = g.shape[0]
      d = n_in // H
      tokens = np.asarray(context[k], np.float64).reshape(-1, n_in)   # [N, n]
      m, t = state["ema"][k], state["steps"][k]
      pooled = np.zeros((H, d))
      for h in range(H):
        ch = tokens[:, h * d:(h + 1) * d]                              # [N, d]
        if t == 0:
          alpha = np.full(len(ch), 1.0 / len(ch))                      # mean
        else:
          query = m[h] / (1.0 - rho**t)
          alpha = softmax(ch @ query / math.sqrt(d))
        pooled[h] = alpha @ ch
      if np.all(np.isfinite(tokens)):
        m = rho * m + (1.0 - rho) * pooled
        t = t + 1
      ema[k], steps[k] = m, t
      Q = np.zeros((n_in, H))
      for h in range(H):
        u = m[h] / (1.0 - rho**t) if t > 0 else np.zeros(d)
        norm = np.linalg.norm(u)
        if norm > self.eps:
          Q[h * d:(h + 1) * d, h] = u / norm
      G = g.reshape(n_in, -1)
      out[k] = (G + self.gamma * Q @ (Q.T @ G)).reshape(g.shape)
    return out, {"ema": ema, "steps": steps}


# --------------------------------------------------------------------------
# normalize.


class Normalize:
  """``E / (||E||_2 + eps)``, per leaf or global."""

  def __init__(self, scope="leaf", eps=1e-8):
    self.scope = scope
    self.eps = float(eps)

  def init(self, params):
    return {}

  def update(self, grads, state=None):
    grads = f64(grads)
    if self.scope == "global":
      norm = math.sqrt(sum(float(np.sum(g**2)) for g in grads.values()))
      return {k: g / (norm + self.eps) for k, g in grads.items()}, {
          "norm": norm}
    norms = {k: float(np.linalg.norm(g.ravel())) for k, g in grads.items()}
    return {k: g / (norms[k] + self.eps) for k, g in grads.items()}, {
        "norm": norms}


# --------------------------------------------------------------------------
# The aliases.


def _lr(learning_rate, count):
  return float(learning_rate(count)) if callable(learning_rate) else float(
      learning_rate)


class Cegm:
  """``Theta <- Theta - eta_t * normalize(context_align(entangle(G)))``."""

  def __init__(self, learning_rate, *, lam=0.9, adapt_rate=0.0,
               lam_bounds=(0.05, 1.0), num_heads=1, gamma=1.0, rho=0.9,
               normalize_scope="leaf", eps=1e-8, loss_signal="log_ratio"):
    self.learning_rate = learning_rate
    self.entangle = Entangle(lam, adapt_rate, lam_bounds, loss_signal)
    self.align = ContextAlign(num_heads, gamma, rho)
    self.normalize = Normalize(normalize_scope, eps)

  def init(self, params):
    return {"count": 0, "entangle": self.entangle.init(params),
            "align": self.align.init(params)}

  def direction(self, grads, state, context, value):
    g, ent = self.entangle.update(grads, state["entangle"], value)
    e, ali = self.align.update(g, state["align"], context)
    n, _ = self.normalize.update(e)
    return n, {**state, "entangle": ent, "align": ali}

  def update(self, grads, state, params=None, context=None, value=None):
    n, state = self.direction(grads, state, context, value)
    lr = _lr(self.learning_rate, state["count"])
    return ({k: -lr * x for k, x in n.items()},
            {**state, "count": state["count"] + 1})


class CegmAdamW(Cegm):
  """The CEGM direction, then Adam's moments, decoupled weight decay, -eta."""

  def __init__(self, learning_rate, b1=0.9, b2=0.999, eps=1e-8,
               weight_decay=1e-4, *, lam=0.9, adapt_rate=0.0,
               lam_bounds=(0.05, 1.0), num_heads=1, gamma=1.0, rho=0.9,
               normalize_scope="leaf", normalize_eps=1e-8,
               loss_signal="log_ratio"):
    super().__init__(learning_rate, lam=lam, adapt_rate=adapt_rate,
                     lam_bounds=lam_bounds, num_heads=num_heads, gamma=gamma,
                     rho=rho, normalize_scope=normalize_scope or "leaf",
                     eps=normalize_eps, loss_signal=loss_signal)
    self.use_normalize = normalize_scope is not None
    self.b1, self.b2, self.adam_eps = float(b1), float(b2), float(eps)
    self.weight_decay = float(weight_decay)

  def init(self, params):
    zeros = {k: np.zeros(np.shape(v)) for k, v in params.items()}
    return {**super().init(params), "mu": zeros, "nu": dict(zeros)}

  def update(self, grads, state, params=None, context=None, value=None):
    g, ent = self.entangle.update(grads, state["entangle"], value)
    e, ali = self.align.update(g, state["align"], context)
    n = self.normalize.update(e)[0] if self.use_normalize else e
    t = state["count"] + 1
    mu = {k: self.b1 * state["mu"][k] + (1 - self.b1) * x for k, x in n.items()}
    nu = {k: self.b2 * state["nu"][k] + (1 - self.b2) * x**2
          for k, x in n.items()}
    lr = _lr(self.learning_rate, state["count"])
    out = {}
    for k in n:
      mu_hat = mu[k] / (1 - self.b1**t)
      nu_hat = nu[k] / (1 - self.b2**t)
      step = mu_hat / (np.sqrt(nu_hat) + self.adam_eps)
      step = step + self.weight_decay * np.asarray(params[k], np.float64)
      out[k] = -lr * step
    return out, {"count": t, "entangle": ent, "align": ali, "mu": mu,
                 "nu": nu}
