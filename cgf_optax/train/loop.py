"""The engine's loop: one optimizer's run, from an initialisation, with
checkpoints and an exact resume.

The pieces, each in its own module:

* the step (:mod:`cgf_optax.train.step`): loss, gradients, CEGM's context,
  flow hooks, telemetry and the update, compiled once ahead of the first
  step, with the parameters and state donated;
* the data feed (:mod:`cgf_optax.train.feed`): batches built in a background
  thread and sent to the device ahead of the step;
* the metrics sink (:mod:`cgf_optax.train.metrics`): one JSON line per step
  in ``metrics.jsonl``, fetched a few steps late so the host never stalls the
  device;
* checkpoints (:mod:`cgf_optax.train.checkpoint`): asynchronous, atomic
  Orbax saves.

Every optimizer of a comparison starts from the same parameters and sees the
same batches (:func:`cgf_optax.train.data.batch_at`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import os
import signal
import threading
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cgf_optax import sharding
from cgf_optax.train.checkpoint import CheckpointError, RunCheckpointer
from cgf_optax.train.config import ConfigError, OptimizerSpec, TrainConfig
from cgf_optax.train.data import Corpus, batch_at
from cgf_optax.train.feed import BatchFeed
from cgf_optax.train.metrics import LN2, MetricsSink, TrainClock, finite_or_none
from cgf_optax.train.model import GPT, GPTConfig, gpt_config
from cgf_optax.train.optimizers import (
    build_optimizer,
    schedule_of,
    telemetry_of,
    uses_context,
)
from cgf_optax.train.parallel import (
    batch_rows,
    check_divisible,
    init_partitioned,
    place_batch,
    run_mesh,
)
from cgf_optax.train.step import (
    Batch,
    FlowSpec,
    TrainState,
    lm_loss,
    make_train_step,
)

__all__ = ["Interrupted", "ResourceError", "RunResult", "check_memory_plan",
           "check_sizes",
           "init_model", "lm_loss", "model_config", "train_one"]

_VAL_SEED = 12345          # the validation batches are the same for every run
_DIVERGED_AFTER = 20       # consecutive non-finite losses that end a run
_LAG = 2                   # steps in flight before their metrics are fetched


class ResourceError(ConfigError):
  """The model and batch do not fit the device (or the host)."""


class Interrupted(Exception):  # noqa: N818 - it is what happened
  """Training was interrupted (Ctrl-C) at ``step``; ``checkpoint`` is the
  last complete checkpoint's step (None if there is none)."""

  def __init__(self, label: str, step: int, checkpoint: int | None,
               directory: Path | None):
    super().__init__(label, step, checkpoint)
    self.label, self.step = label, step
    self.checkpoint, self.directory = checkpoint, directory


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


def on_gpu() -> bool:
  return jax.default_backend() == "gpu"


def model_config(cfg: TrainConfig) -> GPTConfig:
  """The GPT of ``cfg``, with ``auto`` compute dtype and attention resolved:
  bfloat16 and cuDNN flash attention on GPUs, float32 and JAX's default
  attention elsewhere."""
  over = {k: getattr(cfg, k) for k in ("d_model", "num_layers", "num_heads")
          if getattr(cfg, k)}
  dtype = cfg.dtype if cfg.dtype != "auto" else (
      "bfloat16" if on_gpu() else "float32")
  attention = cfg.attention if cfg.attention != "auto" else (
      "cudnn" if on_gpu() and dtype == "bfloat16" else None)
  return gpt_config(cfg.model, norm=cfg.norm, tie_embeddings=cfg.tie_embeddings,
                    dtype=dtype, remat=cfg.remat, attention_impl=attention,
                    max_seq_len=max(cfg.seq_len, 16), **over)


def _host_memory() -> int | None:
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError, AttributeError):
    return None


def _sizes(cfg: TrainConfig) -> str:
  mcfg = model_config(cfg)
  return (f"model {cfg.model!r} ({mcfg.num_params():,} parameters, d_model "
          f"{mcfg.d_model}, {mcfg.num_layers} layers), --batch-size "
          f"{cfg.batch_size}, --seq-len {cfg.seq_len}")


def check_sizes(cfg: TrainConfig) -> None:
  """Refuses, before anything is allocated, a run whose batches or
  activations cannot fit this machine's memory.

  The estimate is a lower bound: the int32 batches in flight (inputs and
  targets, the training batch and the validation batches of twice its size)
  plus the activations a step keeps for the backward pass (at least the
  residual stream of every block and the logits, in the compute dtype).
  On a GPU the compiled step's own memory plan is checked too
  (:func:`train_one`).
  """
  mcfg = model_config(cfg)
  tokens = cfg.batch_size * cfg.seq_len
  batch_bytes = 8 * tokens * (2 + _LAG) + 8 * 2 * tokens * cfg.eval_batches
  width = jnp.dtype(mcfg.dtype).itemsize
  act_bytes = tokens * width * (mcfg.num_layers * mcfg.d_model
                                + mcfg.vocab_size)
  total = _host_memory()
  if total is None:
    return
  if batch_bytes > total // 2 or (not on_gpu() and act_bytes > total):
    need = batch_bytes + (0 if on_gpu() else act_bytes)
    raise ResourceError(
        f"{_sizes(cfg)} need at least {need / 2**30:,.1f} GiB of memory, "
        f"this machine has {total / 2**30:,.1f} GiB: use a smaller "
        "--batch-size or --seq-len")


def _oom_message(cfg: TrainConfig, detail: str) -> str:
  return (f"out of device memory ({detail}) for {_sizes(cfg)}: use a "
          "smaller --batch-size or --seq-len, or --remat (recompute block "
          "activations in the backward pass)")


def check_memory_plan(compiled: Any, cfg: TrainConfig,
                      limit: int | None = None) -> None:
  """Refuses a compiled step whose memory plan exceeds ``limit`` bytes (by
  default the device's memory; GPUs report both, elsewhere nothing is
  checked)."""
  try:
    plan = compiled.memory_analysis()
    if limit is None:
      limit = jax.local_devices()[0].memory_stats()["bytes_limit"]
  except Exception:  # noqa: BLE001 - backends without memory statistics
    return
  if plan is None or limit is None:
    return
  need = (plan.argument_size_in_bytes + plan.output_size_in_bytes
          - plan.alias_size_in_bytes + plan.temp_size_in_bytes)
  if need > limit:
    raise ResourceError(_oom_message(
        cfg, f"the step needs {need / 2**30:,.1f} GiB, the device has "
        f"{limit / 2**30:,.1f} GiB"))


def _compile(jitted: Any, state: TrainState, batch: Batch,
             variants: tuple[bool, ...]) -> dict[bool, Any]:
  """The step compiled ahead of time for each telemetry variant (in
  parallel), so that no step after the first compiles."""
  lowered = {t: jitted.lower(state, batch, telemetry=t) for t in variants}
  with concurrent.futures.ThreadPoolExecutor(len(variants)) as pool:
    futures = {t: pool.submit(lw.compile) for t, lw in lowered.items()}
    return {t: f.result() for t, f in futures.items()}


def init_model(cfg: TrainConfig) -> tuple[nnx.GraphDef, nnx.State]:
  """The model's graph and its initial parameters (seeded by ``init_seed``).

  With ``cfg.mesh`` the parameters are created sharded on that mesh
  (:mod:`cgf_optax.train.parallel`), with the same values.
  """
  mcfg = model_config(cfg)
  try:
    mesh = run_mesh(cfg.mesh)
    if mesh is not None:
      check_divisible(mcfg, mesh, cfg.batch_size)
  except ValueError as e:
    raise ConfigError(f"--mesh {cfg.mesh}: {e}") from None
  if mesh is not None:
    return init_partitioned(mcfg, cfg.init_seed, mesh)
  if jax.process_count() > 1:
    raise ConfigError(f"{jax.process_count()} processes need a --mesh over "
                      f"their {jax.device_count()} devices")
  model = GPT(mcfg, rngs=nnx.Rngs(cfg.init_seed))
  return nnx.split(model, nnx.Param)


def flow_spec(cfg: TrainConfig) -> FlowSpec | None:
  """The run's activation-level gradient flow, or None when it is off."""
  if cfg.flow == "off":
    return None
  first, last = cfg.flow_lambdas
  return FlowSpec.linear(cfg.flow, model_config(cfg).num_layers, first, last,
                         cfg.flow_window or None)


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




def _expect(cfg: TrainConfig, spec: OptimizerSpec) -> dict[str, Any]:
  """What a checkpoint of this run must have been saved with."""
  return {"optimizer": spec.label,
          "model": dataclasses.asdict(model_config(cfg)),
          "data_seed": cfg.data_seed, "data": cfg.data,
          "batch_size": cfg.batch_size, "seq_len": cfg.seq_len,
          "flow": [cfg.flow, cfg.flow_window,
                   [list(p) for p in cfg.flow_lambdas]]}


def _rewrite_log(path: Path, records: list[dict[str, Any]]) -> None:
  """The log up to the restored step (a crash may have logged more), into a
  new file that replaces the old one, so a crash here loses nothing."""
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
  tmp.replace(path)


def _stop_requested(stop: threading.Event, sync: bool) -> bool:
  """Whether Ctrl-C asks to stop after this step.

  Several processes must stop after the same step (a process that ran one
  more would wait for the others in its collectives): their flags are
  exchanged, at ``sync`` steps only (evaluations and checkpoints, where the
  host waits for the device anyway), and a Ctrl-C of any process stops all.
  """
  if jax.process_count() == 1:
    return stop.is_set()
  if not sync:
    return False
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(
      np.asarray(stop.is_set()))))


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
  and restored sharded. With several processes (a mesh over all their
  devices) every process runs this alike, building its own rows of each
  batch and taking part in every checkpoint; only process 0 writes
  ``metrics.jsonl`` and shows progress. A Ctrl-C of any process then stops
  them all at the next evaluation or checkpoint step.

  Raises:
    Interrupted: on Ctrl-C, after the checkpoint being written is complete.
    ResourceError: the step does not fit the device's memory.
  """
  from tqdm.auto import tqdm

  run_dir.mkdir(parents=True, exist_ok=True)
  primary = jax.process_index() == 0
  tx = build_optimizer(spec, cfg)
  mesh = sharding.mesh_of(params0)
  params = jax.tree.map(jnp.copy, params0)    # params0 serves every run
  if mesh is None:
    opt_state, keep = tx.init(params), None
  else:
    opt_state = sharding.init_sharded(tx, params)
    keep = jax.tree.map(lambda a: a.sharding, (params, opt_state))
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(opt_state))
  telemetry = telemetry_of(spec) if cfg.telemetry_every else None
  flows = flow_spec(cfg)
  step = make_train_step(graphdef, tx, with_context=uses_context(spec),
                         flow_spec=flows, schedule=schedule_of(spec, cfg),
                         telemetry=telemetry, shardings=keep)
  eval_loss = jax.jit(lambda p, x, y: lm_loss(graphdef, p, x, y,
                                              with_context=False)[0])

  ckpt = None
  if cfg.checkpoint_every or cfg.resume or cfg.stop_after:
    ckpt = RunCheckpointer(run_dir / "checkpoints", cfg.checkpoint_every,
                           cfg.keep_checkpoints)
  expect = _expect(cfg, spec)
  metrics_path = run_dir / "metrics.jsonl"
  start, train_time, timed = 0, 0.0, (0, 0.0)
  nonfinite = 0
  if cfg.resume:
    assert ckpt is not None
    start, restored, meta = ckpt.restore(
        {"params": params, "opt_state": opt_state}, expect)
    params, opt_state = restored["params"], restored["opt_state"]
    train_time = meta["train_time"]
    timed = (meta["timed_tokens"], meta["timed_s"])
    nonfinite = meta["nonfinite_steps"]
    records = _read_records(metrics_path, start) if primary else []
  else:
    if ckpt is not None and ckpt.latest_step() is not None:
      raise CheckpointError(
          f"{run_dir / 'checkpoints'} already holds checkpoints; pass "
          "--resume to continue that run, or choose another --out")
    records = []
  if primary:
    _rewrite_log(metrics_path, records)

  state = TrainState(params, opt_state)
  last = min(cfg.steps, cfg.stop_after) if cfg.stop_after else cfg.steps
  val_rows = batch_rows(mesh, 2 * cfg.batch_size)
  val_batches = [place_batch(mesh, 2 * cfg.batch_size, *batch_at(
      corpus.val, i, 2 * cfg.batch_size, cfg.seq_len, _VAL_SEED, val_rows))
                 for i in range(cfg.eval_batches)]
  with_telemetry = bool(cfg.telemetry_every and (telemetry or flows))
  feed = BatchFeed(corpus.train, batch_size=cfg.batch_size,
                   seq_len=cfg.seq_len, seed=cfg.data_seed, start=start,
                   stop=last, mesh=mesh)
  try:
    first = next(iter(BatchFeed(corpus.train, batch_size=cfg.batch_size,
                                seq_len=cfg.seq_len, seed=cfg.data_seed,
                                start=start, stop=start + 1, mesh=mesh,
                                prefetch=0))) if last > start else None
    compiled = {} if first is None else _compile(
        jax.jit(step, static_argnames="telemetry", donate_argnums=0),
        state, first, (False, True) if with_telemetry else (False,))
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" in str(e):
      raise ResourceError(_oom_message(cfg, "while compiling")) from None
    raise
  if compiled:
    check_memory_plan(compiled[False], cfg)

  bar = tqdm(total=cfg.steps, initial=start, desc=desc or spec.label,
             disable=not (cfg.progress and primary), dynamic_ncols=True,
             leave=True)
  ema = [0.0, 0.0]

  def progress(rec: dict[str, Any]) -> None:
    if rec["loss"] is not None:
      ema[0], ema[1] = 0.9 * ema[0] + 0.1 * rec["loss"], 0.9 * ema[1] + 0.1
    tokens, secs = sink.timed()
    post = {"loss": f"{ema[0] / max(ema[1], 1e-12) / LN2:.3f}b/B",
            "tok/s": f"{(timed[0] + tokens) / max(timed[1] + secs, 1e-9):,.0f}"}
    if rec.get("val_bits") is not None:
      post["val"] = f"{rec['val_bits']:.3f}"
    bar.set_postfix(post, refresh=False)
    bar.update(1)

  clock = TrainClock(train_time)
  i = start
  # Ctrl-C sets a flag the loop reads after each step, so that a checkpoint
  # being written is never torn by the interrupt; a second Ctrl-C raises.
  stop = threading.Event()
  previous = None
  if threading.current_thread() is threading.main_thread():
    def on_sigint(signum: int, frame: Any) -> None:
      stop.set()
      signal.signal(signal.SIGINT, previous)
    previous = signal.signal(signal.SIGINT, on_sigint)
  with (metrics_path.open("a") if primary else contextlib.nullcontext()
        ) as log, feed:
    sink = MetricsSink(log, clock, tokens_per_step=cfg.batch_size
                       * cfg.seq_len, lag=_LAG,
                       diverged_after=_DIVERGED_AFTER, nonfinite=nonfinite,
                       on_record=progress)
    try:
      for i, batch in zip(range(start + 1, last + 1), feed, strict=True):
        tele = with_telemetry and i % cfg.telemetry_every == 0
        state, m = compiled[tele](state, batch)
        host: dict[str, Any] = {}
        evaluating = i % cfg.eval_every == 0 or i == cfg.steps
        saving = ckpt is not None and (i == last or (
            cfg.checkpoint_every and i % cfg.checkpoint_every == 0))
        if evaluating:
          jax.block_until_ready(m["loss"])
          with clock.paused():
            val = np.mean(sharding.to_host(
                [eval_loss(state.params, vx, vy) for vx, vy in val_batches]))
          host["val_bits"] = finite_or_none(val / LN2)
        sink.push(i, m, **host)
        if saving:
          sink.drain()          # the log holds every step the save holds
          tokens, secs = sink.timed()
          with clock.paused():
            ckpt.save(i, {"params": state.params,
                          "opt_state": state.opt_state},
                      {**expect, "step": i, "train_time": clock.now(),
                       "timed_tokens": timed[0] + tokens,
                       "timed_s": timed[1] + secs,
                       "nonfinite_steps": sink.nonfinite}, force=True)
        if _stop_requested(stop, evaluating or saving):
          raise KeyboardInterrupt
        if sink.diverged:
          if primary:
            bar.write(f"{spec.label}: {_DIVERGED_AFTER} non-finite losses "
                      "in a row; stopping this run (diverged)")
          break
      sink.drain()
    except KeyboardInterrupt:
      feed.close()
      done = ckpt.wait() if ckpt is not None else None
      bar.close()
      raise Interrupted(spec.label, i, done,
                        None if ckpt is None else ckpt.directory) from None
    except jax.errors.JaxRuntimeError as e:
      if "RESOURCE_EXHAUSTED" in str(e):
        raise ResourceError(_oom_message(cfg, f"at step {i}")) from None
      raise
    finally:
      if previous is not None:
        signal.signal(signal.SIGINT, previous)
      bar.close()
      if ckpt is not None:
        ckpt.close()
  tokens, secs = sink.timed()
  tokens, secs = timed[0] + tokens, timed[1] + secs
  return RunResult(spec.label, records + sink.records,
                   tokens / max(secs, 1e-9), state_bytes, sink.nonfinite,
                   sink.diverged, state.params)
