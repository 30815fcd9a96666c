"""Where does the training loop's time go? Variants of the engine's loop on
one model, timed one after the other (a diagnostic for engine_throughput).

Variants: ``engine`` (train_one as the CLI runs it), ``lag8`` (metrics
fetched 8 steps late), ``inline`` (batches built in the loop's thread),
``device`` (the compiled step on device-resident batches, no metrics
fetched), ``put`` (the same, each batch built on the host and device_put in
the loop), ``fetch`` (``device`` plus a device_get of each step's metrics 2
steps late).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from benchmarks._results import write_json  # noqa: E402
from cgf_optax.train import data, loop  # noqa: E402
from cgf_optax.train import feed as feed_mod  # noqa: E402
from cgf_optax.train.config import parse_optimizer_spec  # noqa: E402
from cgf_optax.train.optimizers import build_optimizer  # noqa: E402
from cgf_optax.train.step import Batch, TrainState, make_train_step  # noqa: E402


def engine(cfg, spec, corpus, graphdef, params0) -> float:
  with tempfile.TemporaryDirectory() as d:
    r = loop.train_one(cfg, spec, corpus, graphdef, params0, Path(d))
  t = np.asarray([x["time"] for x in r.records])
  return float(np.median(np.diff(t)))


def raw(cfg, spec, corpus, graphdef, params0, mode: str) -> float:
  tx = build_optimizer(spec, cfg)
  step = jax.jit(make_train_step(graphdef, tx), donate_argnums=0)
  params = jax.tree.map(lambda x: x.copy(), params0)
  state = TrainState(params, tx.init(params))
  hb = [feed_mod.host_batch(corpus.train, i, cfg.batch_size, cfg.seq_len, 1)
        for i in range(cfg.steps)]
  if mode == "random":       # uniformly random bytes instead of text
    rng = np.random.default_rng(0)
    hb = [Batch(rng.integers(0, 256, b.x.shape, dtype=np.int32),
                rng.integers(0, 256, b.y.shape, dtype=np.int32), b.step)
          for b in hb]
  db = [Batch(*jax.device_put(tuple(b))) for b in hb[:4]]
  state, m = step(state, db[0])
  jax.block_until_ready(m)
  pending = []
  t0 = time.perf_counter()
  for i in range(cfg.steps):
    b = (Batch(*jax.device_put(tuple(hb[i]))) if mode == "put"
         else db[i % 4])
    state, m = step(state, b)
    if mode == "fetch":
      pending.append(m)
      if len(pending) > 2:
        jax.device_get(pending.pop(0))
  jax.block_until_ready(state)
  return (time.perf_counter() - t0) / cfg.steps


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--steps", type=int, default=100)
  p.add_argument("--optimizer", default="adamw")
  p.add_argument("--variants", nargs="+", default=[
      "device", "put", "fetch", "engine", "lag8", "inline"])
  p.add_argument("--out")
  p.add_argument("model", nargs="*", default=[
      "--model", "125m", "--d-model", "512", "--num-layers", "8",
      "--num-heads", "8", "--seq-len", "512", "--batch-size", "64"])
  args = p.parse_args()
  from cgf_optax.train.cli import parse_args
  _, cfg = parse_args(["train", *args.model, "--steps", str(args.steps),
                       "--eval-every", str(args.steps), "--eval-batches", "1",
                       "--telemetry-every", "0", "--checkpoint-every", "0",
                       "--data", "python", "--no-progress"])
  cfg = dataclasses.replace(cfg, optimizers=(args.optimizer,))
  spec = parse_optimizer_spec(args.optimizer)
  corpus = data.load_corpus(cfg.data)
  print("backend", jax.default_backend(), loop.model_config(cfg), flush=True)
  graphdef, params0 = loop.init_model(cfg)
  out = {}
  for v in args.variants:
    if v.startswith("cfg:"):      # cfg:field=value,... then the device loop
      over = dict(kv.split("=") for kv in v[4:].split(","))
      c2 = dataclasses.replace(cfg, **over)
      print(v, loop.model_config(c2), flush=True)
      g2, p2 = loop.init_model(c2)
      out[v] = raw(c2, spec, corpus, g2, p2, "device")
      print(f"{v:>8}: {out[v] * 1e3:8.2f} ms/step", flush=True)
      continue
    if v in ("device", "put", "fetch", "random"):
      s = raw(cfg, spec, corpus, graphdef, params0, v)
    elif v in ("gather", "gather-random"):     # the embedding as a gather
      from cgf_optax.train import model as model_mod
      old, model_mod.ONE_HOT_MAX_VOCAB = model_mod.ONE_HOT_MAX_VOCAB, 0
      s = raw(cfg, spec, corpus, graphdef, params0,
              "random" if v == "gather-random" else "device")
      model_mod.ONE_HOT_MAX_VOCAB = old
    elif v == "engine":
      s = engine(cfg, spec, corpus, graphdef, params0)
    elif v == "lag8":
      old, loop._LAG = loop._LAG, 8
      s = engine(cfg, spec, corpus, graphdef, params0)
      loop._LAG = old
    elif v == "inline":
      old = feed_mod.BatchFeed.__init__.__defaults__
      kw = feed_mod.BatchFeed.__init__.__kwdefaults__
      kw["prefetch"] = 0
      s = engine(cfg, spec, corpus, graphdef, params0)
      kw["prefetch"] = 2
      del old
    out[v] = s
    print(f"{v:>8}: {s * 1e3:8.2f} ms/step", flush=True)
  if args.out:
    write_json({"device": jax.devices()[0].device_kind, "steps": args.steps,
                "optimizer": args.optimizer, "model": args.model,
                "ms_per_step": {k: v * 1e3 for k, v in out.items()}},
               args.out)
  print(json.dumps({k: round(v * 1e3, 2) for k, v in out.items()}))


if __name__ == "__main__":
  main()
