"""Soak test: 10,000 training steps of every alias on a tiny GPT.

Not a test of the suite (it takes a quarter of an hour on a 2-core CPU) but a
benchmark of what a long run would reveal and a short one would not:

* **recompilation**: the jitted step must compile once, at step 1. Counted
  two ways: the jitted function's cache size (``_cache_size()``) at step 1 and
  at the end, and every "Compiling ..." record that JAX logs with
  ``jax_log_compiles`` (any jit, including eager operations), attributed to
  the optimizer whose steps were running; after step 1 both must stay put.
* **host memory**: the process's resident set (``VmRSS`` of
  ``/proc/self/status``), sampled after every window of steps; reported as
  the growth from the end of the first round to the end, and as a slope
  (least squares over the second half of the run) in MiB per 1,000 steps.
* **device memory**: ``Device.memory_stats()`` where the backend has it
  (``bytes_in_use``, ``peak_bytes_in_use``; ``None`` on CPU), and on every
  backend the number and total bytes of live JAX arrays
  (``jax.live_arrays()``), sampled with the RSS.
* **state dtypes**: shape, dtype and weak type of every leaf of the
  parameters and the optimizer state at the start and at the end; no drift
  allowed (a float32 leaf turning float64 or weakly typed would recompile
  or slow the step).
* **wall clock per step over time**: each step is timed (the jitted call and
  ``block_until_ready`` of its outputs); per window of steps the median,
  10th and 90th percentile and mean, and the median's ratio to AdamW's in the
  same window.

The optimizers are built exactly as ``cgf-optax train`` builds them
(:func:`cgf_optax.train.optimizers.build_optimizer`: clipping, warm-up +
cosine schedule over the whole run, weight decay on matrices), the step is
the engine's (:func:`cgf_optax.train.step.make_train_step`, jitted with the
state donated; the CEGM aliases get the captured context and the loss;
the telemetry variant is not run), and the batches are the CLI's
(:func:`cgf_optax.train.feed.host_batch` over the Shakespeare corpus). The
optimizers run **interleaved**: round ``r`` runs window ``r`` of every
optimizer in turn, in an order rotated each round, so a slow phase of a
shared machine hits all of them alike and the per-window ratios compare
steps taken minutes apart at most.

Usage::

  python benchmarks/soak.py                      # 10,000 steps x 7 optimizers
  python benchmarks/soak.py --steps 2000 --optimizers adamw cgfm_adamw
  python benchmarks/soak.py --out /tmp/soak.json

Writes ``benchmarks/results/soak-<device>.json`` (or ``--out``) and prints a
table.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import subprocess
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import optax

import cgf_optax
from cgf_optax.train import TrainConfig, data, loop, parse_optimizer_spec
from cgf_optax.train.feed import host_batch
from cgf_optax.train.optimizers import build_optimizer, schedule_of, uses_context
from cgf_optax.train.step import TrainState, make_train_step

ROOT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT_DIR not in sys.path:
  sys.path.insert(0, ROOT_DIR)
from benchmarks._results import write_json  # noqa: E402

DEFAULT_OPTIMIZERS = (
    "adamw", "cgfm", "cgfm_adamw:strategy=lowrank", "cgfm_adamw:strategy=mean",
    "cgfm_adamw:strategy=temporal", "cegm", "cegm_adamw")
MIB = 2.0 ** 20


def rss_bytes() -> int:
  """Resident set size of this process (``VmRSS``), in bytes."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) * 1024
  return -1


def device_memory() -> dict[str, Any]:
  stats = jax.devices()[0].memory_stats()
  live = jax.live_arrays()
  out: dict[str, Any] = {"live_arrays": len(live),
                         "live_bytes": int(sum(a.nbytes for a in live))}
  if stats:
    for key in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit"):
      if key in stats:
        out[key] = int(stats[key])
  return out


def leaf_types(tree: Any) -> list[list[Any]]:
  """``[path, shape, dtype, weak_type]`` of every array leaf."""
  rows = []
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if hasattr(x, "dtype"):
      rows.append([jax.tree_util.keystr(path), list(np.shape(x)),
                   str(x.dtype), bool(getattr(x, "weak_type", False))])
  return rows


class CompileCounter(logging.Filter):
  """Counts JAX's "Compiling ..." log records per optimizer label, and keeps
  the compile log (``jax_log_compiles``) off the terminal; other records of
  those loggers pass."""

  def __init__(self):
    super().__init__()
    self.current = "-"
    self.counts: dict[str, int] = {}
    self.names: dict[str, list[str]] = {}

  def filter(self, record: logging.LogRecord) -> bool:
    msg = record.getMessage()
    if msg.startswith("Compiling "):
      self.counts[self.current] = self.counts.get(self.current, 0) + 1
      names = self.names.setdefault(self.current, [])
      if len(names) < 20:
        names.append(msg.split(" with ")[0][len("Compiling "):])
      return False
    return not msg.startswith(("Finished ", "Persistent compilation cache"))


class Runner:
  """One optimizer's model, state, jitted step and measurements."""

  def __init__(self, label: str, cfg: TrainConfig, graphdef, params0,
               steps: int, windows: int):
    self.label = label
    spec = parse_optimizer_spec(label)
    tx = build_optimizer(spec, cfg)
    step = make_train_step(graphdef, tx, with_context=uses_context(spec),
                           schedule=schedule_of(spec, cfg))
    # Jitted as the loop jits it (there compiled ahead of time); telemetry
    # steps are a second variant and stay off here.
    self.step_fn = jax.jit(step, static_argnames="telemetry",
                           donate_argnums=0)
    params = jax.tree.map(jnp.copy, params0)
    self.state = TrainState(params, tx.init(params))
    self.types_start = {"params": leaf_types(self.state.params),
                        "opt_state": leaf_types(self.state.opt_state)}
    self.state_bytes = int(sum(x.nbytes for x in
                               jax.tree.leaves(self.state.opt_state)))
    self.times = np.zeros(steps)
    self.losses = np.zeros(steps, np.float32)
    self.done = 0
    self.cache_size_after_first: int | None = None
    self.compiles_after_first = 0
    self.windows: list[dict[str, Any]] = []

  def run(self, n: int, corpus: data.Corpus, cfg: TrainConfig,
          counter: CompileCounter) -> None:
    counter.current = self.label
    for _ in range(n):
      i = self.done
      batch = host_batch(corpus.train, i, cfg.batch_size, cfg.seq_len,
                         cfg.data_seed)
      before = counter.counts.get(self.label, 0)
      t0 = time.perf_counter()
      self.state, metrics = self.step_fn(self.state, batch)
      jax.block_until_ready((self.state, metrics))
      self.times[i] = time.perf_counter() - t0
      self.losses[i] = float(metrics["loss"])
      if i == 0:
        self.cache_size_after_first = self.step_fn._cache_size()
      else:
        self.compiles_after_first += counter.counts.get(self.label, 0) - before
      self.done += 1
    counter.current = "-"


def window_stats(times: np.ndarray) -> dict[str, float]:
  return {"median_ms": float(np.median(times) * 1e3),
          "p10_ms": float(np.percentile(times, 10) * 1e3),
          "p90_ms": float(np.percentile(times, 90) * 1e3),
          "mean_ms": float(np.mean(times) * 1e3)}


def slope_mib_per_1k(steps: list[int], values: list[float]) -> float:
  """Least-squares slope of the second half, MiB per 1,000 steps."""
  h = len(steps) // 2
  s, v = np.asarray(steps[h:], float), np.asarray(values[h:], float)
  if len(s) < 2 or np.ptp(s) == 0:
    return 0.0
  return float(np.polyfit(s, v, 1)[0] * 1000 / MIB)


def git_commit() -> str:
  try:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                         capture_output=True, text=True, check=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "cgf_optax",
                            "benchmarks/soak.py"], cwd=root,
                           capture_output=True, text=True).stdout
    return rev.stdout.strip() + ("+uncommitted changes" if dirty else "")
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--steps", type=int, default=10_000)
  p.add_argument("--window", type=int, default=500,
                 help="steps per window (timing statistics, memory samples)")
  p.add_argument("--optimizers", nargs="+", default=list(DEFAULT_OPTIMIZERS))
  p.add_argument("--d-model", type=int, default=32)
  p.add_argument("--num-layers", type=int, default=2)
  p.add_argument("--num-heads", type=int, default=2)
  p.add_argument("--seq-len", type=int, default=32)
  p.add_argument("--batch-size", type=int, default=4)
  p.add_argument("--lr", type=float, default=3e-3)
  p.add_argument("--data", default="shakespeare")
  p.add_argument("--rss-growth-limit-mib", type=float, default=16.0,
                 help="host memory counts as flat if it grows less than "
                 "this from the end of the first round to the end")
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)
  if args.steps % args.window:
    p.error("--steps must be a multiple of --window")

  counter = CompileCounter()
  loggers = [logging.getLogger(name) for name in (
      "jax._src.interpreters.pxla", "jax._src.dispatch", "jax._src.compiler")]
  previous = jax.config.jax_log_compiles
  jax.config.update("jax_log_compiles", True)
  for lg in loggers:
    lg.addFilter(counter)
  try:
    return _soak(args, argv, counter)
  finally:                      # leave the process as it was (tests call this)
    jax.config.update("jax_log_compiles", previous)
    for lg in loggers:
      lg.removeFilter(counter)


def _soak(args: argparse.Namespace, argv: list[str] | None,
          counter: CompileCounter) -> dict[str, Any]:
  rounds = args.steps // args.window
  cfg = TrainConfig(
      optimizers=tuple(args.optimizers), d_model=args.d_model,
      num_layers=args.num_layers, num_heads=args.num_heads,
      seq_len=args.seq_len, batch_size=args.batch_size, steps=args.steps,
      lr=args.lr, data=args.data, progress=False)
  corpus = data.load_corpus(args.data)
  graphdef, params0 = loop.init_model(cfg)
  n_params = int(sum(x.size for x in jax.tree.leaves(params0)))
  dev = jax.devices()[0]
  print(f"soak: {args.steps:,} steps x {len(args.optimizers)} optimizers, "
        f"GPT d_model={args.d_model} layers={args.num_layers} "
        f"heads={args.num_heads} ({n_params:,} parameters), seq "
        f"{args.seq_len} x batch {args.batch_size}, {dev.device_kind}; "
        f"{rounds} rounds of {args.window} steps, interleaved", flush=True)

  runners = [Runner(label, cfg, graphdef, params0, args.steps, rounds)
             for label in args.optimizers]
  memory: list[dict[str, Any]] = []
  t_start = time.perf_counter()
  for r in range(rounds):
    order = runners[r % len(runners):] + runners[:r % len(runners)]
    for run in order:
      run.run(args.window, corpus, cfg, counter)
      memory.append({"round": r, "after": run.label,
                     "steps_total": sum(x.done for x in runners),
                     "rss_bytes": rss_bytes(), **device_memory()})
    done = (r + 1) * args.window
    if (r + 1) % max(1, rounds // 10) == 0 or r == rounds - 1:
      med = {x.label: np.median(x.times[done - args.window:done]) * 1e3
             for x in runners}
      print(f"  step {done:>6,} / {args.steps:,}  "
            f"{time.perf_counter() - t_start:7.0f} s  RSS "
            f"{memory[-1]['rss_bytes'] / MIB:7.1f} MiB  median ms: "
            + " ".join(f"{v:.2f}" for v in med.values()), flush=True)
  wall = time.perf_counter() - t_start

  ref = runners[0]
  results = []
  for run in runners:
    types_end = {"params": leaf_types(run.state.params),
                 "opt_state": leaf_types(run.state.opt_state)}
    wins = []
    for w in range(rounds):
      sl = slice(w * args.window, (w + 1) * args.window)
      st = window_stats(run.times[sl])
      st["ratio_to_" + ref.label] = (
          st["median_ms"] / float(np.median(ref.times[sl]) * 1e3))
      st["steps"] = [sl.start + 1, sl.stop]
      wins.append(st)
    first, last = wins[1 if rounds > 1 else 0], wins[-1]   # window 0 compiles
    results.append({
        "label": run.label,
        "state_bytes": run.state_bytes,
        "compile": {
            "cache_size_after_step_1": run.cache_size_after_first,
            "cache_size_at_end": run.step_fn._cache_size(),
            "logged_compiles_total": counter.counts.get(run.label, 0),
            "logged_compiles_after_step_1": run.compiles_after_first,
            "logged_names": counter.names.get(run.label, []),
        },
        "dtypes": {"stable": types_end == run.types_start,
                   "start": run.types_start,
                   "changed": [[a, b] for k in ("params", "opt_state")
                               for a, b in zip(run.types_start[k],
                                               types_end[k], strict=True)
                               if a != b]},
        "step_1_ms": float(run.times[0] * 1e3),
        "median_ms": float(np.median(run.times[1:]) * 1e3),
        "mean_ms": float(np.mean(run.times[1:]) * 1e3),
        "median_ratio_to_" + ref.label: float(
            np.median(run.times[1:]) / np.median(ref.times[1:])),
        "drift_last_over_second_window": last["median_ms"] / first["median_ms"],
        "loss_first_window": float(np.mean(run.losses[:args.window])),
        "loss_last_window": float(np.mean(run.losses[-args.window:])),
        "nonfinite_losses": int(np.sum(~np.isfinite(run.losses))),
        "windows": wins,
    })

  after_first = [m for m in memory if m["round"] >= 1] or memory
  rss = [m["rss_bytes"] for m in after_first]
  live = [m["live_bytes"] for m in after_first]
  steps_axis = [m["steps_total"] for m in after_first]
  growth = (rss[-1] - memory[len(runners) - 1]["rss_bytes"]) / MIB
  summary_memory = {
      "rss_start_mib": memory[len(runners) - 1]["rss_bytes"] / MIB,
      "rss_end_mib": memory[-1]["rss_bytes"] / MIB,
      "rss_growth_after_first_round_mib": growth,
      "rss_max_minus_min_after_first_round_mib": (max(rss) - min(rss)) / MIB,
      "rss_slope_second_half_mib_per_1k_steps": slope_mib_per_1k(
          steps_axis, rss),
      "rss_flat": bool(growth < args.rss_growth_limit_mib),
      "rss_flat_rule": f"growth after the first round < "
                       f"{args.rss_growth_limit_mib} MiB",
      "live_arrays_start": after_first[0]["live_arrays"],
      "live_arrays_end": memory[-1]["live_arrays"],
      "live_bytes_start": after_first[0]["live_bytes"],
      "live_bytes_end": memory[-1]["live_bytes"],
      "live_bytes_max_minus_min": max(live) - min(live),
      "device_memory_stats": dev.memory_stats() is not None,
  }

  print()
  head = (f"{'optimizer':<30} {'step1 ms':>9} {'median ms':>9} "
          f"{'x ' + ref.label:>8} {'drift':>6} {'recompiles':>10} "
          f"{'dtypes':>7} {'loss first→last':>16}")
  print(head)
  print("-" * len(head))
  for res in results:
    c = res["compile"]
    recompiles = (c["cache_size_at_end"] - c["cache_size_after_step_1"]
                  + c["logged_compiles_after_step_1"])
    print(f"{res['label']:<30} {res['step_1_ms']:9.0f} "
          f"{res['median_ms']:9.3f} "
          f"{res['median_ratio_to_' + ref.label]:8.2f} "
          f"{res['drift_last_over_second_window']:6.2f} "
          f"{recompiles:10d} {'stable' if res['dtypes']['stable'] else 'DRIFT':>7} "
          f"{res['loss_first_window'] / np.log(2):7.3f}→"
          f"{res['loss_last_window'] / np.log(2):<7.3f}")
  m = summary_memory
  print(f"\nhost RSS {m['rss_start_mib']:.1f} MiB after the first round → "
        f"{m['rss_end_mib']:.1f} MiB at the end (growth "
        f"{m['rss_growth_after_first_round_mib']:+.1f} MiB, slope "
        f"{m['rss_slope_second_half_mib_per_1k_steps']:+.3f} MiB/1k steps over "
        f"the second half); live JAX arrays {m['live_arrays_start']} → "
        f"{m['live_arrays_end']} ({m['live_bytes_start'] / MIB:.2f} → "
        f"{m['live_bytes_end'] / MIB:.2f} MiB); device memory_stats: "
        f"{'yes' if m['device_memory_stats'] else 'not available'}")
  print(f"drift = median of the last window / median of the second; losses "
        f"in bits per byte (window means); wall {wall / 60:.1f} min")

  result = {
      "benchmark": "soak",
      "command": [sys.argv[0], *(sys.argv[1:] if argv is None else argv)],
      "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
      "commit": git_commit(),
      "versions": {"python": platform.python_version(),
                   "jax": jax.__version__, "jaxlib": jaxlib.__version__,
                   "optax": optax.__version__, "numpy": np.__version__,
                   "cgf_optax": cgf_optax.__version__},
      "device": {"kind": dev.device_kind, "platform": dev.platform,
                 "count": jax.device_count(), "host_cpus": os.cpu_count()},
      "config": {"steps": args.steps, "window": args.window,
                 "rounds": rounds, "optimizers": args.optimizers,
                 "model": {"d_model": args.d_model,
                           "num_layers": args.num_layers,
                           "num_heads": args.num_heads,
                           "parameters": n_params},
                 "seq_len": args.seq_len, "batch_size": args.batch_size,
                 "lr": args.lr, "data": corpus.describe(),
                 "order": "interleaved: each round runs one window of every "
                          "optimizer, order rotated per round",
                 "timing": "jitted step + block_until_ready of params, state "
                           "and metrics; host batch creation excluded",
                 "step": "cgf_optax.train.step.make_train_step (as cgf-optax "
                         "train, telemetry off)",
                 "optimizer_build": "cgf_optax.train.optimizers."
                                    "build_optimizer (as cgf-optax train)"},
      "wall_s": wall,
      "memory": summary_memory,
      "memory_samples": memory,
      "results": results,
  }
  out = args.out or os.path.join(
      os.path.dirname(os.path.abspath(__file__)), "results",
      f"soak-{'cpu' if dev.platform == 'cpu' else dev.device_kind}.json"
      .replace(" ", "-"))
  print(f"wrote {write_json(result, out)}")
  return result


if __name__ == "__main__":
  main()
