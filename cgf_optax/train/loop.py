"""The training loop: one optimizer, from an initialisation, with checkpoints.

Every optimizer of a comparison starts from the same parameters and sees the
same batches (:func:`cgf_optax.train.data.batch_at`). Each step appends one
JSON line to ``metrics.jsonl`` (loss, gradient norm, learning rate, wall
clock, the optimizer's telemetry, and validation loss on evaluation steps).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import cgf_optax
from cgf_optax import flow, sharding
from cgf_optax.nnx import capture_context
from cgf_optax.train.checkpoint import CheckpointError, RunCheckpointer
from cgf_optax.train.config import OptimizerSpec, TrainConfig
from cgf_optax.train.data import Corpus, batch_at
from cgf_optax.train.model import GPT, GPTConfig, gpt_config
from cgf_optax.train.optimizers import build_optimizer, decompose_of, uses_context
from cgf_optax.train.parallel import (
    check_divisible,
    init_partitioned,
    run_mesh,
    shard_batch,
)

__all__ = ["RunResult", "init_model", "lm_loss", "model_config", "train_one"]

LN2 = math.log(2.0)
_VAL_SEED = 12345          # the validation batches are the same for every run
_DIVERGED_AFTER = 20       # consecutive non-finite losses that end a run


@dataclasses.dataclass
class RunResult:
  """What one optimizer's run produced (losses in bits per byte)."""

  label: str
  records: list[dict[str, Any]]
  tokens_per_s: float
  state_bytes: int
  nonfinite_steps: int
  diverged: bool
  params: Any = dataclasses.field(default=None, repr=False)

  def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, values)`` of the records that have ``key``."""
    rows = [(r["step"], r[key]) for r in self.records if key in r]
    if not rows:
      return np.zeros(0), np.zeros(0)
    s, v = zip(*rows, strict=True)
    return np.asarray(s), np.asarray(v, dtype=float)

  @property
  def final_val(self) -> float:
    _, v = self.series("val_bits")
    return float(v[-1]) if len(v) else float("nan")

  @property
  def final_train(self) -> float:
    _, v = self.series("bits")
    return float(np.mean(v[-20:])) if len(v) else float("nan")

  def steps_to(self, target: float) -> int | None:
    for s, v in zip(*self.series("val_bits"), strict=True):
      if v <= target:
        return int(s)
    return None

  def summary(self) -> dict[str, Any]:
    return {"label": self.label, "final_train_bits": self.final_train,
            "final_val_bits": self.final_val,
            "tokens_per_s": self.tokens_per_s,
            "state_bytes": self.state_bytes,
            "nonfinite_steps": self.nonfinite_steps,
            "diverged": self.diverged,
            "steps": int(self.records[-1]["step"]) if self.records else 0}


def model_config(cfg: TrainConfig) -> GPTConfig:
  over = {k: getattr(cfg, k) for k in ("d_model", "num_layers", "num_heads")
          if getattr(cfg, k)}
  return gpt_config(cfg.model, norm=cfg.norm, tie_embeddings=cfg.tie_embeddings,
                    dtype=cfg.dtype, remat=cfg.remat,
                    max_seq_len=max(cfg.seq_len, 16), **over)


def init_model(cfg: TrainConfig) -> tuple[nnx.GraphDef, nnx.State]:
  """The model's graph and its initial parameters (seeded by ``init_seed``).

  With ``cfg.mesh`` the parameters are created sharded on that mesh
  (:mod:`cgf_optax.train.parallel`), with the same values.
  """
  mcfg = model_config(cfg)
  mesh = run_mesh(cfg.mesh)
  if mesh is not None:
    check_divisible(mcfg, mesh, cfg.batch_size)
    return init_partitioned(mcfg, cfg.init_seed, mesh)
  model = GPT(mcfg, rngs=nnx.Rngs(cfg.init_seed))
  return nnx.split(model, nnx.Param)


def _find(tree: Any, cls: type) -> list[Any]:
  leaves = jax.tree_util.tree_leaves(
      tree, is_leaf=lambda x: isinstance(x, cls))
  return [x for x in leaves if isinstance(x, cls)]


def _scalar_telemetry(opt_state: Any) -> dict[str, jax.Array]:
  """Scalars the optimizers keep in their state: modulation factor, λ."""
  out = {}
  for st in _find(opt_state, cgf_optax.ModulateState):
    if jnp.ndim(st.factor) == 0:
      out["modulation_factor"] = st.factor
      out["modulation_reference"] = st.reference
  for st in _find(opt_state, cgf_optax.EntangleState):
    out["entangle_lambda"] = st.lam
  return out


def _scale_norms(dec: optax.GradientTransformation, grads: Any,
                 opt_state: Any) -> dict[str, jax.Array]:
  """Norms of the gradient's scale components, as the optimizer splits them."""
  states = _find(opt_state, cgf_optax.DecomposeState)
  if not states:
    return {}
  scales, _ = dec.update(grads, states[0])
  sq: dict[str, jax.Array] = {}
  for s in _find(scales, cgf_optax.Scales):
    for name in ("local", "intermediate", "global_"):
      part = getattr(s, name)
      if part is not None:
        sq[name] = sq.get(name, 0.0) + jnp.sum(jnp.square(
            part.astype(jnp.float32)))
  return {f"scale_norm/{k.rstrip('_')}": jnp.sqrt(v) for k, v in sq.items()}


def lm_loss(graphdef: nnx.GraphDef, params: Any, x: jax.Array, y: jax.Array,
            *, with_context: bool, **model_kwargs: Any
            ) -> tuple[jax.Array, dict[str, jax.Array] | None]:
  """Mean next-byte cross-entropy of the model ``(graphdef, params)`` and,
  with ``with_context``, the context its layers saw in the same forward
  pass (:func:`cgf_optax.nnx.capture_context`), else None.

  ``model_kwargs`` go to the model call (e.g. ``hidden_hook``).
  """
  model = nnx.merge(graphdef, params)
  if with_context:
    with capture_context(model) as ctx:
      logits = model(x, **model_kwargs)
    ctx = dict(ctx)
  else:
    logits, ctx = model(x, **model_kwargs), None
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return loss, ctx


def _flow_hook(cfg: TrainConfig, num_layers: int):
  """``probes -> hidden_hook`` applying :func:`cgf_optax.flow.gradient_flow`
  after every block, or ``None`` when ``cfg.flow`` is off."""
  if cfg.flow == "off":
    return None
  first, last = cfg.flow_lambdas
  sched = flow.depth_schedule(num_layers, first, last, kind="linear")
  lam_l = [float(v) for v in np.asarray(sched.local)]    # static numbers:
  lam_g = [float(v) for v in np.asarray(sched.global_)]  # λ = 1 is exact
  window = cfg.flow_window or None

  def make(probes):
    def hook(i, h):
      return flow.gradient_flow(h, lam_l[i], lam_g[i], mode=cfg.flow,
                                window=window,
                                probe=None if probes is None else probes[i])
    return hook
  return make


def _read_records(path: Path, upto: int) -> list[dict[str, Any]]:
  """Records of ``metrics.jsonl`` with step ≤ ``upto`` (drops a torn line)."""
  if not path.exists():
    return []
  out = []
  for line in path.read_text().splitlines():
    try:
      rec = json.loads(line)
    except json.JSONDecodeError:
      continue
    if isinstance(rec, dict) and rec.get("step", upto + 1) <= upto:
      out.append(rec)
  return out


def _clean(x: Any) -> Any:
  x = float(x)
  return x if math.isfinite(x) else None


def train_one(cfg: TrainConfig, spec: OptimizerSpec, corpus: Corpus,
              graphdef: nnx.GraphDef, params0: nnx.State, run_dir: Path,
              *, desc: str | None = None) -> RunResult:
  """Trains ``cfg.steps`` steps of ``spec`` from ``params0``.

  Writes ``metrics.jsonl`` and checkpoints under ``run_dir``. With
  ``cfg.resume`` it continues from the latest checkpoint there, or raises
  :class:`CheckpointError` if there is none. When ``params0`` are sharded on
  a mesh (:func:`init_model` with ``cfg.mesh``), the optimizer state is
  initialised sharded like them, batches are split along ``"data"``, the
  step keeps params and state on their shardings, and checkpoints are saved
  and restored sharded.
  """
  from tqdm.auto import tqdm

  run_dir.mkdir(parents=True, exist_ok=True)
  tx = build_optimizer(spec, cfg)
  with_ctx = uses_context(spec)
  dec = decompose_of(spec) if cfg.telemetry_every else None
  lr_of = optax.warmup_cosine_decay_schedule(   # for the log only
      0.0, float(dict(spec.kwargs).get("lr", cfg.lr)), cfg.warmup,
      max(cfg.steps, cfg.warmup + 1),
      end_value=float(dict(spec.kwargs).get("lr", cfg.lr)) * cfg.min_lr_ratio)

  num_layers = model_config(cfg).num_layers
  hook = _flow_hook(cfg, num_layers)
  mesh = sharding.mesh_of(params0)
  keep: Any = None    # with a mesh: the shardings of (params, opt_state)

  def loss_fn(params, probes, x, y):
    kw = {} if hook is None else {"hidden_hook": hook(probes)}
    return lm_loss(graphdef, params, x, y, with_context=with_ctx, **kw)

  def step(params, opt_state, x, y, telemetry: bool):
    probes = (flow.init_probes(num_layers)
              if telemetry and hook is not None else None)
    (loss, ctx), (grads, probe_grads) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(params, probes, x, y)
    extra = {"context": ctx, "value": loss} if with_ctx else {}
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    if telemetry and dec is not None:
      metrics.update(_scale_norms(dec, grads, opt_state))
    if probe_grads is not None:
      tel = flow.read_probes(probe_grads)
      for i in range(num_layers):
        metrics[f"flow_local/{i}"] = tel.local_norm[i]
        metrics[f"flow_global/{i}"] = tel.global_norm[i]
    updates, opt_state = tx.update(grads, opt_state, params, **extra)
    params = optax.apply_updates(params, updates)
    if keep is not None:
      params, opt_state = jax.lax.with_sharding_constraint(
          (params, opt_state), keep)
    metrics.update(_scalar_telemetry(opt_state))
    return params, opt_state, metrics

  train_step = jax.jit(step, static_argnames="telemetry", donate_argnums=(0, 1))
  eval_loss = jax.jit(lambda p, x, y: loss_fn(p, None, x, y)[0])
  val_batches = [shard_batch(mesh, *batch_at(
      corpus.val, i, 2 * cfg.batch_size, cfg.seq_len, _VAL_SEED))
                 for i in range(cfg.eval_batches)]

  params = jax.tree.map(jnp.copy, params0)    # params0 serves every run
  if mesh is None:
    opt_state = tx.init(params)
  else:
    opt_state = sharding.init_sharded(tx, params)
    keep = jax.tree.map(lambda a: a.sharding, (params, opt_state))
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(opt_state))

  ckpt = None
  if cfg.checkpoint_every or cfg.resume or cfg.stop_after:
    ckpt = RunCheckpointer(run_dir / "checkpoints", cfg.checkpoint_every,
                           cfg.keep_checkpoints)
  expect = {"optimizer": spec.label, "model": dataclasses.asdict(
      model_config(cfg)), "data_seed": cfg.data_seed, "data": cfg.data,
            "batch_size": cfg.batch_size, "seq_len": cfg.seq_len,
            "flow": [cfg.flow, cfg.flow_window,
                     [list(p) for p in cfg.flow_lambdas]]}
  metrics_path = run_dir / "metrics.jsonl"
  start, train_time, tokens, timed_s = 0, 0.0, 0, 0.0
  nonfinite = 0
  if cfg.resume:
    assert ckpt is not None
    start, state, meta = ckpt.restore(
        {"params": params, "opt_state": opt_state}, expect)
    params, opt_state = state["params"], state["opt_state"]
    train_time = meta["train_time"]
    tokens, timed_s = meta["timed_tokens"], meta["timed_s"]
    nonfinite = meta["nonfinite_steps"]
    records = _read_records(metrics_path, start)
  else:
    if ckpt is not None and ckpt.latest_step() is not None:
      raise CheckpointError(
          f"{run_dir / 'checkpoints'} already holds checkpoints; pass "
          "--resume to continue that run, or choose another --out")
    records = []
  # Rewrite the log up to the restored step (a crash may have logged more):
  # into a new file that replaces the old one, so a crash here loses nothing.
  tmp_log = metrics_path.with_name(metrics_path.name + ".tmp")
  tmp_log.write_text("".join(json.dumps(r) + "\n" for r in records))
  tmp_log.replace(metrics_path)

  bad_run = 0
  diverged = False
  last = min(cfg.steps, cfg.stop_after) if cfg.stop_after else cfg.steps
  bar = tqdm(range(start + 1, last + 1), initial=start, total=cfg.steps,
             desc=desc or spec.label, disable=not cfg.progress,
             dynamic_ncols=True, leave=True)
  ema = ema_w = 0.0
  with metrics_path.open("a") as log:
    for i in bar:
      x, y = shard_batch(mesh, *batch_at(corpus.train, i - 1, cfg.batch_size,
                                         cfg.seq_len, cfg.data_seed))
      telemetry = bool((dec is not None or hook is not None)
                       and cfg.telemetry_every
                       and i % cfg.telemetry_every == 0)
      t0 = time.perf_counter()
      params, opt_state, m = train_step(params, opt_state, x, y,
                                        telemetry=telemetry)
      m = jax.device_get(m)
      dt = time.perf_counter() - t0
      train_time += dt
      if i > start + 1 and not telemetry:   # no compilation, no extra work
        tokens += x.size
        timed_s += dt
      loss = float(m["loss"])
      rec: dict[str, Any] = {"step": i, "loss": _clean(loss),
                             "bits": _clean(loss / LN2),
                             "lr": float(lr_of(i - 1)), "time": train_time}
      rec.update({k: _clean(v) for k, v in m.items() if k != "loss"})
      if math.isfinite(loss):
        bad_run = 0
        ema, ema_w = 0.9 * ema + 0.1 * loss, 0.9 * ema_w + 0.1
      else:
        nonfinite += 1
        bad_run += 1
      rec["nonfinite_steps"] = nonfinite
      if i % cfg.eval_every == 0 or i == cfg.steps:
        val = float(np.mean([eval_loss(params, vx, vy)
                             for vx, vy in val_batches]))
        rec["val_bits"] = _clean(val / LN2)
      log.write(json.dumps(rec) + "\n")
      log.flush()
      records.append(rec)
      post = {"loss": f"{ema / max(ema_w, 1e-12) / LN2:.3f}b/B",
              "tok/s": f"{tokens / max(timed_s, 1e-9):,.0f}"}
      if "val_bits" in rec and rec["val_bits"] is not None:
        post["val"] = f"{rec['val_bits']:.3f}"
      bar.set_postfix(post, refresh=False)
      if ckpt is not None:
        ckpt.save(i, {"params": params, "opt_state": opt_state},
                  {**expect, "step": i, "train_time": train_time,
                   "timed_tokens": tokens, "timed_s": timed_s,
                   "nonfinite_steps": nonfinite},
                  force=(i == last))
      if bad_run >= _DIVERGED_AFTER:
        diverged = True
        bar.write(f"{spec.label}: {bad_run} non-finite losses in a row; "
                  "stopping this run (diverged)")
        break
  bar.close()
  if ckpt is not None:
    ckpt.close()
  return RunResult(spec.label, records, tokens / max(timed_s, 1e-9),
                   state_bytes, nonfinite, diverged, params)
