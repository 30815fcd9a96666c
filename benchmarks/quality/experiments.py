"""The experiments of the quality benchmark, one function each.

Each takes a :class:`Preset` and an output folder, writes
``<name>.json`` (and plots, see :mod:`benchmarks.quality.plots`) there and
returns the JSON object.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from cgf_optax.train import GPT, gpt_config
from cgf_optax.train.data import load_corpus

from . import plots
from .arms import ARMS, MAIN, Arm, lr_grid
from .harness import (
    INITS,
    Data,
    Run,
    Setup,
    Trainer,
    corrupt,
    init_params,
    shakespeare_data,
    t_interval,
    variability,
)


@dataclasses.dataclass(frozen=True)
class Preset:
  name: str
  setup: Setup
  arms: tuple[str, ...]
  lr_points: int
  seeds: tuple[int, ...]            # final seeds at the best learning rate
  reuse_sweep_seed: bool            # seeds[0] is the sweep's run at best lr
  table_arms: tuple[str, ...]       # arms of the papers' tables
  table_seeds: tuple[int, ...]
  context_lengths: tuple[int, ...]
  noise_levels: tuple[float, ...]
  inits: tuple[str, ...]
  python_bytes: int = 2_000_000


PRESETS: dict[str, Preset] = {
    "reduced": Preset(
        "reduced",
        Setup(d_model=64, num_layers=2, num_heads=4, seq_len=64,
              batch_size=16, steps=120, warmup=12, eval_every=20,
              curve_batches=2, final_batches=8),
        tuple(ARMS), lr_points=3, seeds=(0, 1, 2), reuse_sweep_seed=True,
        table_arms=("adamw", "cgfm_adamw", "cegm_adamw"),
        table_seeds=(0, 1, 2),
        context_lengths=(128, 256), noise_levels=(0.0, 0.1, 0.2, 0.4),
        inits=tuple(INITS)),
    "full": Preset(
        "full",
        Setup(d_model=128, num_layers=2, num_heads=4, seq_len=128,
              batch_size=16, steps=600, warmup=60, eval_every=25,
              curve_batches=4, final_batches=16),
        tuple(ARMS), lr_points=5, seeds=(1, 2, 3, 4, 5),
        reuse_sweep_seed=False, table_arms=MAIN, table_seeds=(1, 2, 3),
        context_lengths=(128, 256, 512, 1024),
        noise_levels=(0.0, 0.1, 0.2, 0.4), inits=tuple(INITS)),
    # For the test suite: seconds, nothing meaningful.
    "smoke": Preset(
        "smoke",
        Setup(d_model=16, num_layers=1, num_heads=2, seq_len=16, batch_size=4,
              steps=4, warmup=1, eval_every=2, curve_batches=1,
              final_batches=1),
        ("adamw", "ema_adamw"), lr_points=2, seeds=(0, 1),
        reuse_sweep_seed=True, table_arms=("adamw",), table_seeds=(0,),
        context_lengths=(16, 32), noise_levels=(0.0, 0.4),
        inits=("xavier_normal",), python_bytes=200_000),
}

_TRAINERS: dict[tuple[str, Setup], Trainer] = {}


def log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def trainer(arm: Arm, setup: Setup) -> Trainer:
  key = (arm.name, setup)
  if key not in _TRAINERS:
    graphdef, _ = init_params(setup, 0)
    _TRAINERS[key] = Trainer(arm, setup, graphdef)
  return _TRAINERS[key]


def run_one(arm: Arm, setup: Setup, data: Data, lr: float, seed: int,
            init: str = "default") -> Run:
  _, params0 = init_params(setup, seed, init)
  r = trainer(arm, setup).run(params0, data, lr, seed)
  fin = r.final.get("test")
  log(f"  {arm.name:22s} lr={lr:.3g} seed={seed} init={init} "
      f"test={fin if fin is None else round(fin, 4)} "
      f"({r.time[-1]:.1f}s + compile {r.compile_s:.1f}s)")
  return r


def _write(out: Path, name: str, obj: dict[str, Any]) -> dict[str, Any]:
  out.mkdir(parents=True, exist_ok=True)
  (out / f"{name}.json").write_text(json.dumps(obj, indent=1, default=float))
  return obj


def _header(preset: Preset, command: str) -> dict[str, Any]:
  return {"preset": preset.name, "command": command,
          "setup": dataclasses.asdict(preset.setup),
          "jax": jax.__version__, "device": str(jax.devices()[0]),
          "devices": jax.device_count()}


def _stat(values: list[Any]) -> dict[str, Any]:
  return t_interval([v for v in values if v is not None])


# --------------------------------------------------------------- main

def main(preset: Preset, out: Path, command: str, merge: bool = False
         ) -> dict[str, Any]:
  """Equal tuning, seeds, steps/time to AdamW's loss, variability, memory.

  With ``merge``, the arms run (``preset.arms``, typically a new one) are
  added to (or replace their entries in) an existing ``main.json`` of the
  same setup, and their steps/time to AdamW's loss are measured against the
  target stored there; the other arms are not re-run.
  """
  setup = preset.setup
  data = shakespeare_data()
  old: dict[str, Any] | None = None
  if merge:
    path = out / "main.json"
    if not path.exists():
      raise FileNotFoundError(f"--arms merges into {path}, which does not "
                              "exist: run the whole 'main' experiment first")
    old = json.loads(path.read_text())
    if old["setup"] != dataclasses.asdict(setup):
      raise ValueError(f"{path} was made with another setup "
                       f"({old['setup']}); cannot merge")
  res = _header(preset, command)
  res["data"] = data.describe
  res["protocol"] = (
      f"{preset.lr_points} learning rates per arm (log-spaced, ×3 apart, "
      "centred on the family's usual value), warm-up + cosine, weight decay "
      f"{setup.weight_decay} on matrices, clip {setup.clip_norm}; best lr = "
      "lowest final loss on the 'sel' plays (seed 0); then seeds "
      f"{list(preset.seeds)} at that lr"
      + (" (seed 0 is the sweep's run)" if preset.reuse_sweep_seed else "")
      + "; reported: final loss on the disjoint 'test' plays, mean and "
      "95% Student-t interval")
  arms: dict[str, Any] = {}
  runs: dict[str, list[Run]] = {}
  for name in preset.arms:
    arm = ARMS[name]
    grid = lr_grid(arm, preset.lr_points)
    log(f"[main] {name}: sweep {[f'{g:.3g}' for g in grid]}")
    try:
      sweep = [run_one(arm, setup, data, lr, 0) for lr in grid]
    except Exception as e:  # noqa: BLE001 - one broken arm must not end the run
      log(f"  {name} FAILED: {e!r}")
      arms[name] = {"group": arm.group, "doc": arm.doc, "error": repr(e)}
      continue
    sel = [r.final["sel"] if r.final["sel"] is not None else math.inf
           for r in sweep]
    b = int(np.argmin(sel))
    best = grid[b]
    seeds = []
    for s in preset.seeds:
      if preset.reuse_sweep_seed and s == 0:
        seeds.append(sweep[b])
      else:
        seeds.append(run_one(arm, setup, data, best, s))
    runs[name] = seeds
    arms[name] = {
        "group": arm.group, "doc": arm.doc,
        "lr_grid": grid, "sweep_sel": [None if math.isinf(v) else v
                                       for v in sel],
        "best_lr": best, "best_at_edge": b in (0, len(grid) - 1),
        "test": _stat([r.final["test"] for r in seeds]),
        "sel": _stat([r.final["sel"] for r in seeds]),
        "diverged": sum(r.diverged for r in seeds),
        "state_bytes": seeds[0].state_bytes,
        "compile_s": max(r.compile_s for r in sweep),
        "tokens_per_s": _stat([setup.steps * setup.batch_size * setup.seq_len
                               / r.time[-1] for r in seeds]),
    }
    var = [variability(r.grad_norm, r.grad_cos, r.update_cos, setup.warmup)
           for r in seeds]
    arms[name]["variability"] = {k: _stat([v[k] for v in var])
                                 for k in var[0]}
  # Steps and wall-clock to AdamW's final loss (on the fixed 'test' curve).
  target = None
  if "adamw" in runs:
    target = float(np.mean([r.curve["test"][-1] for r in runs["adamw"]]))
  elif old is not None:
    target = old.get("target_test_bits")
  if target is not None:
    res["target_test_bits"] = target
    for name, rs in runs.items():
      st = [r.steps_to(target) for r in rs]
      tt = [r.time_to(target) for r in rs]
      arms[name]["steps_to_target"] = {"per_seed": st, **_stat(st)}
      arms[name]["time_to_target"] = {"per_seed": tt, **_stat(tt)}
      arms[name]["reached"] = sum(s is not None for s in st)
  res["arms"] = arms
  res["runs"] = {n: [r.to_json() for r in rs] for n, rs in runs.items()}
  if old is not None:
    merged = dict(old)
    merged["arms"] = {**old["arms"], **arms}
    merged["runs"] = {**old.get("runs", {}), **res["runs"]}
    merged["merged"] = [*old.get("merged", []),
                        {"arms": list(arms), "command": command,
                         "jax": res["jax"], "device": res["device"]}]
    res = merged
  _write(out, "main", res)
  plots.main(res, out)
  return res


def best_lrs(out: Path, names: tuple[str, ...]) -> dict[str, Any]:
  """Best learning rates from ``main.json`` (grid centre if absent)."""
  path = out / "main.json"
  got = json.loads(path.read_text())["arms"] if path.exists() else {}
  return {n: {"lr": got[n]["best_lr"], "source": "main.json"} if n in got
          else {"lr": ARMS[n].lr_center,
                "source": "grid centre (main not run)"} for n in names}


def _grid_experiment(preset: Preset, out: Path, command: str, name: str,
                     levels: list[Any], level_key: str,
                     make: Callable[[Any], tuple[Setup, Data, str]],
                     evals: tuple[str, ...] = ("test",)) -> dict[str, Any]:
  """arm × level × seed at the arm's best lr; summary per eval set."""
  lrs = best_lrs(out, preset.table_arms)
  res = _header(preset, command)
  res["lrs"] = lrs
  res["levels"] = levels
  table: dict[str, Any] = {}
  raw: dict[str, Any] = {}
  for level in levels:
    setup, data, init = make(level)
    for a in preset.table_arms:
      log(f"[{name}] {level_key}={level} {a}")
      rs = [run_one(ARMS[a], setup, data, lrs[a]["lr"], s, init)
            for s in preset.table_seeds]
      key = f"{a}|{level}"
      table[key] = {e: _stat([r.final[e] for r in rs]) for e in evals}
      raw[key] = [{"seed": r.seed, "final": r.final, "position": r.position,
                   "steps": r.steps, "curve": r.curve} for r in rs]
  res["table"] = table
  res["runs"] = raw
  return res


# --------------------------------------------------------------- tables

def context(preset: Preset, out: Path, command: str) -> dict[str, Any]:
  """CGFM Table 4 (perplexity vs context length) and CEGM context retention
  (loss by position in the window). Tokens per step are held constant."""
  base = preset.setup
  tokens = base.batch_size * base.seq_len
  data = shakespeare_data()

  def make(length):
    st = dataclasses.replace(base, seq_len=length,
                             batch_size=max(1, tokens // length))
    return st, data, "default"
  res = _grid_experiment(preset, out, command, "context",
                         list(preset.context_lengths), "seq_len", make)
  for key, rs in res["runs"].items():
    pos = np.mean([r["position"]["test"] for r in rs], axis=0)
    n = len(pos)
    edges = [0, max(1, n // 8), n // 4, n // 2, n]
    res["table"][key]["perplexity"] = float(2 ** np.mean(pos))
    res["table"][key]["by_position"] = {
        f"{lo}-{hi}": float(np.mean(pos[lo:hi])) for lo, hi in
        zip(edges[:-1], edges[1:], strict=True) if hi > lo}
    res["table"][key]["far_half"] = _stat(
        [float(np.mean(r["position"]["test"][n // 2:])) for r in rs])
  _write(out, "context", res)
  plots.context(res, out)
  return res


def init(preset: Preset, out: Path, command: str) -> dict[str, Any]:
  """CGFM Table 5: final loss for four initialisers."""
  data = shakespeare_data()
  res = _grid_experiment(preset, out, command, "init", list(preset.inits),
                         "init", lambda i: (preset.setup, data, i))
  spread = {}
  for a in preset.table_arms:
    means = [res["table"][f"{a}|{i}"]["test"]["mean"] for i in preset.inits]
    means = [m for m in means if m is not None]
    spread[a] = {"range": float(np.ptp(means)) if means else None,
                 "std": float(np.std(means)) if means else None}
  res["spread_across_inits"] = spread
  _write(out, "init", res)
  plots.levels(res, out, "init", "initialiser")
  return res


def noise(preset: Preset, out: Path, command: str) -> dict[str, Any]:
  """CEGM noise robustness: a fraction of training bytes corrupted,
  evaluated on clean held-out text."""
  clean = shakespeare_data()

  def make(p):
    return (preset.setup, Data(corrupt(clean.train, p, seed=int(p * 1000)),
                               clean.evals, clean.describe), "default")
  res = _grid_experiment(preset, out, command, "noise",
                         list(preset.noise_levels), "noise", make)
  _write(out, "noise", res)
  plots.levels(res, out, "noise", "fraction of training bytes corrupted")
  return res


def domains(preset: Preset, out: Path, command: str) -> dict[str, Any]:
  """CEGM unseen domains: train without the Roman plays; evaluate on
  held-out plays of the seen genres, on the Roman plays, on Python."""
  data = shakespeare_data(exclude_genres=("roman",))
  py = load_corpus("python", max_bytes=preset.python_bytes).val
  data = Data(data.train, {"test": data.evals["test"],
                           "genre": data.evals["genre"], "python": py},
              data.describe + "; python: held-out stdlib files")
  res = _grid_experiment(preset, out, command, "domains", ["roman-out"],
                         "split", lambda _: (preset.setup, data, "default"),
                         evals=("test", "genre", "python"))
  res["data"] = data.describe
  _write(out, "domains", res)
  plots.domains(res, out)
  return res


def memory(preset: Preset, out: Path, command: str) -> dict[str, Any]:
  """CGFM Fig. 5: optimizer state bytes per arm, from the state's shapes
  (no training), on the benchmark model and on larger presets."""
  res = _header(preset, command)
  sizes = {"bench": dict(d_model=preset.setup.d_model,
                         num_layers=preset.setup.num_layers,
                         num_heads=preset.setup.num_heads)}
  if preset.name != "smoke":
    sizes.update({"small": {}, "125m": {}})
  table: dict[str, Any] = {}
  for size, over in sizes.items():
    cfg = gpt_config("tiny" if size == "bench" else size, **over)
    model = nnx.eval_shape(lambda cfg=cfg: GPT(cfg, rngs=nnx.Rngs(0)))
    _, params = nnx.split(model, nnx.Param)
    p_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    row = {"params_bytes": int(p_bytes)}
    for name in preset.arms:
      st = Setup()  # schedule irrelevant to shapes
      tr = Trainer(ARMS[name], st, None)
      state = jax.eval_shape(tr.tx.init, params)
      row[name] = int(sum(x.size * x.dtype.itemsize
                          for x in jax.tree.leaves(state)))
    table[size] = row
  res["state_bytes"] = table
  _write(out, "memory", res)
  plots.memory(res, out)
  return res


EXPERIMENTS: dict[str, Callable[[Preset, Path, str], dict[str, Any]]] = {
    "main": main, "memory": memory, "context": context, "init": init,
    "noise": noise, "domains": domains,
}
