"""Training and statistics for the quality benchmark.

The engine's train step (:func:`cgf_optax.train.step.make_train_step`: same
model, loss, context capture for CEGM and flow hooks as
:func:`cgf_optax.train.train_one`) and its data feed, for any
``GradientTransformation`` of :mod:`benchmarks.quality.arms`. It runs
``eval_every`` steps per compiled ``lax.scan`` call, passes the peak learning
rate as a traced scalar (one compilation per arm serves the whole sweep and
every seed) and records what the papers' tables need: gradient norm, cosine
between successive gradients and between successive updates, per-position
validation loss.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from scipy import stats

import cgf_optax
from cgf_optax.train import GPT, gpt_config
from cgf_optax.train.data import (
  SHAKESPEARE_VALIDATION,
  _read_text_file,
  batch_at,
  shakespeare_files,
)
from cgf_optax.train.feed import BatchFeed, host_batch
from cgf_optax.train.step import (
  Batch,
  FlowSpec,
  TrainState,
  eval_losses,
  lm_loss,
  make_train_step,
)

from .arms import Arm

LN2 = math.log(2.0)


@dataclasses.dataclass(frozen=True)
class Setup:
  """Model and schedule of every run of an experiment."""

  d_model: int = 64
  num_layers: int = 2
  num_heads: int = 4
  seq_len: int = 64
  batch_size: int = 16
  steps: int = 200
  warmup: int = 20
  min_lr_ratio: float = 0.1
  weight_decay: float = 0.01
  clip_norm: float = 1.0
  eval_every: int = 20
  curve_batches: int = 2      # batches of 2 * batch_size, every eval_every
  final_batches: int = 8      # at the end
  dtype: str = "float32"      # compute dtype (parameters stay float32)
  attention: str | None = None  # GPTConfig.attention_impl (None: JAX's)

  def __post_init__(self):
    if self.steps % self.eval_every:
      raise ValueError("steps must be a multiple of eval_every")


# ------------------------------------------------------------------ data

@dataclasses.dataclass(frozen=True)
class Data:
  """Training bytes and named evaluation sets (uint8 arrays)."""

  train: np.ndarray
  evals: dict[str, np.ndarray]
  describe: str = ""


def _join(chunks: list[bytes]) -> np.ndarray:
  return np.frombuffer(b"\n".join(chunks), dtype=np.uint8).copy()


# Held-out plays (never trained on), split in two: one half chooses the
# learning rate ("sel"), the other reports the result ("test").
SEL_PLAYS = SHAKESPEARE_VALIDATION[:3]
TEST_PLAYS = SHAKESPEARE_VALIDATION[3:]


def shakespeare_data(exclude_genres: tuple[str, ...] = ()) -> Data:
  """Train on the plays not held out (and not in ``exclude_genres``);
  ``sel`` and ``test`` are disjoint sets of held-out plays; with
  ``exclude_genres``, ``genre`` is every play of those genres."""
  plays = shakespeare_files()
  held = set(SHAKESPEARE_VALIDATION)
  read = {k: _read_text_file(p) for k, p in plays.items()}
  genre = lambda k: k.split("/")[0]  # noqa: E731
  train = [k for k in plays if k not in held and genre(k) not in exclude_genres]
  sel = [k for k in SEL_PLAYS if genre(k) not in exclude_genres]
  test = [k for k in TEST_PLAYS if genre(k) not in exclude_genres]
  evals = {"sel": _join([read[k] for k in sel]),
           "test": _join([read[k] for k in test])}
  if exclude_genres:
    evals["genre"] = _join([read[k] for k in plays if genre(k) in
                            exclude_genres])
  desc = (f"train {len(train)} plays ({sum(len(read[k]) for k in train):,} "
          f"bytes); sel {tuple(sel)}; test {tuple(test)}")
  if exclude_genres:
    desc += f"; unseen genres {exclude_genres}"
  return Data(_join([read[k] for k in train]), evals, desc)


def corrupt(data: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
  """Replaces ``fraction`` of the bytes by bytes drawn uniformly from the
  alphabet of ``data`` (so corrupted text uses no new symbols)."""
  if fraction <= 0:
    return data
  rng = np.random.default_rng(seed)
  alphabet = np.unique(data)
  out = data.copy()
  hit = rng.random(len(data)) < fraction
  out[hit] = rng.choice(alphabet, size=int(hit.sum()))
  return out


# ------------------------------------------------------------------ model

def model_cfg(setup: Setup, max_seq_len: int | None = None):
  return gpt_config("tiny", d_model=setup.d_model,
                    num_layers=setup.num_layers, num_heads=setup.num_heads,
                    max_seq_len=max_seq_len or setup.seq_len,
                    dtype=setup.dtype, attention_impl=setup.attention)


def init_params(setup: Setup, seed: int, init: str = "default"
                ) -> tuple[nnx.GraphDef, nnx.State]:
  """The GPT of ``setup``; ``init`` re-draws every matrix (kernels and the
  embedding) with another initialiser, same tree structure."""
  model = GPT(model_cfg(setup), rngs=nnx.Rngs(seed))
  graphdef, params = nnx.split(model, nnx.Param)
  if init == "default":
    return graphdef, params
  ini = INITS[init]
  leaves, tdef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1000 + seed), len(leaves))
  leaves = [ini(k, x.shape, x.dtype) if x.ndim >= 2 else x
            for k, x in zip(keys, leaves, strict=True)]
  return graphdef, jax.tree.unflatten(tdef, leaves)


_ini = jax.nn.initializers
#: CGFM Table 5's initialisers (kernels are [fan_in, fan_out]). "normal" and
#: "truncated_normal" use σ = 0.02 (GPT-2's scale, without the model's
#: 1/sqrt(2L) damping of output projections).
INITS = {
    "xavier_normal": _ini.glorot_normal(in_axis=0, out_axis=1),
    "he_uniform": _ini.he_uniform(in_axis=0, out_axis=1),
    "normal": _ini.normal(0.02),
    "truncated_normal": _ini.truncated_normal(0.02),
}


# ------------------------------------------------------------------ training

@dataclasses.dataclass
class Run:
  """One training run (losses in bits per byte)."""

  arm: str
  lr: float
  seed: int
  steps: list[int]                 # evaluation steps
  curve: dict[str, list[float]]    # eval set -> loss at those steps
  time: list[float]                # cumulative training seconds there
  final: dict[str, float]          # eval set -> final loss (more batches)
  position: dict[str, list[float]]  # eval set -> final loss per position
  grad_norm: list[float]
  grad_cos: list[float]
  update_cos: list[float]
  train_bits: list[float]
  compile_s: float
  state_bytes: int
  diverged: bool
  # the optimizer's own scalars per step (the engine's scalar_telemetry:
  # CGFM's modulation factor, CEGM's λ)
  telemetry: dict[str, list[float]] = dataclasses.field(default_factory=dict)

  def steps_to(self, target: float, key: str = "test") -> int | None:
    return steps_to(self.steps, self.curve[key], target)

  def time_to(self, target: float, key: str = "test") -> float | None:
    s = self.steps_to(target, key)
    return None if s is None else self.time[self.steps.index(s)]

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def steps_to(steps: list[int], values: list[float], target: float
             ) -> int | None:
  """First step whose value is ≤ ``target`` (``None`` if never)."""
  for s, v in zip(steps, values, strict=True):
    if v is not None and math.isfinite(v) and v <= target:
      return int(s)
  return None


def _cos(a: Any, b: Any) -> jax.Array:
  dot = sum(jnp.vdot(x, y) for x, y in zip(
      jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
  return dot / (optax.tree.norm(a) * optax.tree.norm(b) + 1e-30)


# What every step reports; the rest is the optimizer's telemetry.
_STEP_METRICS = {"loss", "grad_norm", "grad_cos", "update_cos"}

# Per-position mean loss (nats) over batches [n, b, t]: the engine's.
_eval = jax.jit(eval_losses, static_argnums=0)


def _scale_and_compare(grads: Any, updates: Any, aux: Any
                       ) -> tuple[Any, Any, dict[str, jax.Array]]:
  """The engine step's ``post_update``: multiplies the updates by the peak
  learning rate ``aux[2]`` (a traced scalar) and measures the cosines with
  the previous step's gradient and update (kept in ``aux``)."""
  prev_g, prev_u, peak = aux
  updates = jax.tree.map(lambda t: t * peak, updates)
  return updates, (grads, updates, peak), {
      "grad_cos": _cos(grads, prev_g), "update_cos": _cos(updates, prev_u)}


class Trainer:
  """The engine's train step (:func:`cgf_optax.train.step.make_train_step`)
  for one arm on one setup, scanned over ``eval_every`` steps, and its
  evaluation."""

  def __init__(self, arm: Arm, setup: Setup, graphdef: nnx.GraphDef):
    self.arm, self.setup, self.graphdef = arm, setup, graphdef
    sched = optax.warmup_cosine_decay_schedule(
        0.0, 1.0, setup.warmup, setup.steps, end_value=setup.min_lr_ratio)
    parts = ([optax.clip_by_global_norm(setup.clip_norm)]
             if setup.clip_norm else [])
    self.tx = optax.with_extra_args_support(
        optax.chain(*parts, arm.build(sched, setup.weight_decay)))
    self._chunk = None
    flows = None
    if arm.flow:   # static per-layer numbers (λ = 1 is then exact)
      mode, first, last = arm.flow
      flows = FlowSpec.linear(mode, setup.num_layers, first, last)
    self.step = make_train_step(
        graphdef, self.tx, with_context=arm.context, flow_spec=flows,
        loss_fn=self._regularized_loss if arm.reg_beta else None,
        post_update=_scale_and_compare)

  def _regularized_loss(self, params, x, y, hidden_hook):
    """The engine's ``loss_fn`` of the regularizer arms: the LM loss plus
    :func:`cgf_optax.losses.entanglement_penalty` on the last block's hidden
    states (``hidden_hook`` is None: these arms have no flow)."""
    del hidden_hook
    hs: list[jax.Array] = []
    last = self.setup.num_layers - 1

    def keep(i, h):
      if i == last:
        hs.append(h)
      return h
    loss, _ = lm_loss(self.graphdef, params, x, y, with_context=False,
                      hidden_hook=keep)
    model = nnx.merge(self.graphdef, params)
    head = lambda h: optax.softmax_cross_entropy_with_integer_labels(  # noqa: E731
        model.embed.attend(model.norm(h)).astype(jnp.float32), y).mean()
    return loss + cgf_optax.losses.entanglement_penalty(
        head, hs[0], beta=self.arm.reg_beta), (loss, None)

  def _chunk_fn(self, state: TrainState, batches: Batch):
    return jax.lax.scan(lambda s, b: self.step(s, b), state, batches)

  def run(self, params0: nnx.State, data: Data, lr: float, seed: int,
          data_seed: int | None = None) -> Run:
    st = self.setup
    ds = seed if data_seed is None else data_seed
    params = jax.tree.map(jnp.copy, params0)
    opt_state = self.tx.init(params)
    state_bytes = int(sum(x.nbytes for x in jax.tree.leaves(opt_state)))
    zeros = lambda: jax.tree.map(jnp.zeros_like, params)  # noqa: E731
    state = TrainState(params, opt_state, (zeros(), zeros(), jnp.float32(lr)))
    k = st.eval_every

    def eval_set(arr: np.ndarray, n: int):
      b = [batch_at(arr, i, 2 * st.batch_size, st.seq_len, 777)
           for i in range(n)]
      return (jnp.asarray(np.stack([x for x, _ in b])),
              jnp.asarray(np.stack([y for _, y in b])))

    curve_sets = {n: eval_set(a, st.curve_batches)
                  for n, a in data.evals.items()}
    feed = BatchFeed(data.train, batch_size=st.batch_size,
                     seq_len=st.seq_len, seed=ds, start=0, stop=st.steps,
                     chunk=k)
    t0 = time.perf_counter()
    if self._chunk is None:
      first = host_batch(data.train, 0, st.batch_size, st.seq_len, ds, k)
      self._chunk = jax.jit(self._chunk_fn, donate_argnums=0).lower(
          state, Batch(*jax.device_put(tuple(first)))).compile()
    compile_s = time.perf_counter() - t0

    out = Run(self.arm.name, lr, seed, [], {n: [] for n in data.evals}, [],
              {}, {}, [], [], [], [], compile_s, state_bytes, False)
    train_s = 0.0
    with feed:
      t = time.perf_counter()
      for i0, batches in zip(range(0, st.steps, k), feed, strict=True):
        state, m = self._chunk(state, batches)
        m = jax.device_get(m)
        train_s += time.perf_counter() - t
        out.steps.append(i0 + k)
        out.time.append(train_s)
        out.train_bits += [float(v) / LN2 for v in m["loss"]]
        out.grad_norm += [float(v) for v in m["grad_norm"]]
        out.grad_cos += [float(v) for v in m["grad_cos"]]
        out.update_cos += [float(v) for v in m["update_cos"]]
        for name in sorted(set(m) - _STEP_METRICS):
          out.telemetry.setdefault(name, []).extend(
              float(v) for v in m[name])
        for n, (ex, ey) in curve_sets.items():
          out.curve[n].append(_finite(
              float(_eval(self.graphdef, state.params, ex, ey).mean()) / LN2))
        if not np.isfinite(m["loss"]).any():
          out.diverged = True
          break
        t = time.perf_counter()
    for n, a in data.evals.items():
      ex, ey = eval_set(a, st.final_batches)
      per = np.asarray(_eval(self.graphdef, state.params, ex, ey)) / LN2
      out.final[n] = _finite(float(per.mean()))
      out.position[n] = [_finite(float(v)) for v in per]
    if out.diverged:
      out.final = {n: None for n in out.final}
    return out


def _finite(x: float) -> float | None:
  return x if math.isfinite(x) else None


# ------------------------------------------------------------------ stats

def t_interval(values: list[float], level: float = 0.95
               ) -> dict[str, float | int | None]:
  """Mean and the half-width of its Student-t confidence interval."""
  v = np.asarray([x for x in values if x is not None and math.isfinite(x)],
                 dtype=float)
  n = len(v)
  if n == 0:
    return {"mean": None, "ci": None, "n": 0, "std": None}
  if n == 1:
    return {"mean": float(v[0]), "ci": None, "n": 1, "std": None}
  s = float(v.std(ddof=1))
  q = float(stats.t.ppf(0.5 + level / 2, n - 1))
  return {"mean": float(v.mean()), "ci": q * s / math.sqrt(n), "n": n,
          "std": s}


def variability(grad_norm: list[float], grad_cos: list[float],
                update_cos: list[float], warmup: int, window: int = 20
                ) -> dict[str, float]:
  """CGFM Table 2, defined: after the warm-up, the mean over windows of
  ``window`` steps of the coefficient of variation (std / mean) of the
  gradient norm; the mean cosine between successive gradients and between
  successive updates (low or negative = oscillation)."""
  g = np.asarray(grad_norm[warmup:], dtype=float)
  cvs = [g[i:i + window].std() / g[i:i + window].mean()
         for i in range(0, len(g) - window + 1, window)]
  return {"grad_norm_cv": float(np.mean(cvs)) if cvs else float("nan"),
          "grad_cos": float(np.mean(grad_cos[warmup:])),
          "update_cos": float(np.mean(update_cos[warmup:]))}
