"""The GPU quality study (issue 20): AdamW and Muon against CGFM and CEGM at
10M–30M parameters, with a protocol fixed before the runs
(docs/claims.md, "Protocol (fixed before the GPU runs)").

Three subcommands, all resumable from the result files in ``--out``::

  python benchmarks/quality/study.py plan --out benchmarks/results/quality/gpu
  python benchmarks/quality/study.py run --out benchmarks/results/quality/gpu \\
      --time-budget 9m
  python benchmarks/quality/study.py aggregate \\
      --out benchmarks/results/quality/gpu

``plan`` writes ``plan.json``: every run the protocol asks for given the
results so far (learning-rate grids extend as the selection runs come in),
the ones still missing, and an estimate of their GPU-minutes. ``run`` trains
the next missing runs through the engine's step
(:class:`benchmarks.quality.harness.Trainer`), one JSON file each under
``runs/``, and stops before ``--time-budget`` would be exceeded; with
``--parallel K`` it runs K at once, spread evenly over the visible GPUs
(several on one GPU when K exceeds their number).
``aggregate`` writes ``summary.md``, ``summary.json`` and plots from the run
files that exist, and refuses to compare runs of different setups.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from benchmarks.quality.arms import ARMS, MUON_FAMILY, MUON_LR, Arm  # noqa: E402
from benchmarks.quality.harness import (  # noqa: E402
    Data,
    Setup,
    Trainer,
    init_params,
    model_cfg,
)

THROUGHPUT_FILE = "benchmarks/results/engine_throughput-h200.json"
SQRT2 = math.sqrt(2.0)

# ------------------------------------------------------------------ protocol


@dataclasses.dataclass(frozen=True)
class Size:
  """A model size and its token budget (tokens per parameter)."""

  name: str
  d_model: int
  num_layers: int
  num_heads: int
  tokens_per_param: float
  arms: tuple[str, ...]
  ablations: tuple[str, ...] = ()    # dropped first when over budget
  beyond: tuple[str, ...] = ()       # chains beyond the papers
  scaled_from: str | None = None     # the size whose optimum centres grids


@dataclasses.dataclass(frozen=True)
class Protocol:
  """Everything the study fixes before the runs."""

  name: str
  corpus: str
  sizes: tuple[Size, ...]
  optional: tuple[Size, ...] = ()
  batch_size: int = 64
  seq_len: int = 512
  warmup_frac: float = 0.02
  min_lr_ratio: float = 0.1
  weight_decay: float = 0.1
  clip_norm: float = 1.0
  eval_points: int = 100            # curve evaluations per run
  curve_batches: int = 4
  final_batches: int = 32
  selection_seed: int = 0
  report_seeds: tuple[int, ...] = (1, 2, 3)
  speedup_budgets: tuple[float, ...] = (1.25, 1.5)   # AdamW only
  refine: tuple[str, ...] = ("adamw", "cgfm_adamw")  # √2 points at the best
  adam_lr: float = 3e-3          # Muon-family Adam rate before its sweep
  max_extend: int = 4            # ×2 steps a grid may extend by, per side
  min_effect: float = 0.01       # bits/byte: the smallest gain that counts
  level: float = 0.95
  gpu_minutes_target: float = 150.0
  overhead_min: float = 1.0      # assumed compile + evaluation per run

  def size(self, name: str) -> Size:
    for s in self.sizes + self.optional:
      if s.name == name:
        return s
    raise KeyError(name)


_MAIN = ("adamw", "muon", "cgfm", "cgfm_adamw", "cegm", "cegm_adamw")
_ABLATIONS = ("cgfm_decompose_only", "cgfm_modulate_only",
              "cegm_normalize_only", "cegm_entangle_only")
_BEYOND = ("cgfm_muon", "cegm_muon")
_AT_30M = ("adamw", "muon", "cgfm_adamw", "cegm_adamw")

PROTOCOLS: dict[str, Protocol] = {
    "gpu": Protocol(
        "gpu", corpus="pylib",
        sizes=(Size("10m", 384, 6, 6, 20.0, _MAIN, _ABLATIONS, _BEYOND),
               Size("30m", 512, 10, 8, 10.0, _AT_30M, (), ("best-beyond",),
                    scaled_from="10m")),
        optional=(Size("85m", 768, 12, 12, 10.0, _AT_30M, (),
                       ("best-beyond",), scaled_from="30m"),)),
    # For the test suite: seconds on a CPU, nothing meaningful.
    "tiny": Protocol(
        "tiny", corpus="shakespeare",
        sizes=(Size("t1", 16, 1, 2, 0.035, ("adamw", "cgfm_adamw"),
                    ("cegm_normalize_only",)),),
        batch_size=4, seq_len=16, eval_points=2, curve_batches=1,
        final_batches=1, report_seeds=(1, 2), speedup_budgets=(1.5,),
        gpu_minutes_target=1e9),
}


def n_params(protocol: Protocol, size: Size) -> int:
  return model_cfg(_setup_shape(protocol, size)).num_params()


def _setup_shape(protocol: Protocol, size: Size) -> Setup:
  return Setup(d_model=size.d_model, num_layers=size.num_layers,
               num_heads=size.num_heads, seq_len=protocol.seq_len,
               batch_size=protocol.batch_size, steps=1, warmup=0,
               eval_every=1)


def setup_of(protocol: Protocol, size: Size, budget: float,
             on_gpu: bool = False) -> Setup:
  """The run's :class:`Setup`: steps for ``budget`` × the size's tokens
  (rounded up to a multiple of the evaluation interval), bfloat16 compute
  and cuDNN attention on GPUs."""
  tokens = budget * size.tokens_per_param * n_params(protocol, size)
  steps = max(1, math.ceil(tokens / (protocol.batch_size * protocol.seq_len)))
  every = max(1, steps // protocol.eval_points)
  steps = math.ceil(steps / every) * every
  return dataclasses.replace(
      _setup_shape(protocol, size), steps=steps, eval_every=every,
      warmup=max(1, round(protocol.warmup_frac * steps)),
      min_lr_ratio=protocol.min_lr_ratio,
      weight_decay=protocol.weight_decay, clip_norm=protocol.clip_norm,
      curve_batches=protocol.curve_batches,
      final_batches=protocol.final_batches,
      dtype="bfloat16" if on_gpu else "float32",
      attention="cudnn" if on_gpu else None)


# ------------------------------------------------------------------ runs


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One run. Learning rates are ``centre × 2^(k/2)`` (k in half-octaves,
  so grid points are exact and file names stable)."""

  size: str
  arm: str
  role: str                # "selection", "report" or "speedup"
  k: int
  lr: float
  seed: int
  budget: float = 1.0
  adam_k: int | None = None     # Muon family: its Adam rate's half-octave
  adam_lr: float | None = None

  @property
  def id(self) -> str:
    out = f"{self.size}-{self.arm}-lr{self.k:+d}"
    if self.adam_k is not None:
      out += f"-alr{self.adam_k:+d}"
    out += f"-s{self.seed}"
    if self.budget != 1.0:
      out += f"-x{self.budget:g}"
    return out


def arm_of(spec: RunSpec) -> Arm:
  """The optimizer of a run (the Muon family is built for its Adam rate)."""
  if spec.arm in MUON_FAMILY:
    return MUON_FAMILY[spec.arm](spec.arm, spec.adam_lr, spec.lr)
  return ARMS[spec.arm]


def lr_at(center: float, k: int) -> float:
  return float(center * 2.0 ** (k / 2))


def centre(protocol: Protocol, size: Size, arm: str,
           chosen: dict[tuple[str, str], RunSpec]) -> float | None:
  """The grid centre: the arm's a-priori rate, or at a scaled size the
  optimum of ``size.scaled_from`` × its width ratio (None until known)."""
  if size.scaled_from is None:
    return MUON_LR if arm in MUON_FAMILY else ARMS[arm].lr_center
  best = chosen.get((size.scaled_from, arm))
  if best is None:
    return None
  return best.lr * protocol.size(size.scaled_from).d_model / size.d_model


def _loss(results: dict[str, dict], spec: RunSpec, key: str) -> float | None:
  """Final loss of a finished run (inf if it diverged), None if not run."""
  r = results.get(spec.id)
  if r is None:
    return None
  v = r["final"].get(key)
  return math.inf if v is None or r.get("diverged") else float(v)


def grid_search(make: Any, ks: Iterable[int], results: dict[str, dict],
                refine: bool, max_extend: int
                ) -> tuple[list[RunSpec], RunSpec | None]:
  """The grid rule on selection losses: start from ``ks``; while the best
  point is at an edge, add the next point ×2 out (at most ``max_extend``
  times per side); with ``refine``, then add the ×√2 points around the best.
  Returns every run of the grid so far and the chosen one (None while a
  run of the grid is missing)."""
  ks = set(ks)
  lo, hi = min(ks), max(ks)
  refined = False
  while True:
    specs = [make(k) for k in sorted(ks)]
    losses = [_loss(results, s, "sel") for s in specs]
    if any(v is None for v in losses):
      return specs, None
    best = min(range(len(specs)), key=lambda i: (losses[i], specs[i].k))
    kb = specs[best].k
    if kb == max(ks) and max(ks) < hi + 2 * max_extend:
      ks.add(kb + 2)
    elif kb == min(ks) and min(ks) > lo - 2 * max_extend:
      ks.add(kb - 2)
    elif refine and not refined:
      ks |= {kb - 1, kb + 1}
      refined = True
    else:
      return specs, specs[best]


def select(protocol: Protocol, size: Size, arm: str, results: dict[str, dict],
           chosen: dict[tuple[str, str], RunSpec]
           ) -> tuple[list[RunSpec], RunSpec | None]:
  """The selection runs of one arm at one size and its chosen run.

  The Muon family first sweeps its own rate with Adam at the protocol's
  ``adam_lr``, then (Muon itself) sweeps the Adam rate at the chosen rate.
  """
  c = centre(protocol, size, arm, chosen)
  if c is None:
    return [], None
  seed = protocol.selection_seed
  scaled = size.scaled_from is not None
  extend = protocol.max_extend
  if arm not in MUON_FAMILY:
    return grid_search(
        lambda k: RunSpec(size.name, arm, "selection", k, lr_at(c, k), seed),
        (-2, 0, 2), results, arm in protocol.refine and not scaled, extend)
  a0 = (chosen[(size.scaled_from, arm)].adam_lr * protocol.size(
      size.scaled_from).d_model / size.d_model if scaled else protocol.adam_lr)
  runs, best = grid_search(
      lambda k: RunSpec(size.name, arm, "selection", k, lr_at(c, k), seed,
                        adam_k=0, adam_lr=a0),
      (-2, 0, 2), results, False, extend)
  if best is None or arm != "muon" or scaled:
    return runs, best
  k, lr = best.k, best.lr
  more, best = grid_search(
      lambda j: RunSpec(size.name, arm, "selection", k, lr, seed, adam_k=j,
                        adam_lr=lr_at(a0, j)),
      (-2, 0, 2), results, False, extend)
  return runs + [r for r in more if r.adam_k != 0], best


def _report(spec: RunSpec, seed: int, budget: float = 1.0,
            role: str = "report") -> RunSpec:
  return dataclasses.replace(spec, role=role, seed=seed, budget=budget)


def best_beyond(protocol: Protocol, size: Size, results: dict[str, dict],
                chosen: dict[tuple[str, str], RunSpec]) -> str | None:
  """The beyond-the-papers arm with the lowest mean test loss over the
  report seeds at ``size`` (None until all their report runs exist)."""
  means = {}
  for arm in size.beyond:
    spec = chosen.get((size.name, arm))
    if spec is None:
      return None
    vals = [_loss(results, _report(spec, s), "test")
            for s in protocol.report_seeds]
    if any(v is None for v in vals):
      return None
    means[arm] = float(np.mean(vals))
  return min(sorted(means), key=means.get) if means else None


def arms_at(protocol: Protocol, size: Size, dropped: tuple[str, ...],
            results: dict[str, dict],
            chosen: dict[tuple[str, str], RunSpec]) -> list[str]:
  out = list(size.arms) + [a for a in size.ablations if a not in dropped]
  for arm in size.beyond:
    if arm == "best-beyond":
      src = protocol.size(size.scaled_from)
      b = best_beyond(protocol, src, results, chosen)
      if b is not None:
        out.append(b)
    else:
      out.append(arm)
  return out


def plan_runs(protocol: Protocol, results: dict[str, dict],
              dropped: tuple[str, ...] = (), sizes: Iterable[Size] = ()
              ) -> tuple[list[RunSpec], dict[tuple[str, str], RunSpec]]:
  """Every run the protocol asks for given ``results`` (run id -> result),
  in the order they should run, and the chosen selection run per
  (size, arm)."""
  runs: list[RunSpec] = []
  chosen: dict[tuple[str, str], RunSpec] = {}
  for size in sizes or protocol.sizes:
    for arm in arms_at(protocol, size, dropped, results, chosen):
      sel, best = select(protocol, size, arm, results, chosen)
      runs += sel
      if best is None:
        continue
      chosen[(size.name, arm)] = best
      runs += [_report(best, s) for s in protocol.report_seeds]
      if arm == "adamw":
        runs += [_report(best, s, b, "speedup")
                 for b in protocol.speedup_budgets
                 for s in protocol.report_seeds]
  return runs, chosen


def projected_arms(size: Size, dropped: tuple[str, ...]) -> list[str]:
  """The arms of a size for the estimate (the best beyond-the-papers
  variant, not yet known, counted as ``cgfm_muon``)."""
  return (list(size.arms) + [a for a in size.ablations if a not in dropped]
          + ["cgfm_muon" if a == "best-beyond" else a for a in size.beyond])


def projected(protocol: Protocol, size: Size, arms: list[str]) -> list[
    RunSpec]:
  """The runs a size needs if no grid extends: 3 selection points (+2 for
  the refined arms, +2 for Muon's Adam rate), the report seeds, AdamW's
  longer budgets. For the budget estimate before any result exists."""
  out = []
  for arm in arms:
    n = 3 + (2 if arm in protocol.refine and not size.scaled_from else 0)
    n += 2 if arm == "muon" and not size.scaled_from else 0
    out += [RunSpec(size.name, arm, "selection", i, 0.0, 0)
            for i in range(n)]
    out += [RunSpec(size.name, arm, "report", 0, 0.0, s)
            for s in protocol.report_seeds]
    if arm == "adamw":
      out += [RunSpec(size.name, arm, "speedup", 0, 0.0, s, b)
              for b in protocol.speedup_budgets
              for s in protocol.report_seeds]
  return out


# ------------------------------------------------------------------ estimate


def throughput_table(path: Path = ROOT / THROUGHPUT_FILE) -> dict[str, Any]:
  """Tokens/s of the engine's loop (``cli_tokens_per_s``) per size and
  optimizer, from the measured throughput file."""
  d = json.loads(path.read_text())
  return {"file": THROUGHPUT_FILE, "device": d["device"], "jax": d["jax"],
          "sizes": {s["size"]: {
              "n_params": s["n_params"], "batch": s["batch"],
              "seq": s["seq"],
              "tokens_per_s": {r["optimizer"].split(":")[0]:
                               r["cli_tokens_per_s"] for r in s["rows"]}}
              for s in d["sizes"]}}


def _family(arm: str) -> str:
  """Which measured optimizer's speed stands for an arm: CGFM's
  decomposition, CEGM's context, plain AdamW; the slowest measured one for
  arms not measured (Muon and the chains)."""
  if arm == "adamw":
    return "adamw"
  if arm in ("cegm", "cegm_adamw", "cegm_entangle_only",
             "cegm_normalize_only"):
    return "cegm_adamw"
  return "cgfm_adamw"


def measured_minutes(spec: RunSpec, results: dict[str, dict]
                     ) -> float | None:
  """GPU-minutes of a run of the same size, arm and budget as ``spec``
  measured so far: the median of wall time over the runs that shared the
  device with it; None if there is none (or none says how many ran)."""
  shares = [r["wall_s"] / r["concurrent"] / 60.0 for r in results.values()
            if r.get("concurrent") and _spec(r).size == spec.size
            and _spec(r).arm == spec.arm and _spec(r).budget == spec.budget]
  return float(np.median(shares)) if shares else None


def run_minutes(protocol: Protocol, spec: RunSpec, table: dict[str, Any]
                ) -> float:
  """Estimated GPU-minutes of a run: its tokens at the measured tokens/s of
  the 25M configuration (scaled down by FLOPs/token for larger models, not
  up for smaller ones), plus an assumed ``overhead_min``."""
  size = protocol.size(spec.size)
  ref = table["sizes"]["25m"]
  st = setup_of(protocol, size, spec.budget)
  tokens = st.steps * st.batch_size * st.seq_len
  ref_cfg = model_cfg(dataclasses.replace(st, d_model=512, num_layers=8,
                                          num_heads=8, seq_len=ref["seq"]))
  ratio = ref_cfg.flops_per_token(ref["seq"]) / model_cfg(st).flops_per_token(
      st.seq_len)
  tps = ref["tokens_per_s"][_family(spec.arm)] * min(1.0, ratio)
  return tokens / tps / 60.0 + protocol.overhead_min


# ------------------------------------------------------------------ files


def load_results(out: Path) -> dict[str, dict]:
  """Run id -> result of every run file under ``out/runs``."""
  d = out / "runs"
  if not d.is_dir():
    return {}
  res = {}
  for f in sorted(d.glob("*.json")):
    r = json.loads(f.read_text())
    res[r["spec"]["id"]] = r
  return res


def write_json(path: Path, obj: Any) -> None:
  """Atomic: a temporary file renamed over ``path``."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  tmp.write_text(json.dumps(obj, indent=1, default=float))
  tmp.replace(path)


def make_plan(protocol: Protocol, out: Path) -> dict[str, Any]:
  """The plan given the run files in ``out``, with the dropped ablations
  and the GPU-minute estimate."""
  results = load_results(out)
  table = throughput_table()
  dropped: list[str] = []

  def minutes(r: RunSpec) -> float:
    m = measured_minutes(r, results)
    return run_minutes(protocol, r, table) if m is None else m

  def total(drop: list[str]) -> float:
    return sum(minutes(r) for size in protocol.sizes
               for r in projected(protocol, size,
                                  projected_arms(size, tuple(drop))))
  for size in protocol.sizes:
    for a in size.ablations:
      if total(dropped) <= protocol.gpu_minutes_target:
        break
      dropped.append(a)
  runs, chosen = plan_runs(protocol, results, tuple(dropped))
  missing = [r for r in runs if r.id not in results]
  over = total(dropped) > protocol.gpu_minutes_target
  note = (f"projected {total(dropped):.0f} GPU-min exceeds the "
          f"{protocol.gpu_minutes_target:.0f} target even without the "
          "ablations; the estimate takes the GPU share of the runs "
          "measured so far (wall time over the runs sharing the device) "
          "and, for arms not yet run, is conservative (the 25M tokens/s for "
          "10M, the slowest measured optimizer for the unmeasured arms, 1 "
          "assumed minute per run); cut next, in this order, if "
          "measured times confirm it: AdamW's longer budgets at 30m, "
          "cgfm and cegm (SGD forms) at 10m, the second "
          "beyond-the-papers chain" if over else None)
  optional = [r for s in protocol.optional
              for r in projected(protocol, s, projected_arms(s, ()))]
  return {
      "protocol": protocol.name,
      "protocol_config": dataclasses.asdict(protocol),
      "corpus": protocol.corpus,
      "sizes": {s.name: {"n_params": n_params(protocol, s),
                         "tokens": setup_of(protocol, s, 1.0).steps
                         * protocol.batch_size * protocol.seq_len,
                         "setup": dataclasses.asdict(setup_of(protocol, s,
                                                              1.0))}
                for s in protocol.sizes + protocol.optional},
      "dropped_ablations": dropped,
      "over_target": note,
      "todo": [
          "85m (optional): not planned; a run (~26k steps) exceeds one "
          "command's 10 minutes, so it needs the engine's checkpointed "
          "resume across commands, which study.py run does not do yet",
      ],
      "throughput": {"file": table["file"], "device": table["device"],
                     "jax": table["jax"],
                     "tokens_per_s_25m": table["sizes"]["25m"][
                         "tokens_per_s"]},
      "estimate_gpu_minutes": {
          "projected_total": round(total(dropped), 1),
          "projected_without_dropping": round(total([]), 1),
          "listed_missing": round(sum(
              expected_s(r, protocol, results, {}, table)
              for r in missing) / 60.0, 1),
          "optional_85m": round(sum(run_minutes(protocol, r, table)
                                    for r in optional), 1),
          "assumed_overhead_min_per_run": protocol.overhead_min,
          "measured_arms": sorted({
              f"{_spec(r).size}/{_spec(r).arm}" for r in results.values()
              if r.get("concurrent")}),
      },
      "chosen": {f"{s}/{a}": dataclasses.asdict(r)
                 for (s, a), r in chosen.items()},
      "runs": [{**dataclasses.asdict(r), "id": r.id,
                "done": r.id in results,
                "est_min": round(expected_s(r, protocol, results, {}, table)
                                 / 60.0, 2)}
               for r in runs],
      "missing": [r.id for r in missing],
  }


# ------------------------------------------------------------------ run


def _git() -> dict[str, Any]:
  """The commit that runs: ``$STUDY_COMMIT`` where it is set (a copy of the
  repository whose ``.git`` is missing or stale, as on the device machines),
  else ``git rev-parse HEAD`` and whether the code is modified."""
  if os.environ.get("STUDY_COMMIT"):
    return {"commit": os.environ["STUDY_COMMIT"], "dirty": None,
            "from": "STUDY_COMMIT"}

  def git(*a: str) -> str:
    return subprocess.run(["git", *a], cwd=ROOT, capture_output=True,
                          text=True, check=False).stdout.strip()
  return {"commit": git("rev-parse", "HEAD"),
          "dirty": bool(git("status", "--porcelain", "--", "cgf_optax",
                            "benchmarks/quality"))}


def corpus_info(corpus: Any) -> dict[str, Any]:
  """Name, description, manifest (if the corpus has one) and a sha256 that
  identifies the data (of the manifest, else of the bytes)."""
  manifest = getattr(corpus, "manifest", None)
  h = hashlib.sha256()
  if manifest is not None:
    h.update(json.dumps(manifest, sort_keys=True, default=str).encode())
  else:
    h.update(corpus.train.tobytes())
    h.update(corpus.val.tobytes())
  return {"name": corpus.name, "describe": corpus.describe(),
          "manifest": manifest, "sha256": h.hexdigest()}


def study_data(corpus: Any) -> Data:
  """Training bytes, and the held-out bytes cut in two halves: ``sel``
  (the first) chooses learning rates, ``test`` (the second) reports."""
  half = len(corpus.val) // 2
  return Data(corpus.train, {"sel": corpus.val[:half],
                             "test": corpus.val[half:]}, corpus.describe())


def _subsample(values: list[Any], n: int = 500) -> tuple[list[int], list[Any]]:
  idx = sorted({round(i) for i in np.linspace(0, len(values) - 1,
                                              min(n, len(values)))})
  return idx, [values[i] for i in idx]


def execute(protocol: Protocol, spec: RunSpec, corpus: Any,
            cache: dict[Any, Trainer] | None = None) -> dict[str, Any]:
  """Trains one run and returns its result (not yet written)."""
  import jax
  import optax

  on_gpu = jax.default_backend() == "gpu"
  size = protocol.size(spec.size)
  setup = setup_of(protocol, size, spec.budget, on_gpu)
  arm = arm_of(spec)
  t0 = time.perf_counter()
  graphdef, params0 = init_params(setup, spec.seed)
  key = (spec.arm, spec.lr if spec.arm in MUON_FAMILY else None,
         spec.adam_lr, setup)
  cache = {} if cache is None else cache
  if key not in cache:
    cache[key] = Trainer(arm, setup, graphdef)
  r = cache[key].run(params0, study_data(corpus), spec.lr, spec.seed)
  wall = time.perf_counter() - t0
  tok = setup.batch_size * setup.seq_len
  idx, train_bits = _subsample(r.train_bits)
  dev = jax.devices()[0]
  return {
      "spec": {**dataclasses.asdict(spec), "id": spec.id},
      "protocol": protocol.name,
      "protocol_config": dataclasses.asdict(protocol),
      "arm_doc": arm.doc,
      "setup": dataclasses.asdict(setup),
      "model": {**dataclasses.asdict(model_cfg(setup)),
                "n_params": model_cfg(setup).num_params()},
      "tokens": setup.steps * tok,
      "final": r.final, "diverged": r.diverged,
      "curves": {"step": r.steps, "tokens": [s * tok for s in r.steps],
                 "train_s": r.time, **{k: v for k, v in r.curve.items()}},
      "train_bits": {"step": [i + 1 for i in idx], "bits": train_bits},
      "grad_norm": _subsample(r.grad_norm)[1],
      "telemetry": {k: _subsample(v)[1] for k, v in r.telemetry.items()},
      "wall_s": wall, "train_s": r.time[-1] if r.time else 0.0,
      # Runs sharing its GPU, at most (`run --parallel K` spreads K runs
      # over the visible GPUs): wall_s / concurrent is its GPU share.
      "concurrent": int(os.environ.get("STUDY_CONCURRENT", "1")),
      "compile_s": r.compile_s,
      "tokens_per_s": (len(r.train_bits) * tok / r.time[-1]
                       if r.time and r.time[-1] > 0 else None),
      "state_bytes": r.state_bytes,
      "device_kind": dev.device_kind, "platform": dev.platform,
      "jax": jax.__version__, "optax": optax.__version__,
      "python": platform.python_version(), **_git(),
      "corpus": corpus_info(corpus),
      "finished": datetime.datetime.now(datetime.UTC).isoformat(),
  }


def parse_duration(text: str) -> float:
  """``9m``, ``540s``, ``1h``, ``90`` (seconds) -> seconds."""
  m = re.fullmatch(r"\s*([0-9.]+)\s*([smh]?)\s*", text)
  if not m:
    raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 9m)")
  return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def expected_s(spec: RunSpec, protocol: Protocol, results: dict[str, dict],
               measured: dict[str, float], table: dict[str, Any]) -> float:
  """Seconds the next run should take: the longest run of the same size,
  family and budget measured so far (this command first, then the run
  files), else the plan's estimate."""
  def same(other: RunSpec) -> bool:
    return (other.size == spec.size and other.budget == spec.budget
            and _family(other.arm) == _family(spec.arm))
  here = [s for i, s in measured.items() if same(_spec(results[i]))]
  if here:
    return max(here)
  past = [r["wall_s"] for r in results.values() if same(_spec(r))]
  if past:
    return max(past)
  return run_minutes(protocol, spec, table) * 60.0


def _spec(result: dict[str, Any]) -> RunSpec:
  s = dict(result["spec"])
  s.pop("id", None)
  return RunSpec(**s)


def run_chunk(protocol: Protocol, out: Path, budget_s: float,
              parallel: int = 1, limit: int | None = None,
              say: Any = print) -> list[str]:
  """Runs missing runs of the plan until the next one would not finish
  within ``budget_s`` (or ``limit`` runs are done); returns their ids."""
  t0 = time.perf_counter()
  table = throughput_table()
  done: list[str] = []
  measured: dict[str, float] = {}
  running: dict[str, tuple[subprocess.Popen, float, str | None]] = {}
  gpus = visible_gpus() if parallel > 1 else []
  corpus = None
  cache: dict[Any, Trainer] = {}
  stop = False
  while True:
    plan = make_plan(protocol, out)
    write_json(out / "plan.json", plan)
    results = load_results(out)
    todo = [_spec_of(plan, i) for i in plan["missing"] if i not in running]
    left = budget_s - (time.perf_counter() - t0)
    can = (todo and not stop and len(running) < parallel
           and (limit is None or len(done) + len(running) < limit))
    nxt = todo[0] if can else None
    if nxt is not None and expected_s(nxt, protocol, results, measured,
                                      table) > left:
      say(f"stopping: {nxt.id} would need ~"
          f"{expected_s(nxt, protocol, results, measured, table):.0f}s, "
          f"{left:.0f}s left")
      nxt, stop = None, True
    if nxt is None and not running:
      break
    if nxt is not None and parallel == 1:
      if corpus is None:
        from cgf_optax.train.data import load_corpus
        corpus = load_corpus(protocol.corpus)
      say(f"run {nxt.id} (lr {nxt.lr:.3g})")
      res = execute(protocol, nxt, corpus, cache)
      write_json(out / "runs" / f"{nxt.id}.json", res)
      measured[nxt.id] = res["wall_s"]
      done.append(nxt.id)
      say(f"  done in {res['wall_s']:.0f}s: sel {res['final']['sel']}, "
          f"test {res['final']['test']}")
      continue
    if nxt is not None:
      cmd = [sys.executable, str(Path(__file__)), "run-one", "--out",
             str(out), "--protocol", protocol.name, "--id", nxt.id]
      gpu = pick_gpu([g for _, _, g in running.values()], gpus)
      env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
             "STUDY_CONCURRENT": str(-(-parallel // max(len(gpus), 1)))}
      if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
      running[nxt.id] = (subprocess.Popen(cmd, env=env),
                         time.perf_counter(), gpu)
      say(f"started {nxt.id}" + ("" if gpu is None else f" on GPU {gpu}"))
      continue
    time.sleep(1.0)
    for i, (proc, start, _) in list(running.items()):
      if proc.poll() is not None:
        del running[i]
        if proc.returncode == 0:
          measured[i] = time.perf_counter() - start
          done.append(i)
          say(f"  {i} done in {measured[i]:.0f}s")
        else:      # start nothing more; the others still finish
          say(f"  {i} failed (exit {proc.returncode})")
          stop = True
  return done


def visible_gpus() -> list[str]:
  """The GPUs runs can be spread over: ``$CUDA_VISIBLE_DEVICES`` if set,
  else one per line of ``nvidia-smi -L`` (none without it)."""
  listed = os.environ.get("CUDA_VISIBLE_DEVICES")
  if listed is not None:
    return [g.strip() for g in listed.split(",") if g.strip()]
  try:
    lines = subprocess.run(["nvidia-smi", "-L"], capture_output=True,
                           text=True, check=False, timeout=30).stdout
  except (OSError, subprocess.SubprocessError):
    return []
  return [str(i) for i, line in enumerate(lines.splitlines())
          if line.startswith("GPU ")]


def pick_gpu(busy: list[str | None], gpus: list[str]) -> str | None:
  """The GPU with the fewest runs on it (the first of those), or None
  when there is no GPU to choose."""
  if not gpus:
    return None
  return min(gpus, key=lambda g: (busy.count(g), gpus.index(g)))


def _spec_of(plan: dict[str, Any], run_id: str) -> RunSpec:
  for r in plan["runs"]:
    if r["id"] == run_id:
      return _spec({"spec": {k: v for k, v in r.items()
                             if k not in ("done", "est_min")}})
  raise KeyError(run_id)


def run_one(protocol: Protocol, out: Path, run_id: str) -> None:
  from cgf_optax.train.data import load_corpus
  plan = make_plan(protocol, out)
  spec = _spec_of(plan, run_id)
  res = execute(protocol, spec, load_corpus(protocol.corpus))
  write_json(out / "runs" / f"{spec.id}.json", res)


# ------------------------------------------------------------------ stats


def paired(arm: list[float], base: list[float], level: float = 0.95
           ) -> dict[str, Any]:
  """Seed-by-seed differences ``arm − base``: mean, Student-t interval at
  ``level`` and the two-sided p-value of a zero mean."""
  d = np.asarray(arm, float) - np.asarray(base, float)
  n = len(d)
  mean = float(d.mean())
  if n < 2:
    return {"diffs": d.tolist(), "n": n, "mean": mean, "sd": None,
            "lo": None, "hi": None, "p": None}
  sd = float(d.std(ddof=1))
  se = sd / math.sqrt(n)
  q = float(stats.t.ppf(0.5 + level / 2, n - 1))
  p = (float(2 * stats.t.sf(abs(mean) / se, n - 1)) if se > 0
       else (0.0 if mean != 0 else 1.0))
  return {"diffs": d.tolist(), "n": n, "mean": mean, "sd": sd,
          "lo": mean - q * se, "hi": mean + q * se, "p": p}


def holm(pvalues: list[float]) -> tuple[list[float], list[int]]:
  """Holm's step-down adjusted p-values, and each claim's number of claims
  still open when it is tested (m for the smallest p, then m − 1, ...)."""
  m = len(pvalues)
  order = sorted(range(m), key=lambda i: pvalues[i])
  adj, opened = [0.0] * m, [0] * m
  run = 0.0
  for rank, i in enumerate(order):
    run = max(run, min(1.0, (m - rank) * pvalues[i]))
    adj[i], opened[i] = run, m - rank
  return adj, opened


def verdict(lo: float | None, hi: float | None, mean: float,
            min_effect: float) -> str:
  """The protocol's rule on a Holm-adjusted interval of ``arm − adamw``
  (bits/byte, negative = better): supported if the interval excludes 0 on
  the better side and the mean gain is at least ``min_effect``; not
  supported if the interval excludes a gain of ``min_effect``;
  inconclusive otherwise."""
  if lo is None or hi is None:
    return "inconclusive"
  if hi < 0 and mean <= -min_effect:
    return "supported"
  if lo > -min_effect:
    return "not supported (worse)" if lo > 0 else "not supported"
  return "inconclusive"


def power_law_fit(tokens: list[float], losses: list[float]
                  ) -> tuple[float, float]:
  """Least-squares fit of ``log L = a − c log D``; returns (a, c)."""
  slope, a = np.polyfit(np.log(tokens), np.log(losses), 1)
  return float(a), float(-slope)


def token_equivalent(a: float, c: float, loss: float) -> float | None:
  """AdamW tokens whose fitted loss equals ``loss`` (None if the fit does
  not decrease with tokens)."""
  if c <= 0 or loss <= 0:
    return None
  return float(math.exp((a - math.log(loss)) / c))


# ------------------------------------------------------------------ aggregate


class SetupMismatchError(Exception):
  """Runs of one comparison differ in device, software, data or model."""


def _comparison_key(r: dict[str, Any]) -> dict[str, Any]:
  s = r["setup"]
  return {"device_kind": r["device_kind"], "jax": r["jax"],
          "corpus_sha256": r["corpus"]["sha256"],
          "model": {k: s[k] for k in ("d_model", "num_layers", "num_heads",
                                      "seq_len", "batch_size", "dtype",
                                      "attention")}}


def check_same_setup(runs: list[dict[str, Any]]) -> None:
  """Raises :class:`SetupMismatchError` naming the first difference."""
  if not runs:
    return
  ref = _comparison_key(runs[0])
  for r in runs[1:]:
    k = _comparison_key(r)
    for field in ref:
      if k[field] != ref[field]:
        raise SetupMismatchError(
            f"runs {runs[0]['spec']['id']} and {r['spec']['id']} differ in "
            f"{field} ({ref[field]} vs {k[field]}): not comparable")


def aggregate(protocol: Protocol, out: Path) -> dict[str, Any]:
  """Tables and statistics from the run files (see the module docstring)."""
  results = load_results(out)
  runs, chosen = plan_runs(protocol, results)
  by_size: dict[str, list[dict]] = {}
  for r in results.values():
    by_size.setdefault(r["spec"]["size"], []).append(r)
  for rs in by_size.values():
    check_same_setup(rs)
  summary: dict[str, Any] = {"protocol": protocol.name, "sizes": {},
                             "claims": []}
  claims = []
  for size in protocol.sizes + protocol.optional:
    rs = by_size.get(size.name, [])
    if not rs:
      continue
    sel: dict[str, dict[str, Any]] = {}
    for r in rs:
      s = r["spec"]
      if s["role"] == "selection":
        sel.setdefault(s["arm"], {})[s["id"]] = {
            "lr": s["lr"], "adam_lr": s["adam_lr"],
            "sel": r["final"]["sel"], "diverged": r["diverged"]}
    rep = {}
    base = chosen.get((size.name, "adamw"))
    base_vals = (None if base is None else
                 [_loss(results, _report(base, s), "test")
                  for s in protocol.report_seeds])
    fit = _adamw_fit(protocol, base, results)
    for (sname, arm), spec in chosen.items():
      if sname != size.name:
        continue
      vals = [_loss(results, _report(spec, s), "test")
              for s in protocol.report_seeds]
      row: dict[str, Any] = {"lr": spec.lr, "adam_lr": spec.adam_lr,
                             "n": sum(v is not None for v in vals)}
      if all(v is not None for v in vals):
        finite = all(math.isfinite(v) for v in vals)
        row["diverged_seeds"] = sum(not math.isfinite(v) for v in vals)
        row["test"] = [v if math.isfinite(v) else None for v in vals]
        row["test_mean"] = float(np.mean(vals)) if finite else None
        row["wall_s"] = float(np.mean([results[_report(spec, s).id][
            "wall_s"] for s in protocol.report_seeds]))
        if fit is not None and finite:
          d_arm = results[_report(spec, protocol.report_seeds[0]).id][
              "tokens"]
          eq = token_equivalent(*fit["a_c"], row["test_mean"])
          row["token_equivalent"] = eq
          row["speedup_vs_adamw"] = None if eq is None else eq / d_arm
          row["extrapolated"] = (eq is not None and not (
              fit["tokens"][0] <= eq <= fit["tokens"][-1]))
        ready = (arm != "adamw" and base_vals is not None
                 and all(v is not None for v in base_vals))
        if ready and finite and all(math.isfinite(v) for v in base_vals):
          claims.append((size.name, arm, paired(vals, base_vals,
                                                protocol.level)))
        elif ready:
          summary["claims"].append({
              "size": size.name, "arm": arm, "mean": None, "lo": None,
              "hi": None, "p_holm": None, "holm_lo": None, "holm_hi": None,
              "verdict": "not tested (a seed diverged)"})
      rep[arm] = row
    summary["sizes"][size.name] = {"selection": sel, "report": rep,
                                   "adamw_fit": fit}
  ps = [c[2]["p"] if c[2]["p"] is not None else 1.0 for c in claims]
  adj, opened = holm(ps)
  alpha = 1 - protocol.level
  for (sname, arm, st), pa, m in zip(claims, adj, opened, strict=True):
    level = 1 - alpha / m
    wide = paired(st["diffs"], [0.0] * st["n"], level)
    summary["claims"].append({
        "size": sname, "arm": arm, **st, "p_holm": pa,
        "holm_level": level, "holm_lo": wide["lo"], "holm_hi": wide["hi"],
        "verdict": verdict(wide["lo"], wide["hi"], st["mean"],
                           protocol.min_effect)})
  summary["min_effect"] = protocol.min_effect
  write_json(out / "summary.json", summary)
  (out / "summary.md").write_text(markdown(summary))
  plot(results, chosen, protocol, out)
  return summary


def _adamw_fit(protocol: Protocol, base: RunSpec | None,
               results: dict[str, dict]) -> dict[str, Any] | None:
  """AdamW's seed-mean test loss at 1× and the longer budgets, and the
  power-law fit through them (None until all those runs exist)."""
  if base is None:
    return None
  tokens, losses = [], []
  for b in (1.0, *protocol.speedup_budgets):
    role = "report" if b == 1.0 else "speedup"
    specs = [_report(base, s, b, role) for s in protocol.report_seeds]
    if any(results.get(s.id) is None for s in specs):
      return None
    vals = [_loss(results, s, "test") for s in specs]
    tokens.append(float(results[specs[0].id]["tokens"]))
    losses.append(float(np.mean(vals)))
  if not all(math.isfinite(v) for v in losses):
    return None
  return {"tokens": tokens, "loss": losses,
          "a_c": list(power_law_fit(tokens, losses))}


def _fmt(x: Any, nd: int = 4) -> str:
  if x is None:
    return "–"
  if isinstance(x, float):
    return f"{x:.{nd}f}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}"
  return str(x)


def markdown(summary: dict[str, Any]) -> str:
  lines = [f"# Quality study ({summary['protocol']})", "",
           "Final test loss in bits/byte; Δ = arm − AdamW seed by seed; "
           "Holm-adjusted intervals; the smallest effect that counts is "
           f"{summary['min_effect']} bits/byte.", ""]
  for name, s in summary["sizes"].items():
    lines += [f"## {name}", "",
              "| arm | lr | Adam lr | n | test | speed-up vs AdamW | "
              "wall s |", "|---|---|---|---|---|---|---|"]
    for arm, row in sorted(s["report"].items()):
      lines.append(
          f"| {arm} | {row['lr']:.3g} | {_fmt(row['adam_lr'], 3)} | "
          f"{row['n']} | {_fmt(row.get('test_mean'))} | "
          f"{_fmt(row.get('speedup_vs_adamw'), 2)}"
          f"{' (extrapolated)' if row.get('extrapolated') else ''} | "
          f"{_fmt(row.get('wall_s'), 0)} |")
    lines += ["", "Selection runs (selection seed, selection documents; "
              "they choose the learning rate and are not reported):", "",
              "| arm | lr | Adam lr | selection loss |", "|---|---|---|---|"]
    for arm, runs in sorted(s["selection"].items()):
      for r in sorted(runs.values(),
                      key=lambda r: (r["lr"], r["adam_lr"] or 0.0)):
        loss = "diverged" if r["diverged"] else _fmt(r["sel"])
        lines.append(f"| {arm} | {r['lr']:.3g} | {_fmt(r['adam_lr'], 3)} | "
                     f"{loss} |")
    lines.append("")
  if summary["claims"]:
    lines += ["## Claims", "", "| size | arm | Δ mean | 95% t | Holm "
              "interval | p (Holm) | verdict |", "|---|---|---|---|---|---|---|"]
    for c in summary["claims"]:
      lines.append(
          f"| {c['size']} | {c['arm']} | {_fmt(c['mean'])} | "
          f"[{_fmt(c['lo'])}, {_fmt(c['hi'])}] | "
          f"[{_fmt(c['holm_lo'])}, {_fmt(c['holm_hi'])}] | "
          f"{_fmt(c['p_holm'], 3)} | {c['verdict']} |")
  return "\n".join(lines) + "\n"


def plot(results: dict[str, dict], chosen: dict[tuple[str, str], RunSpec],
         protocol: Protocol, out: Path) -> None:
  """Test loss against tokens and against training seconds, seed means of
  each arm's report runs, one figure per size."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  for size in protocol.sizes + protocol.optional:
    arms = {a: s for (n, a), s in chosen.items() if n == size.name}
    if not arms:
      continue
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for arm, spec in sorted(arms.items()):
      rs = [results.get(_report(spec, s).id) for s in protocol.report_seeds]
      rs = [r for r in rs if r is not None]
      if not rs:
        continue
      n = min(len(r["curves"]["test"]) for r in rs)
      loss = np.nanmean([[np.nan if v is None else v
                          for v in r["curves"]["test"][:n]] for r in rs], 0)
      axes[0].plot(rs[0]["curves"]["tokens"][:n], loss, label=arm)
      axes[1].plot(np.mean([r["curves"]["train_s"][:n] for r in rs], 0),
                   loss, label=arm)
    for ax, xl in zip(axes, ("tokens", "training seconds"), strict=True):
      ax.set_xlabel(xl)
      ax.set_ylabel("test loss (bits/byte)")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{size.name}: seed means at the chosen learning rates")
    fig.tight_layout()
    fig.savefig(out / f"loss-{size.name}.png", dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------ cli


def _protocol_of(args: argparse.Namespace) -> Protocol:
  plan = args.out / "plan.json"
  name = args.protocol
  if name is None and plan.exists():
    name = json.loads(plan.read_text())["protocol"]
  return PROTOCOLS[name or "gpu"]


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  sub = p.add_subparsers(dest="cmd", required=True)
  for name in ("plan", "run", "aggregate", "run-one"):
    q = sub.add_parser(name)
    q.add_argument("--out", type=Path, required=True)
    q.add_argument("--protocol", choices=sorted(PROTOCOLS), default=None,
                   help="default: the one of OUT/plan.json, else gpu")
    if name == "run":
      q.add_argument("--time-budget", type=parse_duration, required=True)
      q.add_argument("--parallel", type=int, default=1)
      q.add_argument("--limit", type=int, default=None)
    if name == "run-one":
      q.add_argument("--id", required=True)
  args = p.parse_args(argv)
  protocol = _protocol_of(args)
  if args.cmd == "plan":
    plan = make_plan(protocol, args.out)
    write_json(args.out / "plan.json", plan)
    est = plan["estimate_gpu_minutes"]
    print(f"{len(plan['runs'])} runs planned, {len(plan['missing'])} "
          f"missing (~{est['listed_missing']} GPU-min); projected total "
          f"~{est['projected_total']} GPU-min; dropped ablations: "
          f"{plan['dropped_ablations'] or 'none'}")
  elif args.cmd == "run":
    print("command: study.py " + shlex.join(sys.argv[1:] if argv is None
                                            else argv), flush=True)
    run_chunk(protocol, args.out, args.time_budget, args.parallel,
              args.limit, say=lambda m: print(m, flush=True))
  elif args.cmd == "run-one":
    run_one(protocol, args.out, args.id)
  else:
    try:
      aggregate(protocol, args.out)
    except SetupMismatchError as e:
      print(f"study.py aggregate: {e}", file=sys.stderr)
      return 2
    print(f"wrote {args.out / 'summary.md'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
