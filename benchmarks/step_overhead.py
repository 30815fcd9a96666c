"""Per-step overhead of the cgf_optax aliases against ``optax.adamw``.

Times one optimizer step (a jitted ``tx.update`` followed by
``optax.apply_updates``, params and optimizer state donated) on a
transformer-shaped parameter tree, for ``optax.adamw(1e-3)`` and for
``cgf_optax.cgfm(1e-3, strategy=s)`` and ``cgf_optax.cgfm_adamw(1e-3,
strategy=s)`` with ``s`` in lowrank / temporal / mean, and for
``cgf_optax.cegm`` and ``cgf_optax.cegm_adamw`` given a context of
``--context-tokens`` activations per attention/MLP kernel and the loss as
``value``, all in the same run.

Usage::

  python benchmarks/step_overhead.py                      # ~10M params, CPU
  python benchmarks/step_overhead.py --size 10m --stacked
  python benchmarks/step_overhead.py --size 1b            # one GPU
  python benchmarks/step_overhead.py --size 1b --dtype bfloat16 --stacked

Parameter tree (``--size`` presets; ``--layers/--width/--vocab`` override):

  ====== ====== ===== ====== ===========
  size   layers width vocab  parameters
  ====== ====== ===== ====== ===========
  10m    10     256   8192   ~10.0M
  100m   12     768   16384  ~97.6M
  400m   28     1024  50304  ~404M
  1b     18     2048  50304  ~1.009B
  ====== ====== ===== ====== ===========

Each layer has ``attn/qkv [d, 3d]``, ``attn/o [d, d]``, ``mlp/up [d, 4d]``,
``mlp/down [4d, d]`` and 1-D ``ln1``/``ln2`` ``scale``/``bias`` ``[d]``;
the tree also has ``embed [vocab, d]`` and a final ``ln_f``. By default
``layers`` is a list of per-layer dicts; with ``--stacked`` every layer leaf
is stacked into one ``[L, ...]`` leaf (the scanned-layers layout: matrices
become ``[L, in, out]``, norm vectors ``[L, d]``). The gradient is one fixed
random tree of the params' dtype, reused for every step.

Method:

* Every optimizer gets its own params (generated from the same key) and
  state. ``--warmup`` steps run first (compilation, and step 0, where the
  lowrank bases get their expensive initial refresh with
  ``init_power_iters``).
* Timed steps are synchronised one by one with ``jax.block_until_ready`` on
  the new params and state, so every step has its own time.
* Rounds: the timed steps are split into ``--rounds`` rounds; in each round
  every optimizer runs its share, in an order rotated from round to round,
  so slow phases of a noisy machine hit all optimizers alike. With
  ``--interleave`` (default for sizes up to 100m) all optimizers' params and
  states stay alive through the run; with ``--no-interleave`` (default for
  400m and 1b, where seven params + state copies would not fit in one GPU's
  memory) each optimizer, in each round, is built, warmed up, timed and freed
  before the next one is built. Compiled steps are reused across rounds.
* Periodic work is amortised honestly: the lowrank bases are refreshed when
  ``count % refresh_every == 0``, and each round times a whole number of
  refresh periods (``--steps`` is rounded up to a multiple of
  ``rounds * refresh_every``), so the *mean* step contains exactly the right
  share of refreshes. Reported: the median step, the mean step (over whole
  refresh periods), the worst step, and for lowrank aliases the median of
  refresh steps and of the other steps separately.

Optimizer-state bytes are the sum of ``x.nbytes`` over the state leaves.

Bytes floor (HBM traffic per parameter; what a perfectly fused GPU step must
move). A parameter-sized array costs its itemsize per read and per write;
``P`` is the params' itemsize (4 for float32, 2 for bfloat16; the gradient has
the params' dtype), ``S`` the itemsize of the large state arrays (Adam's
moments and the temporal EMAs follow the params' dtype here). Small arrays
(the ``[s, k]`` bases, the ``[k, t]`` coefficients ``QᵀG``, column means,
scalars) are ignored. Rules: a global reduction (a norm, ``QᵀG``, a column
mean) that must finish before the elementwise update pass costs one extra
read of what it reads; two reductions over the same inputs share that pass.
With ``num_scales=2`` (default; fp32 numbers in brackets):

* ``adamw``: read p, g, m, v; write p, m, v: ``3P + 4S`` [28 B].
* ``cgfm`` (SGD: read p, g; write p = ``3P``) plus:

  - ``lowrank``: ``QᵀG`` needs a pass over G before the split is known:
    ``+P``. The modulation norm is free in that pass: with orthonormal Q,
    ``‖G - (1-λ)QQᵀG‖² = ‖G‖² + (λ² - 1)‖QᵀG‖²``. Total ``4P`` [16 B].
  - ``temporal``: the slow EMA s is read and written (``+2S``), and the
    modulation norm of ``∇adj = λ_l(G - ŝ) + λ_g ŝ`` needs G and the new s
    for every entry before the update pass, so a first pass reads G and s
    (``+P + S``). Total ``4P + 3S`` [28 B].
  - ``mean``: the column means need a pass over G (``+P``); the norm is free
    in it (``‖G - 1ḡᵀ‖² = ‖G‖² - m‖ḡ‖²``, orthogonal parts). ``4P`` [16 B].

* ``cgfm_adamw``: adamw's ``3P + 4S`` plus the same extra terms (the
  modulation factor, decoupled weight decay and learning rate fuse into the
  Adam pass): ``lowrank`` ``4P + 4S`` [32 B]; ``temporal`` ``4P + 7S``
  [44 B]; ``mean`` ``4P + 4S`` [32 B].
* ``num_scales=3``: ``lowrank`` and ``mean`` are unchanged (a wider basis,
  the total mean from the column means); ``temporal`` adds the fast EMA:
  read+write in the update pass and a read in the norm pass, ``+3S``.
* Refresh (lowrank): a refresh step adds ``power_iters`` subspace iterations
  ``qr(G (Gᵀ Q))``, two reads of G each, plus one more read for the
  Rayleigh-Ritz rotation with three scales: ``+2P·power_iters (+P)`` on the
  refresh step, which amortises to that divided by ``refresh_every`` (the
  "mean floor").

With ``--bandwidth`` (default) the device's memory bandwidth is measured
(the faster of two in-place elementwise probes, ``x += 1`` and ``a += b/2``,
over arrays of the params' size clamped to [256 MiB, 1 GiB] so that they do
not fit in a cache, counting bytes read and written), and each floor is also
given in milliseconds, with the ratio of the measured median to it and the
bandwidth the step achieves under its floor model (floor bytes / median).
Independent of any probe, "×floor (adamw cal.)" is the step's time over its
floor with adamw's achieved bandwidth as the unit: (mean / adamw's mean) /
(mean floor / adamw's floor); 1.0 means "as close to its floor as adamw".
XLA's adamw can beat the probes (ratio < 1): the probe is a lower bound on the
bandwidth, so read the ratios relative to adamw's. On CPU these floor figures
are only indicative.

Output: a table on stdout (``rich`` if installed) and a JSON file,
``benchmarks/results/step_overhead-<device>-<size>[-stacked]-<dtype>.json``
unless ``--out`` is given, with the command line, versions, device, date,
arguments, the tree and, per optimizer, all the numbers above and the raw
step times.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import optax

import cgf_optax

ROOT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT_DIR not in sys.path:
  sys.path.insert(0, ROOT_DIR)
from benchmarks._results import sanitize, write_json  # noqa: E402

PRESETS = {
    # name: (layers, width, vocab)
    "10m": (10, 256, 8192),
    "100m": (12, 768, 16384),
    "400m": (28, 1024, 50304),
    "1b": (18, 2048, 50304),
}
STRATEGIES = ("lowrank", "temporal", "mean")
GiB = 1 << 30
MiB = 1 << 20


# ----------------------------------------------------------------------------
# Parameter tree.


def tree_shapes(layers: int, d: int, vocab: int, stacked: bool) -> dict[str, Any]:
  """Nested dict of shape tuples for the transformer-shaped tree."""

  def layer(pre: tuple[int, ...]) -> dict[str, Any]:
    return {
        "ln1": {"scale": (*pre, d), "bias": (*pre, d)},
        "attn": {"qkv": (*pre, d, 3 * d), "o": (*pre, d, d)},
        "ln2": {"scale": (*pre, d), "bias": (*pre, d)},
        "mlp": {"up": (*pre, d, 4 * d), "down": (*pre, 4 * d, d)},
    }

  return {
      "embed": (vocab, d),
      "layers": layer((layers,)) if stacked else [layer(()) for _ in range(layers)],
      "ln_f": {"scale": (d,), "bias": (d,)},
  }


def _is_shape(x: Any) -> bool:
  return isinstance(x, tuple) and all(isinstance(i, int) for i in x)


def random_tree(shapes: Any, key: jax.Array, dtype: Any, scale: float) -> Any:
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=_is_shape)
  keys = jax.random.split(key, len(leaves))
  out = [(scale * jax.random.normal(k, s, jnp.float32)).astype(dtype)
         for k, s in zip(keys, leaves, strict=True)]
  return jax.tree.unflatten(treedef, out)


def tree_bytes(tree: Any) -> int:
  return int(sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(tree)))


def tree_size(tree: Any) -> int:
  return int(sum(x.size for x in jax.tree.leaves(tree)))


def free_tree(tree: Any) -> None:
  for x in jax.tree.leaves(tree):
    if isinstance(x, jax.Array) and not x.is_deleted():
      x.delete()


def make_contexts(grads: Any, tokens: int, dtype: Any, stacked: bool) -> dict:
  """Random kernel inputs ``[tokens, fan_in]`` for every 2-D attention/MLP kernel.

  Keys are parameter paths, as :func:`cgf_optax.context_align` expects them.
  Stacked kernels ``[L, in, out]`` get none (``context_align`` aligns 2-D
  kernels on their axis 0).
  """
  if stacked:
    return {}
  out = {}
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  for i, (path, g) in enumerate(flat):
    name = jax.tree_util.keystr(path, simple=True, separator="/")
    if g.ndim == 2 and ("attn" in name or "mlp" in name):
      out[name] = (jax.random.normal(jax.random.key(1000 + i),
                                     (tokens, g.shape[0])).astype(dtype))
  return jax.block_until_ready(out)


# ----------------------------------------------------------------------------
# Optimizers and their bytes floors.


class Spec:
  """One optimizer to time: its name, factory and bytes-floor model."""

  def __init__(self, name: str, make: Callable[[], optax.GradientTransformation],
               pg: int, st: int, refresh_pg: int, periodic: bool,
               uses_context: bool = False):
    self.name = name
    self.uses_context = uses_context  # update gets context= and value=
    self.make = make
    self.pg = pg                  # param-dtype accesses per parameter per step
    self.st = st                  # state-dtype accesses per parameter per step
    self.refresh_pg = refresh_pg  # extra param-dtype accesses on a refresh step
    self.periodic = periodic


def optimizer_specs(args: argparse.Namespace) -> list[Spec]:
  kw = dict(rank=args.rank, refresh_every=args.refresh_every,
            num_scales=args.num_scales, power_iters=args.power_iters,
            stagger=args.stagger)
  three = args.num_scales == 3
  refresh_pg = 2 * args.power_iters + (1 if three else 0)
  specs = [Spec("adamw", lambda: optax.adamw(1e-3), 3, 4, 0, False),
           # A peer with one global-norm reduction (read g once more: +P),
           # for the cost of any global norm on this device.
           Spec("clip+adamw", lambda: optax.chain(
               optax.clip_by_global_norm(1.0), optax.adamw(1e-3)),
               4, 4, 0, False)]
  for alias, fn, base_st in (("cgfm", cgf_optax.cgfm, 0),
                             ("cgfm_adamw", cgf_optax.cgfm_adamw, 4)):
    for s in STRATEGIES:
      if s == "temporal":
        st = base_st + (6 if three else 3)
      else:
        st = base_st
      specs.append(Spec(
          f"{alias}/{s}",
          lambda fn=fn, s=s: fn(1e-3, strategy=s, **kw),
          4, st, refresh_pg if s == "lowrank" else 0, s == "lowrank"))
  # CEGM: entangle keeps G_{t-1} (read + write: +2S); context_align's
  # coefficients uᵀG and normalize's per-leaf norm are two reductions that must
  # finish before the final pass, each re-reading g and G_{t-1} (+2P +2S).
  # cegm (SGD): 3P + 2S + 2P + 2S = 5P + 4S [36 B]; cegm_adamw adds Adam's
  # moments (+4S) [52 B]. The contexts (tokens × fan-in per kernel) are read
  # once more; they are not per-parameter and not in the floor.
  specs.append(Spec("cegm", lambda: cgf_optax.cegm(
      1e-3, num_heads=args.num_heads, require_context=False), 5, 4, 0, False,
      True))
  specs.append(Spec("cegm_adamw", lambda: cgf_optax.cegm_adamw(
      1e-3, num_heads=args.num_heads, require_context=False), 5, 8, 0, False,
      True))
  if args.optimizers:
    wanted = [w.strip() for w in args.optimizers.split(",") if w.strip()]
    unknown = [w for w in wanted if w not in {sp.name for sp in specs}]
    if unknown:
      raise SystemExit(f"unknown optimizer(s) {unknown}; choose from "
                       f"{[sp.name for sp in specs]}")
    if "adamw" not in wanted:
      wanted.insert(0, "adamw")
    specs = [sp for sp in specs if sp.name in wanted]
  return specs


def state_itemsize(state: Any, default: int) -> int:
  """Itemsize of the state's largest array (its parameter-sized arrays)."""
  leaves = [x for x in jax.tree.leaves(state) if hasattr(x, "dtype")]
  if not leaves:
    return default
  return int(max(leaves, key=lambda x: x.size).dtype.itemsize)


# ----------------------------------------------------------------------------
# Timing.


class Runner:
  """One optimizer's jitted step, and (while alive) its params and state."""

  def __init__(self, spec: Spec):
    self.spec = spec
    self.tx = spec.make()
    tx = self.tx

    def step(params, state, grads, extra):
      updates, state = tx.update(grads, state, params, **extra)
      return optax.apply_updates(params, updates), state

    self.step = jax.jit(step, donate_argnums=(0, 1))
    self.extra: dict[str, Any] = {}
    self.params = None
    self.state = None
    self.count = 0        # steps taken since init (the decompose count)
    self.times: list[float] = []
    self.refresh_flags: list[bool] = []
    self.round_medians: list[float] = []
    self.first_step_s: list[float] = []
    self.warmup_s: list[float] = []
    self.init_s: list[float] = []
    self.state_bytes = 0
    self.state_item = 0

  def build(self, make_params: Callable[[], Any]) -> None:
    t0 = time.perf_counter()
    self.params = make_params()
    self.state = jax.block_until_ready(self.tx.init(self.params))
    self.init_s.append(time.perf_counter() - t0)
    self.count = 0
    self.state_bytes = tree_bytes(self.state)
    p_item = jax.tree.leaves(self.params)[0].dtype.itemsize
    self.state_item = state_itemsize(self.state, p_item)

  def one_step(self, grads: Any) -> float:
    t0 = time.perf_counter()
    self.params, self.state = self.step(self.params, self.state, grads,
                                        self.extra)
    jax.block_until_ready((self.params, self.state))
    dt = time.perf_counter() - t0
    self.count += 1
    return dt

  def warmup(self, grads: Any, n: int) -> None:
    t0 = time.perf_counter()
    self.first_step_s.append(self.one_step(grads))
    for _ in range(n - 1):
      self.one_step(grads)
    self.warmup_s.append(time.perf_counter() - t0)

  def timed(self, grads: Any, n: int, refresh_every: int) -> None:
    ts = []
    for _ in range(n):
      refresh = self.count % refresh_every == 0
      ts.append(self.one_step(grads))
      self.refresh_flags.append(refresh)
    self.times.extend(ts)
    self.round_medians.append(statistics.median(ts))

  def free(self) -> None:
    free_tree(self.params)
    free_tree(self.state)
    self.params = self.state = None
    gc.collect()


def measure_bandwidth(nbytes: int, reps: int = 10) -> dict[str, Any]:
  """Device memory bandwidth from two in-place (donated) elementwise probes.

  ``x <- x + 1`` (read + write) and ``a <- a + b / 2`` (two reads, one write),
  each over arrays of ``nbytes``; the faster one's bytes/s is the bandwidth.
  """
  n = max(nbytes // 4, 1 << 20)

  def probe(f, arrays, accesses):
    arrays = list(jax.block_until_ready(f(*arrays)))
    ts = []
    for _ in range(reps):
      t0 = time.perf_counter()
      arrays = list(jax.block_until_ready(f(*arrays)))
      ts.append(time.perf_counter() - t0)
    free_tree(arrays)
    t = statistics.median(ts)
    return {"median_s": t, "bytes_per_s": accesses * 4 * n / t}

  inc = jax.jit(lambda x: (x + 1,), donate_argnums=0)
  triad = jax.jit(lambda a, b: (a + 0.5 * b, b), donate_argnums=(0, 1))
  probes = {
      "x+=1": probe(inc, [jnp.ones((n,), jnp.float32)], 2),
      "a+=b/2": probe(triad, [jnp.ones((n,), jnp.float32),
                              jnp.ones((n,), jnp.float32)], 3),
  }
  best = max(probes, key=lambda k: probes[k]["bytes_per_s"])
  return {"array_bytes": 4 * n, "probes": probes, "best": best,
          "bytes_per_s": probes[best]["bytes_per_s"]}


# ----------------------------------------------------------------------------
# Report.


def summarize(r: Runner, args, n_params: int, p_item: int,
              bw: float | None) -> dict[str, Any]:
  ts = np.asarray(r.times) * 1e3
  flags = np.asarray(r.refresh_flags, bool)
  sp = r.spec
  s_item = r.state_item
  floor = sp.pg * p_item + sp.st * s_item
  refresh_extra = sp.refresh_pg * p_item
  floor_mean = floor + refresh_extra / args.refresh_every
  out: dict[str, Any] = {
      "name": sp.name,
      "timed_steps": len(ts),
      "refresh_steps_timed": int(flags.sum()) if sp.periodic else 0,
      "median_ms": float(np.median(ts)),
      "mean_ms": float(np.mean(ts)),
      "worst_ms": float(np.max(ts)),
      "best_ms": float(np.min(ts)),
      "p90_ms": float(np.percentile(ts, 90)),
      "round_medians_ms": [1e3 * x for x in r.round_medians],
      "refresh_median_ms": (float(np.median(ts[flags]))
                            if sp.periodic and flags.any() else None),
      "plain_median_ms": (float(np.median(ts[~flags]))
                          if sp.periodic and (~flags).any() else None),
      "first_step_s": r.first_step_s,
      "warmup_s": r.warmup_s,
      "init_s": r.init_s,
      "state_bytes": r.state_bytes,
      "state_bytes_per_param": r.state_bytes / n_params,
      "state_itemsize": s_item,
      "floor_model": {"param_accesses": sp.pg, "state_accesses": sp.st,
                      "refresh_param_accesses": sp.refresh_pg},
      "floor_bytes_per_param": floor,
      "floor_mean_bytes_per_param": floor_mean,
      "floor_refresh_step_bytes_per_param": floor + refresh_extra,
      "times_ms": [float(x) for x in ts],
      "refresh_flags": [bool(x) for x in flags] if sp.periodic else None,
  }
  if bw:
    fl_ms = 1e3 * floor * n_params / bw
    out["floor_ms"] = fl_ms
    out["floor_mean_ms"] = 1e3 * floor_mean * n_params / bw
    out["median_over_floor"] = out["median_ms"] / fl_ms
    out["mean_over_floor_mean"] = out["mean_ms"] / out["floor_mean_ms"]
  out["floor_bytes_per_s_at_median"] = floor * n_params / (out["median_ms"] / 1e3)
  return out


def add_ratios(rows: list[dict[str, Any]]) -> None:
  base = next(r for r in rows if r["name"] == "adamw")
  for r in rows:
    r["median_vs_adamw"] = r["median_ms"] / base["median_ms"]
    r["mean_vs_adamw"] = r["mean_ms"] / base["mean_ms"]
    r["worst_vs_adamw"] = r["worst_ms"] / base["worst_ms"]
    r["state_vs_adamw"] = r["state_bytes"] / base["state_bytes"]
    r["floor_vs_adamw"] = (r["floor_bytes_per_param"]
                           / base["floor_bytes_per_param"])
    r["floor_mean_vs_adamw"] = (r["floor_mean_bytes_per_param"]
                                / base["floor_bytes_per_param"])
    # Time over floor, with the bandwidth that adamw achieves as the unit.
    r["median_over_floor_adamw_cal"] = r["median_vs_adamw"] / r["floor_vs_adamw"]
    r["mean_over_floor_mean_adamw_cal"] = (r["mean_vs_adamw"]
                                           / r["floor_mean_vs_adamw"])


def print_table(rows: list[dict[str, Any]], title: str, bw: bool) -> None:
  head = ["optimizer", "median ms", "mean ms", "worst ms", "×adamw med",
          "×adamw mean", "refresh / plain ms", "state MiB", "×adamw state",
          "floor B/p (mean)", "floor ×adamw", "mean ×floor (adamw cal.)"]
  if bw:
    head.append("median ×floor (probe)")
  body = []
  for r in rows:
    rp = (f"{r['refresh_median_ms']:.2f} / {r['plain_median_ms']:.2f}"
          if r["refresh_median_ms"] is not None else "-")
    fl = (f"{r['floor_bytes_per_param']:g} ({r['floor_mean_bytes_per_param']:g})"
          if r["floor_mean_bytes_per_param"] != r["floor_bytes_per_param"]
          else f"{r['floor_bytes_per_param']:g}")
    line = [r["name"], f"{r['median_ms']:.2f}", f"{r['mean_ms']:.2f}",
            f"{r['worst_ms']:.2f}", f"{r['median_vs_adamw']:.2f}",
            f"{r['mean_vs_adamw']:.2f}", rp, f"{r['state_bytes'] / MiB:.1f}",
            f"{r['state_vs_adamw']:.2f}", fl, f"{r['floor_mean_vs_adamw']:.2f}",
            f"{r['mean_over_floor_mean_adamw_cal']:.2f}"]
    if bw:
      line.append(f"{r['median_over_floor']:.2f}")
    body.append(line)
  try:
    from rich.console import Console
    from rich.table import Table
  except ImportError:
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    print(title)
    print("  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True)))
    for b in body:
      print("  ".join(c.rjust(w) for c, w in zip(b, widths, strict=True)))
    return
  table = Table(title=title, title_justify="left")
  for i, h in enumerate(head):
    table.add_column(h, justify="left" if i == 0 else "right")
  for b in body:
    table.add_row(*b)
  Console(width=max(160, 20 * len(head))).print(table)


# ----------------------------------------------------------------------------
# Main.


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--size", choices=tuple(PRESETS), default="10m")
  p.add_argument("--stacked", action="store_true",
                 help="stack layers as [L, ...] leaves (scanned layout)")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                 help="params (and gradient) dtype")
  p.add_argument("--layers", type=int, help="override the preset's layers")
  p.add_argument("--width", type=int, help="override the preset's width d")
  p.add_argument("--vocab", type=int, help="override the preset's vocabulary")
  p.add_argument("--rank", type=int, default=8)
  p.add_argument("--refresh-every", type=int, default=10)
  p.add_argument("--num-scales", type=int, choices=(2, 3), default=2)
  p.add_argument("--power-iters", type=int, default=1)
  p.add_argument("--stagger", action="store_true",
                 help="lowrank: spread the basis refreshes over the period")
  p.add_argument("--num-heads", type=int, default=4,
                 help="CEGM context heads")
  p.add_argument("--context-tokens", type=int, default=2048,
                 help="CEGM: tokens of context per kernel (batch × sequence)")
  p.add_argument("--steps", type=int, default=60,
                 help="timed steps per optimizer (rounded up to a multiple of "
                      "rounds × refresh_every)")
  p.add_argument("--warmup", type=int, default=5,
                 help="untimed steps first (compile + step 0's refresh)")
  p.add_argument("--rounds", type=int, default=6)
  p.add_argument("--interleave", action=argparse.BooleanOptionalAction,
                 default=None,
                 help="keep all optimizers alive and interleave them (default: "
                      "on for sizes up to 100m)")
  p.add_argument("--bandwidth", action=argparse.BooleanOptionalAction,
                 default=True, help="measure copy bandwidth for floor ms")
  p.add_argument("--optimizers", default="",
                 help="comma-separated subset, e.g. 'cgfm_adamw/lowrank' "
                      "(adamw is always included)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", help="JSON path (default under benchmarks/results/)")
  args = p.parse_args(argv)
  if args.warmup < 1:
    p.error("--warmup must be >= 1 (the first step compiles)")
  if args.rounds < 1 or args.steps < 1 or args.refresh_every < 1:
    p.error("--rounds, --steps and --refresh-every must be >= 1")
  if args.interleave is None:
    args.interleave = args.size in ("10m", "100m")
  return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  layers, width, vocab = PRESETS[args.size]
  layers = args.layers or layers
  width = args.width or width
  vocab = args.vocab or vocab
  dtype = jnp.dtype(args.dtype)
  period = args.refresh_every
  per_round = period * math.ceil(args.steps / (args.rounds * period))
  total = per_round * args.rounds
  if total < 20:
    print(f"warning: only {total} timed steps per optimizer (< 20)",
          file=sys.stderr)

  dev = jax.devices()[0]
  device_kind = dev.device_kind
  shapes = tree_shapes(layers, width, vocab, args.stacked)
  key_p, key_g = jax.random.split(jax.random.key(args.seed))
  make_params = lambda: random_tree(shapes, key_p, dtype, 0.02)
  grads = jax.block_until_ready(random_tree(shapes, key_g, dtype, 0.01))
  n_params = tree_size(grads)
  n_leaves = len(jax.tree.leaves(grads))
  p_item = dtype.itemsize
  param_bytes = tree_bytes(grads)

  print(f"device: {device_kind} ×{jax.device_count()} ({dev.platform}); "
        f"jax {jax.__version__}, optax {optax.__version__}")
  print(f"tree: {args.size} {'stacked' if args.stacked else 'list'} "
        f"L={layers} d={width} vocab={vocab}: {n_params / 1e6:.2f}M params in "
        f"{n_leaves} leaves, {args.dtype} ({param_bytes / MiB:.0f} MiB)")
  print(f"timing: {args.rounds} rounds × {per_round} steps "
        f"(refresh_every={period}, rank={args.rank}, "
        f"num_scales={args.num_scales}), warm-up {args.warmup}, "
        f"{'interleaved' if args.interleave else 'one optimizer at a time'}")

  bw = None
  bw_info = None
  if args.bandwidth:
    bw_info = measure_bandwidth(min(max(param_bytes, 256 * MiB), GiB))
    bw = bw_info["bytes_per_s"]
    print("bandwidth: " + ", ".join(
        f"{k} {v['bytes_per_s'] / 1e9:.1f} GB/s"
        for k, v in bw_info["probes"].items())
        + f" (read + write, {bw_info['array_bytes'] / MiB:.0f} MiB arrays)")

  contexts = make_contexts(grads, args.context_tokens, dtype, args.stacked)
  context_bytes = tree_bytes(contexts)
  print(f"CEGM context: {len(contexts)} kernels × {args.context_tokens} tokens "
        f"({context_bytes / MiB:.0f} MiB)"
        + (" — none: stacked kernels [L, in, out] take no context yet"
           if args.stacked else ""))
  runners = [Runner(sp) for sp in optimizer_specs(args)]
  for r in runners:
    if r.spec.uses_context:
      r.extra = {"context": contexts, "value": jnp.float32(1.0)}
  t_start = time.perf_counter()
  if args.interleave:
    for r in runners:
      r.build(make_params)
      r.warmup(grads, args.warmup)
      print(f"  built {r.spec.name}: first step {r.first_step_s[-1]:.2f} s",
            flush=True)
  for rnd in range(args.rounds):
    k = rnd % len(runners)
    order = runners[k:] + runners[:k]
    for r in order:
      if not args.interleave:
        r.build(make_params)
        r.warmup(grads, args.warmup)
      r.timed(grads, per_round, period)
      if not args.interleave:
        r.free()
    print(f"  round {rnd + 1}/{args.rounds}: "
          + ", ".join(f"{r.spec.name} {1e3 * r.round_medians[-1]:.2f}"
                      for r in runners) + " ms (median)", flush=True)
  for r in runners:
    if r.params is not None:
      r.free()
  wall = time.perf_counter() - t_start

  rows = [summarize(r, args, n_params, p_item, bw) for r in runners]
  add_ratios(rows)
  title = (f"step = jit(update + apply_updates), {n_params / 1e6:.1f}M params "
           f"{args.dtype}{' stacked' if args.stacked else ''}, {device_kind}, "
           f"{total} steps/optimizer")
  print()
  print_table(rows, title, bw is not None)

  result = {
      "benchmark": "step_overhead",
      "command": sys.argv if argv is None else [sys.argv[0], *argv],
      "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
      "versions": {
          "python": platform.python_version(),
          "jax": jax.__version__,
          "jaxlib": jaxlib.__version__,
          "optax": optax.__version__,
          "numpy": np.__version__,
          "cgf_optax": cgf_optax.__version__,
      },
      "device": {
          "kind": device_kind,
          "platform": dev.platform,
          "count": jax.device_count(),
          "local_count": jax.local_device_count(),
          "host_cpus": os.cpu_count(),
      },
      "args": vars(args),
      "tree": {
          "size": args.size, "layers": layers, "width": width, "vocab": vocab,
          "stacked": args.stacked, "dtype": args.dtype, "params": n_params,
          "leaves": n_leaves, "param_bytes": param_bytes,
      },
      "cegm_context": {"kernels": len(contexts), "tokens": args.context_tokens,
                       "bytes": context_bytes, "num_heads": args.num_heads},
      "timing": {
          "rounds": args.rounds, "steps_per_round": per_round,
          "timed_steps": total, "warmup": args.warmup,
          "interleave": args.interleave, "wall_s": wall,
          "sync": "block_until_ready after every step",
          "donated": "params, state",
      },
      "bandwidth": bw_info,
      "results": rows,
  }
  out = args.out or os.path.join(
      os.path.dirname(os.path.abspath(__file__)), "results",
      f"step_overhead-{sanitize(device_kind)}-{args.size}"
      f"{'-stacked' if args.stacked else ''}-{args.dtype}"
      f"{'-stagger' if args.stagger else ''}.json")
  print(f"\nwrote {write_json(result, out)}")
  return result


if __name__ == "__main__":
  main()
