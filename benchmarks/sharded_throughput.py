"""Sharded GPT training on 1 and N devices: tokens/s, scaling and equal losses.

Runs the training CLI's own loop (:func:`cgf_optax.train.train_one`, as
``cgf-optax train --mesh data=N`` does) for each optimizer on meshes of 1 and
N devices, with the same initialisation, batches and global batch size
(strong scaling), and records:

* ``tokens_per_s``: as the CLI measures it (every step but the first, which
  compiles; each step's metrics are fetched to the host, as in training);
* ``scaling``: tokens/s on N devices over tokens/s on 1 device (the ideal is
  N; the issue's target for data parallelism is 1.8 on 2 GPUs);
* ``loss_max_rel_diff``: the largest relative difference of the per-step
  training losses from the 1-device run (the same arithmetic up to the order
  of reductions; bf16 compute);
* the optimizer state's bytes in total and on one device (sharded: about
  total / N).

Layouts (``--layouts``): ``fsdp`` (the CLI's ``--mesh data=N``: params,
gradients and optimizer state sharded over the devices, ZeRO-3 style, batch
split) and ``dp`` (params and state replicated, batch split: classic data
parallelism, for comparison).

Usage::

  # GPU (defaults: preset 125m with 18 layers = 128M params, bf16, seq 1024)
  python benchmarks/sharded_throughput.py --devices 1 2 --out r.json
  # CPU check with 8 virtual devices
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python \\
      benchmarks/sharded_throughput.py --model tiny --d-model 32 \\
      --num-layers 1 --num-heads 2 --seq-len 32 --batch-size 8 --steps 3 \\
      --dtype float32 --devices 1 2 4 --out /tmp/sharded.json

The JSON (``--out``) holds the command, device, versions, arguments and
every run's per-step losses and times; it is rewritten after each run, so a
run cut short leaves the finished ones. ``--time-budget`` skips the runs that
would start after that many seconds.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import flax
import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import cgf_optax
from cgf_optax.train import GPT, TrainConfig, build_optimizer, load_corpus, loop
from cgf_optax.train.config import parse_optimizer_spec
from cgf_optax.train.parallel import run_mesh

OPTIMIZERS = ("adamw", "cgfm_adamw", "cegm_adamw:num_heads=4,adapt_rate=0.1")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS),
                 help="optimizer specs, as the CLI's --optimizers")
  p.add_argument("--devices", nargs="+", type=int, default=[1, 2],
                 help="mesh sizes to run (the first is the reference)")
  p.add_argument("--layouts", nargs="+", default=["fsdp"],
                 choices=("fsdp", "dp"))
  p.add_argument("--model", default="125m")
  p.add_argument("--d-model", type=int, default=0)
  p.add_argument("--num-layers", type=int, default=18,
                 help="override the preset's depth (18: 128M params with "
                 "the 125m width; 0 keeps the preset's)")
  p.add_argument("--num-heads", type=int, default=0)
  p.add_argument("--dtype", default="bfloat16",
                 choices=("float32", "bfloat16"))
  p.add_argument("--seq-len", type=int, default=1024)
  p.add_argument("--batch-size", type=int, default=64,
                 help="global batch (sequences per step), split over the "
                 "devices")
  p.add_argument("--steps", type=int, default=12)
  p.add_argument("--lr", type=float, default=3e-4)
  p.add_argument("--data", default="python",
                 help="corpus (python: the standard library's sources, "
                 "present wherever Python is)")
  p.add_argument("--max-bytes", type=int, default=8_000_000,
                 help="bytes of the python corpus to read")
  p.add_argument("--time-budget", type=float, default=0.0,
                 help="seconds after which no new run starts (0: none)")
  p.add_argument("--out", default="",
                 help="JSON file (default: benchmarks/results/"
                 "sharded_throughput-<device>.json)")
  return p.parse_args(argv)


def _state_bytes_on_device0(state: Any) -> int:
  dev = jax.devices()[0]
  total = 0
  for leaf in jax.tree.leaves(state):
    for shard in leaf.addressable_shards:
      if shard.device == dev:
        total += shard.data.nbytes
  return total


def _replicated(cfg: TrainConfig, n: int) -> tuple[Any, Any]:
  """Unpartitioned params, replicated on an N-device ``data`` mesh."""
  mesh = run_mesh(f"data={n}")
  model = GPT(loop.model_config(cfg), rngs=nnx.Rngs(cfg.init_seed))
  graphdef, params = nnx.split(model, nnx.Param)
  return graphdef, jax.device_put(params, NamedSharding(mesh, P()))


def one_run(args: argparse.Namespace, spec_text: str, layout: str, n: int,
            corpus: Any) -> dict[str, Any]:
  spec = parse_optimizer_spec(spec_text)
  cfg = TrainConfig(
      optimizers=(spec_text,), lr=args.lr, model=args.model,
      d_model=args.d_model, num_layers=args.num_layers,
      num_heads=args.num_heads, dtype=args.dtype, seq_len=args.seq_len,
      batch_size=args.batch_size, steps=args.steps, eval_every=args.steps,
      eval_batches=1, telemetry_every=0, checkpoint_every=0, progress=False,
      data=args.data, mesh=f"data={n}")
  t0 = time.perf_counter()
  if layout == "fsdp":
    graphdef, params0 = loop.init_model(cfg)
  else:
    graphdef, params0 = _replicated(cfg, n)
  init_s = time.perf_counter() - t0
  with tempfile.TemporaryDirectory() as tmp:
    t0 = time.perf_counter()
    res = loop.train_one(cfg, spec, corpus, graphdef, params0, Path(tmp))
    wall = time.perf_counter() - t0
  times = [r["time"] for r in res.records]
  steps = np.diff([0.0, *times])
  n_params = sum(x.size for x in jax.tree.leaves(params0))
  tx = build_optimizer(spec, cfg)
  state = cgf_optax.sharding.init_sharded(tx, res.params)
  out = {
      "optimizer": spec.label, "layout": layout, "devices": n,
      "tokens_per_s": res.tokens_per_s,
      "step_s_median": float(np.median(steps[1:])) if len(steps) > 1 else None,
      "first_step_s": float(steps[0]),
      "init_s": init_s, "wall_s": wall,
      "losses": [r["loss"] for r in res.records],
      "final_val_bits": res.final_val,
      "state_bytes": res.state_bytes,
      "state_bytes_device0": _state_bytes_on_device0(state),
      "n_params": int(n_params),
      "diverged": res.diverged,
  }
  del state, res, params0
  gc.collect()
  return out


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
  rows = []
  ref: dict[tuple[str, str], dict[str, Any]] = {}
  for r in runs:
    key = (r["optimizer"], r["layout"])
    if key not in ref:
      ref[key] = r
    base = ref[key]
    diffs = [abs(a - b) / abs(b) for a, b in zip(r["losses"], base["losses"],
                                                 strict=True)
             if a is not None and b is not None]
    rows.append({
        "optimizer": r["optimizer"], "layout": r["layout"],
        "devices": r["devices"], "tokens_per_s": r["tokens_per_s"],
        "scaling": r["tokens_per_s"] / base["tokens_per_s"],
        "efficiency": (r["tokens_per_s"] / base["tokens_per_s"]
                       * base["devices"] / r["devices"]),
        "loss_max_rel_diff": max(diffs) if diffs else None,
        "state_bytes_device0": r["state_bytes_device0"],
        "state_bytes": r["state_bytes"]})
  return rows


def table(rows: list[dict[str, Any]]) -> str:
  head = (f"{'optimizer':<40} {'layout':<6} {'dev':>3} {'tokens/s':>11} "
          f"{'scaling':>8} {'loss diff':>10} {'state/dev':>10}")
  lines = [head, "-" * len(head)]
  for r in rows:
    diff = r["loss_max_rel_diff"]
    lines.append(
        f"{r['optimizer'][:40]:<40} {r['layout']:<6} {r['devices']:>3} "
        f"{r['tokens_per_s']:>11,.0f} {r['scaling']:>7.2f}x "
        f"{'-' if diff is None else f'{diff:.1e}':>10} "
        f"{r['state_bytes_device0'] / 2**20:>8.1f}Mi")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  dev = jax.devices()[0]
  if max(args.devices) > jax.device_count():
    raise SystemExit(f"--devices {args.devices}: only {jax.device_count()} "
                     "devices")
  kind = dev.device_kind
  out = Path(args.out or "benchmarks/results/sharded_throughput-"
             + "".join(c if c.isalnum() else "-" for c in kind.lower())
             + ".json")
  corpus = load_corpus(args.data, **({"max_bytes": args.max_bytes}
                                     if args.data == "python" else {}))
  print(f"device: {kind} x{jax.device_count()} ({dev.platform}); "
        f"jax {jax.__version__}; corpus {corpus.describe()}", flush=True)
  report: dict[str, Any] = {
      "command": [sys.argv[0], *(sys.argv[1:] if argv is None else argv)],
      "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
      "device": {"kind": kind, "platform": dev.platform,
                 "count": jax.device_count()},
      "versions": {"python": platform.python_version(), "jax": jax.__version__,
                   "flax": flax.__version__, "optax": optax.__version__},
      "args": vars(args), "runs": [], "skipped": []}
  start = time.perf_counter()
  for spec in args.optimizers:
    for layout in args.layouts:
      for n in args.devices:
        if args.time_budget and time.perf_counter() - start > args.time_budget:
          report["skipped"].append({"optimizer": spec, "layout": layout,
                                    "devices": n})
          continue
        run = one_run(args, spec, layout, n, corpus)
        report["runs"].append(run)
        print(f"{run['optimizer']} {layout} x{n}: "
              f"{run['tokens_per_s']:,.0f} tokens/s, first step "
              f"{run['first_step_s']:.1f} s, wall {run['wall_s']:.1f} s",
              flush=True)
        report["summary"] = summarise(report["runs"])
        report["elapsed_s"] = time.perf_counter() - start
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
  print()
  print(table(report.get("summary", [])))
  if report["skipped"]:
    print(f"skipped (time budget): {report['skipped']}")
  print(f"wrote {out}")
  return report


if __name__ == "__main__":
  main()
