"""Where the time of a GPT train step goes, per optimizer: a device profile.

Profiles the same jitted train step as ``benchmarks/lm_throughput.py``
(forward, backward, update, apply; params and state donated; optimizers as a
training run builds them) with :func:`jax.profiler.trace`, for ``optax.adamw``
and the given arms in one process, and reads the trace back with
:class:`jax.profiler.ProfileData`. Per arm it reports, over ``--steps``
steps dispatched back to back (one whole low-rank refresh period by
default, so the refresh is in its true share):

* ``wall``: host time from the first dispatch to the end of the last step;
* ``busy``: the union of the device's kernel intervals (all streams), and
  ``idle`` = wall − busy: time the device waited (for the host, for a
  device→host copy such as a conditional's predicate);
* ``kernels``: number of device kernels per step, and their summed time by
  kind (GEMM, attention, reduction, copy/memset, other fusions), matched on
  kernel names;
* XLA's own ``cost_analysis`` of the compiled step: FLOPs and bytes
  accessed (its model of HBM traffic, summed over the fused kernels of the
  optimised program), and the number of ``conditional``, ``while``,
  ``fusion`` and ``custom-call`` instructions of the optimised HLO;
* the top kernels by time.

Everything is also given as the difference to adamw's step in the same run,
which splits an arm's extra step time into extra device work (busy) and
extra waiting (idle).

Usage::

  python benchmarks/profile_step.py --preset tiny --seq 64 --batch 4  # CPU
  python benchmarks/profile_step.py --preset 125m --batch 32          # GPU

On CPU there is no device plane: the XLA CPU runtime's thunk events are used
instead and the kinds are only indicative.

Output: a table on stdout and a JSON file (``--out``; default
``benchmarks/results/profile_step-<device>-<preset>.json``).
"""

from __future__ import annotations

import argparse
import datetime
import glob
import platform
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jaxlib
import numpy as np
import optax
from jax.profiler import ProfileData

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from benchmarks._results import sanitize, write_json  # noqa: E402
from benchmarks.lm_throughput import REFRESH_EVERY, Bench, parse_arm  # noqa: E402

DEFAULT_ARMS = ("adamw", "cgfm_adamw/lowrank", "cgfm_adamw/mean", "cgfm",
                "cegm_adamw", "cegm")
# Kernel kinds, first match wins (names of cuBLAS/cuDNN/XLA GPU kernels).
KINDS = (
    ("attention", re.compile(r"flash|fmha|cudnn|attn|sdpa", re.I)),
    ("gemm", re.compile(r"gemm|gemv|xmma|cutlass|cublas|matmul|dot|"
                        r"sm\d\d_|triton", re.I)),
    ("copy/memset", re.compile(r"memcpy|memset|copy", re.I)),
    ("reduction", re.compile(r"reduce|reduction|norm", re.I)),
)


def kind_of(name: str) -> str:
  for kind, pattern in KINDS:
    if pattern.search(name):
      return kind
  return "other fusion"


def device_events(path: str) -> tuple[str, list[tuple[str, int, int]]]:
  """``(source, [(name, start_ns, duration_ns)])`` of the device kernels in
  an ``.xplane.pb`` file: the GPU planes' stream lines, or on CPU the XLA
  runtime's thread lines."""
  pd = ProfileData.from_file(path)
  gpu, cpu = [], []
  for plane in pd.planes:
    if plane.name.startswith("/device:GPU"):
      for line in plane.lines:
        if line.name.startswith("Stream"):
          gpu += [(ev.name, int(ev.start_ns), int(ev.duration_ns))
                  for ev in line.events]
    elif plane.name.startswith("/host:CPU"):
      for line in plane.lines:
        if line.name.startswith("tf_XLA"):
          cpu += [(ev.name, int(ev.start_ns), int(ev.duration_ns))
                  for ev in line.events]
  return ("gpu streams", gpu) if gpu else ("cpu runtime threads", cpu)


def union_ns(events: list[tuple[str, int, int]]) -> int:
  """Total length of the union of the events' intervals."""
  total, end = 0, None
  start = None
  for _, s, d in sorted(events, key=lambda e: e[1]):
    e = s + d
    if end is None or s > end:
      if end is not None:
        total += end - start
      start, end = s, e
    else:
      end = max(end, e)
  if end is not None:
    total += end - start
  return total


def hlo_counts(text: str) -> dict[str, int]:
  """Instructions of the optimised HLO that matter for launch overhead."""
  return {op: len(re.findall(rf"\b{op}\(", text))
          for op in ("conditional", "while", "fusion", "custom-call")}


def cost(compiled: Any) -> dict[str, float | None]:
  try:
    ca = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 - not every backend implements it
    return {"flops": None, "bytes_accessed": None}
  if isinstance(ca, list):
    ca = ca[0] if ca else {}
  return {"flops": ca.get("flops"), "bytes_accessed": ca.get("bytes accessed")}


def kernel_summary(source: str, events: list[tuple[str, int, int]],
                   steps: int, wall: float, top: int) -> dict[str, Any]:
  """Per-step wall, busy and idle time, kernel count, time by kernel kind
  and the ``top`` kernels of ``steps`` profiled steps."""
  by_name: dict[str, list[int]] = {}
  for name, _, dur in events:
    by_name.setdefault(name, []).append(dur)
  by_kind: dict[str, float] = {}
  for name, durs in by_name.items():
    k = kind_of(name)
    by_kind[k] = by_kind.get(k, 0.0) + sum(durs) / steps / 1e6
  busy = union_ns(events) / steps / 1e6
  tops = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:top]
  return {
      "steps": steps,
      "events_from": source,
      "wall_ms": wall / steps * 1e3,
      "busy_ms": busy,
      "idle_ms": wall / steps * 1e3 - busy,
      "kernel_ms": sum(by_kind.values()),
      "kernels_per_step": len(events) / steps,
      "by_kind_ms": dict(sorted(by_kind.items())),
      "top_kernels": [{"name": n[:160], "ms_per_step": sum(d) / steps / 1e6,
                       "calls_per_step": len(d) / steps} for n, d in tops],
  }


def traced(run: Any, steps: int) -> tuple[str, list[tuple[str, int, int]],
                                         float]:
  """Runs ``run(steps)`` (dispatching ``steps`` steps and waiting for the
  last) under :func:`jax.profiler.trace`: the device events and the wall
  time."""
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d):
      t0 = time.perf_counter()
      run(steps)
      wall = time.perf_counter() - t0
    files = glob.glob(f"{d}/**/*.xplane.pb", recursive=True)
    if not files:
      raise RuntimeError("jax.profiler.trace wrote no .xplane.pb file")
    source, events = device_events(files[0])
  return source, events, wall


def profile_arm(bench: Bench, label: str, steps: int, warmup: int,
                top: int) -> dict[str, Any]:
  arm = parse_arm(label)
  lowered, tx, _ = bench.lower(arm)
  compiled = lowered.compile()
  params = bench.init_params()
  state = jax.jit(tx.init)(params)
  batches = bench.batches()
  for i in range(warmup):
    params, state, loss = compiled(params, state, batches[i % len(batches)])
  jax.block_until_ready((params, state, loss))
  last = {}

  def run(n: int) -> None:
    nonlocal params, state
    for i in range(n):
      params, state, last["loss"] = compiled(
          params, state, batches[(warmup + i) % len(batches)])
    jax.block_until_ready((params, state, last["loss"]))

  source, events, wall = traced(run, steps)
  final_loss = float(last["loss"]["loss"])
  del params, state
  return {"arm": label, **kernel_summary(source, events, steps, wall, top),
          "xla_cost": cost(compiled),
          "hlo": hlo_counts(compiled.as_text()),
          "final_loss": final_loss}


def optimizer_bytes(size: str, dtype: str, context_tokens: int,
                    names: list[str] | None, profile: int = 0,
                    top: int = 15) -> dict[str, Any]:
  """XLA's bytes accessed by the optimizer step alone (update + apply, as
  ``benchmarks/step_overhead.py`` times it), per parameter, against each
  alias's fused bytes floor. Compiled from abstract shapes: nothing is
  allocated, so a 1B-parameter tree costs only compilation.

  With ``profile`` > 0, each step is also run on random params, gradient
  (and CEGM context) and ``profile`` steps dispatched back to back are
  profiled as :func:`profile_arm` does (after one refresh period of
  warm-up): busy and idle time, kernels per step, the top kernels."""
  import jax.numpy as jnp

  from benchmarks import step_overhead as so

  layers, width, vocab = so.PRESETS[size]
  shapes = so.tree_shapes(layers, width, vocab, stacked=False)
  dt = jnp.dtype(dtype)
  abstract = jax.tree.map(lambda sh: jax.ShapeDtypeStruct(sh, dt), shapes,
                          is_leaf=so._is_shape)
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract))
  ns = argparse.Namespace(rank=8, refresh_every=REFRESH_EVERY, num_scales=2,
                          power_iters=1, stagger=False, num_heads=4,
                          optimizers=",".join(names) if names else "")
  ctx = {}
  flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
  for path, g in flat:
    key = jax.tree_util.keystr(path, simple=True, separator="/")
    if g.ndim == 2 and ("attn" in key or "mlp" in key):
      ctx[key] = jax.ShapeDtypeStruct((context_tokens, g.shape[0]), dt)
  rows = []
  for spec in so.optimizer_specs(ns):
    tx = spec.make()
    extra = ({"context": ctx, "value": jax.ShapeDtypeStruct((), jnp.float32)}
             if spec.uses_context else {})

    def step(params, state, grads, extra, tx=tx):
      updates, state = tx.update(grads, state, params, **extra)
      return optax.apply_updates(params, updates), state

    state = jax.eval_shape(tx.init, abstract)
    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
        abstract, state, abstract, extra).compile()
    c = cost(compiled)
    st_item = max((x.dtype.itemsize for x in jax.tree.leaves(state)
                   if hasattr(x, "dtype") and x.size >= n // 1000),
                  default=dt.itemsize)
    floor = spec.pg * dt.itemsize + spec.st * st_item
    b = c["bytes_accessed"]
    rows.append({
        "optimizer": spec.name, "floor_bytes_per_param": floor,
        "xla_bytes_per_param": None if b is None else b / n,
        "xla_over_floor": None if b is None else b / n / floor,
        "hlo": hlo_counts(compiled.as_text()),
        "compile_s": time.perf_counter() - t0})
    if profile:
      rows[-1]["profile"] = _profile_optimizer(
          compiled, tx, shapes, dt, spec.uses_context, context_tokens,
          profile, top)
    print(f"  {spec.name:22s} floor {floor:3d} B/param, XLA "
          + ("-" if b is None else f"{b / n:6.1f} B/param "
             f"({b / n / floor:.2f}× floor)")
          + f", {rows[-1]['hlo']['fusion']} fusions, "
          f"{rows[-1]['hlo']['conditional']} conditionals"
          + (f"; {rows[-1]['profile']['busy_ms']:.2f} ms busy, "
             f"{rows[-1]['profile']['wall_ms']:.2f} ms wall, "
             f"{rows[-1]['profile']['kernels_per_step']:.0f} kernels per step"
             if profile else ""), flush=True)
  return {"size": size, "dtype": dtype, "n_params": n, "leaves": len(flat),
          "context_tokens": context_tokens, "rows": rows}


def _profile_optimizer(compiled: Any, tx: optax.GradientTransformation,
                       shapes: Any, dt: Any, uses_context: bool,
                       context_tokens: int, steps: int, top: int
                       ) -> dict[str, Any]:
  """Device profile of ``steps`` optimizer steps back to back (see
  :func:`optimizer_bytes`)."""
  import jax.numpy as jnp

  from benchmarks import step_overhead as so

  params = so.random_tree(shapes, jax.random.key(0), dt, 0.02)
  grads = so.random_tree(shapes, jax.random.key(1), dt, 1e-3)
  extra = ({"context": so.make_contexts(grads, context_tokens, dt, False),
            "value": jnp.float32(1.0)} if uses_context else {})
  state = tx.init(params)

  def run(n: int) -> None:
    nonlocal params, state
    for _ in range(n):
      params, state = compiled(params, state, grads, extra)
    jax.block_until_ready((params, state))

  run(REFRESH_EVERY + 2)
  source, events, wall = traced(run, steps)
  summary = kernel_summary(source, events, steps, wall, top)
  so.free_tree((params, state, grads, extra))
  return summary


def add_deltas(rows: list[dict[str, Any]]) -> None:
  base = next((r for r in rows if r["arm"] == "adamw"), None)
  if base is None:
    return
  for r in rows:
    r["vs_adamw"] = {
        k: r[k] - base[k] for k in ("wall_ms", "busy_ms", "idle_ms",
                                    "kernel_ms", "kernels_per_step")}
    r["vs_adamw"]["wall_ratio"] = base["wall_ms"] / r["wall_ms"]
    b0, b1 = base["xla_cost"]["bytes_accessed"], r["xla_cost"][
        "bytes_accessed"]
    r["vs_adamw"]["xla_bytes_gb"] = (None if b0 is None or b1 is None
                                     else (b1 - b0) / 1e9)


def print_table(rows: list[dict[str, Any]], n_params: int) -> None:
  kinds = sorted({k for r in rows for k in r["by_kind_ms"]})
  head = (["arm", "wall ms", "× adamw tok/s", "busy ms", "idle ms",
           "kernels"] + [f"{k} ms" for k in kinds]
          + ["XLA GB/step", "XLA B/param", "cond", "fusions"])
  print(" | ".join(head))
  for r in rows:
    b = r["xla_cost"]["bytes_accessed"]
    cells = [r["arm"], f"{r['wall_ms']:.2f}",
             f"{r.get('vs_adamw', {}).get('wall_ratio', float('nan')):.3f}",
             f"{r['busy_ms']:.2f}", f"{r['idle_ms']:.2f}",
             f"{r['kernels_per_step']:.0f}"]
    cells += [f"{r['by_kind_ms'].get(k, 0.0):.2f}" for k in kinds]
    cells += ["-" if b is None else f"{b / 1e9:.2f}",
              "-" if b is None else f"{b / n_params:.1f}",
              str(r["hlo"]["conditional"]), str(r["hlo"]["fusion"])]
    print(" | ".join(cells))
  for r in rows:
    print(f"\n{r['arm']}: top kernels (ms/step, calls/step)")
    for t in r["top_kernels"][:8]:
      print(f"  {t['ms_per_step']:8.3f} {t['calls_per_step']:6.1f}  "
            f"{t['name'][:100]}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--preset", default="125m")
  p.add_argument("--vocab", type=int, default=50304)
  p.add_argument("--seq", type=int, default=1024)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
  p.add_argument("--param-dtype", choices=("float32", "bfloat16"),
                 default="float32")
  p.add_argument("--attention", choices=("auto", "cudnn", "xla", "default"),
                 default="auto")
  p.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS))
  p.add_argument("--steps", type=int, default=REFRESH_EVERY,
                 help="profiled steps per arm (one refresh period by default)")
  p.add_argument("--warmup", type=int, default=REFRESH_EVERY + 2)
  p.add_argument("--top", type=int, default=15)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--optimizer-size", default=None,
                 help="also: XLA's bytes per parameter of the optimizer step "
                      "alone on benchmarks/step_overhead.py's tree of this "
                      "size (e.g. 1b), compiled from abstract shapes")
  p.add_argument("--optimizer-dtype", default="float32")
  p.add_argument("--context-tokens", type=int, default=8192,
                 help="CEGM context per kernel for --optimizer-size")
  p.add_argument("--optimizer-profile", type=int, default=0, metavar="STEPS",
                 help="with --optimizer-size: also run the optimizer step "
                      "alone and profile this many steps back to back "
                      "(allocates the tree: 1b needs ~20 GB of device "
                      "memory per optimizer)")
  p.add_argument("--optimizers", nargs="*", default=None,
                 help="step_overhead optimizer names for --optimizer-size "
                      "(default: all)")
  p.add_argument("--out", help="JSON path (default under benchmarks/results/)")
  args = p.parse_args(argv)
  if args.steps < 1 or args.warmup < 1:
    p.error("--steps and --warmup must be >= 1")
  if "adamw" not in args.arms:
    args.arms.insert(0, "adamw")
  # What Bench reads from lm_throughput's arguments.
  args.remat, args.schedule_steps = False, 1000
  return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  bench = Bench(args)
  dev = jax.devices()[0]
  rows = []
  for label in args.arms:
    t0 = time.perf_counter()
    rows.append(profile_arm(bench, label, args.steps, args.warmup, args.top))
    print(f"  profiled {label} in {time.perf_counter() - t0:.0f} s",
          flush=True)
  add_deltas(rows)
  print_table(rows, bench.n_params)
  result = {
      "command": "python benchmarks/profile_step.py " + " ".join(
          sys.argv[1:] if argv is None else argv),
      "date": datetime.datetime.now(datetime.UTC).isoformat(),
      "device": getattr(dev, "device_kind", str(dev)),
      "platform": dev.platform,
      "jax": jax.__version__, "jaxlib": jaxlib.__version__,
      "python": platform.python_version(),
      "args": {k: v for k, v in vars(args).items() if k != "arm_list"},
      "n_params": bench.n_params,
      "rows": rows,
      "optimizer_step": None,
  }
  out = Path(args.out or str(
      ROOT / "benchmarks" / "results" /
      f"profile_step-{sanitize(result['device'])}-{args.preset}.json"))
  write_json(result, out)     # in case the rest dies
  if args.optimizer_size:
    print(f"\noptimizer step alone, {args.optimizer_size} "
          f"{args.optimizer_dtype}: XLA bytes accessed vs fused floor")
    result["optimizer_step"] = optimizer_bytes(
        args.optimizer_size, args.optimizer_dtype, args.context_tokens,
        args.optimizers, args.optimizer_profile, args.top)
    write_json(result, out)
  print(f"wrote {out}")
  return result


if __name__ == "__main__":
  main()
