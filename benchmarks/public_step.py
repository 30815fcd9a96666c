"""The optimizer step as a user writes it, against ``optax.adamw``.

A second, minimal measurement beside ``benchmarks/step_overhead.py``: it
uses only the public APIs of ``cgf_optax``, ``optax`` and ``jax`` (no
benchmark helpers), on a GPT-shaped tree of fp32 params (``--layers``
blocks of width ``--width``: qkv, out, up and down kernels, two norms; an
embedding of ``--vocab`` rows). Each optimizer's step is ``jax.jit`` of
``tx.update`` + ``optax.apply_updates`` with params and state donated, run
``--steps`` times back to back (as a training loop dispatches them, so
launch latency overlaps with the device's work) and waited for once; the
time per step is that wall time over ``--steps``. Optimizers take turns
for ``--rounds`` rounds (order rotated each round); reported is each one's
median over rounds and its ratio to adamw's median. CEGM gets a random
context of ``--context-tokens`` rows for every kernel and a loss value.

  python benchmarks/public_step.py                     # ~1B params, one GPU
  python benchmarks/public_step.py --layers 2 --width 256 --vocab 1024  # CPU

Writes ``benchmarks/results/public_step-<device>-<params>.json``.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

import cgf_optax

OPTIMIZERS = {
    "adamw": lambda: optax.adamw(1e-3),
    "cgfm": lambda: cgf_optax.cgfm(1e-3),
    "cgfm_adamw": lambda: cgf_optax.cgfm_adamw(1e-3),
    "cgfm_adamw/mean": lambda: cgf_optax.cgfm_adamw(1e-3, strategy="mean"),
    "cegm": lambda: cgf_optax.cegm(1e-3),
    "cegm_adamw": lambda: cgf_optax.cegm_adamw(1e-3),
}


def gpt_params(layers: int, d: int, vocab: int) -> dict:
  key = iter(jax.random.split(jax.random.key(0), 6 * layers + 1))

  def w(*shape: int) -> jax.Array:
    return 0.02 * jax.random.normal(next(key), shape, jnp.float32)

  blocks = {f"block{i}": {
      "ln1": jnp.ones(d), "ln2": jnp.ones(d),
      "attn": {"qkv": w(d, 3 * d), "out": w(d, d)},
      "mlp": {"up": w(d, 4 * d), "down": w(4 * d, d)}}
      for i in range(layers)}
  return {"embed": w(vocab, d), **blocks}


def contexts(params: dict, tokens: int) -> dict[str, jax.Array]:
  """A random ``[tokens, fan_in]`` context for every attention/MLP kernel,
  keyed by its path."""
  out = {}
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = jax.tree_util.keystr(path, simple=True, separator="/")
    if x.ndim == 2 and re.search(r"attn|mlp", name):
      out[name] = jax.random.normal(jax.random.key(len(out)),
                                    (tokens, x.shape[0]), jnp.float32)
  return out


def main(argv: list[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--layers", type=int, default=18)
  p.add_argument("--width", type=int, default=2048)
  p.add_argument("--vocab", type=int, default=50304)
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--context-tokens", type=int, default=8192)
  p.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS),
                 choices=list(OPTIMIZERS))
  p.add_argument("--out", default="")
  args = p.parse_args(argv)
  names = ["adamw"] + [n for n in args.optimizers if n != "adamw"]

  grads = jax.tree.map(lambda x: 1e-3 * jnp.ones_like(x) + 1e-4 * x,
                       gpt_params(args.layers, args.width, args.vocab))
  n_params = sum(x.size for x in jax.tree.leaves(grads))
  extra = {"context": contexts(grads, args.context_tokens),
           "value": jnp.float32(2.0)}
  steps, live = {}, {}
  for name in names:
    tx = OPTIMIZERS[name]()
    kw = extra if name.startswith("cegm") else {}

    def step(params, state, grads, kw, tx=tx):
      updates, state = tx.update(grads, state, params, **kw)
      return optax.apply_updates(params, updates), state

    steps[name] = (jax.jit(step, donate_argnums=(0, 1)), kw)
    params = gpt_params(args.layers, args.width, args.vocab)
    live[name] = (params, tx.init(params))

  def run(name: str, n: int) -> float:
    fn, kw = steps[name]
    params, state = live[name]
    t0 = time.perf_counter()
    for _ in range(n):
      params, state = fn(params, state, grads, kw)
    jax.block_until_ready((params, state))
    live[name] = (params, state)
    return (time.perf_counter() - t0) / n

  for name in names:      # compile, and a first refresh period
    run(name, 12)
  times: dict[str, list[float]] = {n: [] for n in names}
  for r in range(args.rounds):
    for name in names[r % len(names):] + names[:r % len(names)]:
      times[name].append(run(name, args.steps))
  ms = {n: 1e3 * statistics.median(t) for n, t in times.items()}
  dev = jax.devices()[0]
  result = {
      "command": ["python", "benchmarks/public_step.py",
                  *(sys.argv[1:] if argv is None else argv)],
      "device": dev.device_kind, "platform": dev.platform,
      "jax": jax.__version__, "optax": optax.__version__,
      "n_params": n_params, "args": vars(args),
      "ms_per_step": ms,
      "ratio_to_adamw": {n: ms[n] / ms["adamw"] for n in names},
      "all_ms_per_step": {n: [1e3 * t for t in ts] for n, ts in times.items()},
  }
  for n in names:
    print(f"{n:18s} {ms[n]:8.2f} ms/step  x{ms[n] / ms['adamw']:.2f} adamw")
  kind = re.sub(r"[^a-z0-9]+", "-", dev.device_kind.lower()).strip("-")
  out = Path(args.out or Path(__file__).parent / "results" /
             f"public_step-{kind}-{n_params / 1e6:.0f}m.json")
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=1) + "\n")
  print(f"wrote {out}")
  return result


if __name__ == "__main__":
  main()
