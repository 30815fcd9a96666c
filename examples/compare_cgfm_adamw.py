"""Trains a tiny byte-level transformer with AdamW, the CGFM chains and CEGM.

The main job until the training CLI lands: a small Flax nnx decoder-only
transformer learns to predict the next byte of Python's own standard-library
sources (bundled with every Python, so nothing is downloaded). Every optimizer
starts from the same initialisation and sees the same batches; at the end a
table compares validation loss (bits per byte, on held-out *files*), the
steps each needed to reach AdamW's final validation loss, throughput and
optimizer-state size, and a plot of the curves is written.

    python examples/compare_cgfm_adamw.py            # a few minutes on 2 CPU cores
    python examples/compare_cgfm_adamw.py --steps 60 # a quick look

The hyper-parameters below were fixed before looking at the results (AdamW
3e-3 with warm-up and cosine decay, the usual choice for a model this
size; the CGFM chains use the same schedule and their default
arguments; SGD-based `cgfm` gets momentum 0.9 and a learning rate 30x
larger, the usual SGD/Adam ratio; `cegm_adamw` gets 4 context heads and
adapts λ from the loss). They are not tuned per optimizer, so this
is a demonstration, not a verdict: the quality benchmarks tune every arm
equally.
"""

from __future__ import annotations

import argparse
import json
import math
import sysconfig
import time
from pathlib import Path

import jax
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

import cgf_optax
import cgf_optax.nnx

# ----------------------------------------------------------------------------
# Data: Python's standard-library sources, byte-level, split by file.


def load_stdlib_bytes(max_bytes: int) -> tuple[np.ndarray, np.ndarray]:
  root = Path(sysconfig.get_paths()["stdlib"])
  files = sorted(p for p in root.rglob("*.py")
                 if "test" not in p.parts and "site-packages" not in p.parts)
  if not files:
    raise SystemExit(f"no Python sources found under {root}")
  chunks, total = [], 0
  for f in files:
    data = f.read_bytes()
    chunks.append(data)
    total += len(data)
    if total >= max_bytes:
      break
  n_val = max(1, len(chunks) // 10)       # held-out files, not random windows
  train = np.frombuffer(b"\n".join(chunks[:-n_val]), dtype=np.uint8)
  val = np.frombuffer(b"\n".join(chunks[-n_val:]), dtype=np.uint8)
  return train, val


def batches(data: np.ndarray, batch: int, seq: int, seed: int):
  rng = np.random.default_rng(seed)
  while True:
    idx = rng.integers(0, len(data) - seq - 1, size=batch)
    x = np.stack([data[i:i + seq + 1] for i in idx])
    yield x[:, :-1].astype(np.int32), x[:, 1:].astype(np.int32)


def unigram_bits(data: np.ndarray) -> float:
  p = np.bincount(data, minlength=256) / len(data)
  p = p[p > 0]
  return float(-(p * np.log2(p)).sum())


# ----------------------------------------------------------------------------
# Model: a pre-RMSNorm decoder-only transformer in Flax nnx.


class Block(nnx.Module):

  def __init__(self, d: int, heads: int, *, rngs: nnx.Rngs):
    self.heads = heads
    self.norm1 = nnx.RMSNorm(d, rngs=rngs)
    self.qkv = nnx.Linear(d, 3 * d, use_bias=False, rngs=rngs)
    self.out = nnx.Linear(d, d, use_bias=False, rngs=rngs)
    self.norm2 = nnx.RMSNorm(d, rngs=rngs)
    self.up = nnx.Linear(d, 4 * d, rngs=rngs)
    self.down = nnx.Linear(4 * d, d, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, d = x.shape
    qkv = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, d // self.heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    a = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    x = x + self.out(a.reshape(b, t, d))
    return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))


class TinyGPT(nnx.Module):

  def __init__(self, d: int, layers: int, heads: int, seq: int, *,
               rngs: nnx.Rngs):
    self.embed = nnx.Embed(256, d, rngs=rngs)
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (seq, d)))
    self.blocks = nnx.List([Block(d, heads, rngs=rngs) for _ in range(layers)])
    self.norm = nnx.RMSNorm(d, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = self.embed(tokens) + self.pos[: tokens.shape[1]]
    for block in self.blocks:
      x = block(x)
    return self.embed.attend(self.norm(x))   # tied output embedding


# ----------------------------------------------------------------------------
# Training: pure functions of (params, opt_state), jitted once per optimizer.


def make_optimizers(lr: float, steps: int) -> dict[str, optax.GradientTransformation]:
  warmup = max(1, steps // 10)
  sched = lambda peak: optax.warmup_cosine_decay_schedule(
      0.0, peak, warmup, steps, end_value=peak / 10)
  clip = optax.clip_by_global_norm(1.0)
  return {
      "adamw": optax.chain(clip, optax.adamw(sched(lr), weight_decay=0.01)),
      "cgfm_adamw lowrank": optax.chain(
          clip, cgf_optax.cgfm_adamw(sched(lr), weight_decay=0.01)),
      "cgfm_adamw mean": optax.chain(
          clip, cgf_optax.cgfm_adamw(sched(lr), weight_decay=0.01,
                                     strategy="mean")),
      "cgfm_adamw temporal": optax.chain(
          clip, cgf_optax.cgfm_adamw(sched(lr), weight_decay=0.01,
                                     strategy="temporal")),
      "cgfm (sgd+momentum)": optax.chain(
          clip, cgf_optax.cgfm(sched(30 * lr), momentum=0.9, max_factor=4.0)),
      "cegm_adamw": optax.chain(
          clip, cgf_optax.cegm_adamw(sched(lr), weight_decay=0.01,
                                     num_heads=4, adapt_rate=0.1)),
  }


USES_CONTEXT = {"cegm_adamw"}   # fed the captured context and the loss


def train_one(name, tx, graphdef, params0, train_it_seed, data, val_batches,
              args):
  def loss_fn(params, x, y):
    model = nnx.merge(graphdef, params)
    # CEGM's context: the input of every linear layer, captured in this same
    # forward pass (only used by the CEGM chain; cheap to collect).
    with cgf_optax.nnx.capture_context(model) as ctx:
      logits = model(x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, ctx

  use_context = name in USES_CONTEXT

  @jax.jit
  def step(params, opt_state, x, y):
    (loss, ctx), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, y)
    extra = {"context": ctx, "value": loss} if use_context else {}
    updates, opt_state = tx.update(grads, opt_state, params, **extra)
    return optax.apply_updates(params, updates), opt_state, loss

  eval_loss = jax.jit(lambda p, x, y: loss_fn(p, x, y)[0])
  params = params0
  opt_state = tx.init(params)
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(opt_state))
  it = batches(data, args.batch, args.seq, train_it_seed)
  history = {"step": [], "train": [], "val_step": [], "val": [], "time": []}
  t_run, tokens = 0.0, 0
  bar = tqdm(range(1, args.steps + 1), desc=f"{name:>22}", ncols=100,
             leave=True)
  ema, ema_w = 0.0, 0.0
  for i in bar:
    x, y = next(it)
    t0 = time.perf_counter()
    params, opt_state, loss = step(params, opt_state, x, y)
    loss = float(loss)
    if i > 1:  # leave compilation out of the throughput
      t_run += time.perf_counter() - t0
      tokens += x.size
    ema, ema_w = 0.9 * ema + 0.1 * loss, 0.9 * ema_w + 0.1  # bias-corrected
    history["step"].append(i)
    history["train"].append(loss / math.log(2))
    history["time"].append(t_run)
    if i % args.eval_every == 0 or i == args.steps:
      val = float(np.mean([eval_loss(params, vx, vy) for vx, vy in val_batches]))
      history["val_step"].append(i)
      history["val"].append(val / math.log(2))
    bar.set_postfix(loss=f"{ema / ema_w / math.log(2):.3f} b/B",
                    tok_s=f"{tokens / max(t_run, 1e-9):,.0f}")
  if not np.isfinite(history["train"][-1]):
    tqdm.write(f"warning: {name} diverged (non-finite loss)")
  return {"history": history, "tokens_per_s": tokens / max(t_run, 1e-9),
          "state_bytes": state_bytes}


def steps_to_reach(history, target):
  for s, v in zip(history["val_step"], history["val"], strict=True):
    if v <= target:
      return s
  return None


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--steps", type=int, default=300)
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--seq", type=int, default=128)
  ap.add_argument("--d-model", type=int, default=128)
  ap.add_argument("--layers", type=int, default=2)
  ap.add_argument("--heads", type=int, default=4)
  ap.add_argument("--lr", type=float, default=3e-3)
  ap.add_argument("--eval-every", type=int, default=25)
  ap.add_argument("--data-bytes", type=int, default=4_000_000)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", type=Path, default=Path("runs/demo"))
  args = ap.parse_args()

  train, val = load_stdlib_bytes(args.data_bytes)
  vb = list(zip(range(8), batches(val, 32, args.seq, seed=12345), strict=False))
  val_batches = [b for _, b in vb]
  model = TinyGPT(args.d_model, args.layers, args.heads, args.seq,
                  rngs=nnx.Rngs(args.seed))
  graphdef, params0 = nnx.split(model, nnx.Param)
  n_params = sum(x.size for x in jax.tree.leaves(params0))
  uni = unigram_bits(train)
  print(f"data: {len(train):,} train bytes, {len(val):,} validation bytes "
        f"(held-out files) from Python {sysconfig.get_python_version()}'s "
        f"standard library")
  print(f"model: {n_params:,} parameters; device: {jax.devices()[0].device_kind}")
  print(f"baselines: uniform guess 8.000 bits/byte, unigram entropy {uni:.3f} "
        "bits/byte\n")

  results = {}
  for name, tx in make_optimizers(args.lr, args.steps).items():
    results[name] = train_one(name, tx, graphdef, params0, args.seed + 1,
                              train, val_batches, args)

  target = results["adamw"]["history"]["val"][-1]
  base_tps = results["adamw"]["tokens_per_s"]
  base_bytes = results["adamw"]["state_bytes"]
  header = (f"{'optimizer':<22} {'train b/B':>9} {'val b/B':>8} "
            f"{'steps to AdamW val':>18} {'tokens/s':>10} {'vs AdamW':>8} "
            f"{'state MB':>8} {'vs AdamW':>8}")
  lines = [header, "-" * len(header)]
  for name, r in results.items():
    h = r["history"]
    tr = float(np.mean(h["train"][-20:]))
    reach = steps_to_reach(h, target)
    lines.append(
        f"{name:<22} {tr:>9.3f} {h['val'][-1]:>8.3f} "
        f"{(str(reach) if reach else 'not reached'):>18} "
        f"{r['tokens_per_s']:>10,.0f} {r['tokens_per_s'] / base_tps:>7.2f}x "
        f"{r['state_bytes'] / 1e6:>8.2f} {r['state_bytes'] / base_bytes:>7.2f}x")
  table = "\n".join(lines)
  print("\n" + table)
  print(f"\nAll validation losses are in bits per byte on held-out files; "
        f"uniform = 8.000, unigram = {uni:.3f}. 'train b/B' is the mean of the "
        "last 20 steps.")

  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "results.json").write_text(json.dumps({
      "args": {k: str(v) for k, v in vars(args).items()},
      "n_params": n_params, "unigram_bits": uni,
      "device": jax.devices()[0].device_kind,
      "results": results}, indent=1))
  (args.out / "table.txt").write_text(table + "\n")
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("matplotlib not installed: no plot")
    return
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  for name, r in results.items():
    h = r["history"]
    smooth = np.convolve(h["train"], np.ones(10) / 10, mode="valid")
    axes[0].plot(h["step"][9:], smooth, label=name)
    axes[1].plot(h["val_step"], h["val"], marker="o", ms=3, label=name)
  for ax, title in zip(axes, ["train loss (10-step mean)", "validation loss"],
                       strict=True):
    ax.axhline(uni, color="grey", ls=":", lw=1, label="unigram entropy")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per byte")
    ax.set_title(title)
    ax.grid(alpha=0.3)
  axes[1].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(args.out / "compare.png", dpi=120)
  print(f"wrote {args.out}/compare.png, results.json and table.txt")


if __name__ == "__main__":
  main()
