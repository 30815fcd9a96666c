"""Your own training loop: a Flax nnx GPT trained with CGFM or CEGM.

`cgf-optax` does all of this (and more) from the command line; this is the
few lines to copy into your own code. The optimizers are ordinary Optax
transformations, so `nnx.Optimizer` takes them as they are; CEGM also wants
the model's context (the inputs of its linear layers, captured in the same
forward pass) and the loss.

    python examples/nnx_training_loop.py --optimizer cgfm_adamw --steps 200
    python examples/nnx_training_loop.py --optimizer cegm_adamw --steps 200
"""

from __future__ import annotations

import argparse
import math

import optax
from flax import nnx

import cgf_optax
import cgf_optax.nnx
from cgf_optax.train import GPT, batch_at, gpt_config, load_corpus


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--optimizer", choices=("cgfm_adamw", "cegm_adamw", "adamw"),
                  default="cgfm_adamw")
  ap.add_argument("--steps", type=int, default=200)
  args = ap.parse_args()

  corpus = load_corpus("shakespeare")           # bytes; held-out plays for val
  model = GPT(gpt_config("tiny", max_seq_len=128), rngs=nnx.Rngs(0))
  lr = optax.warmup_cosine_decay_schedule(0.0, 3e-3, max(args.steps // 10, 1),
                                          args.steps, end_value=3e-4)
  tx = {
      "cgfm_adamw": lambda: cgf_optax.cgfm_adamw(lr, weight_decay=0.01),
      "cegm_adamw": lambda: cgf_optax.cegm_adamw(lr, weight_decay=0.01,
                                                 num_heads=4, adapt_rate=0.1),
      "adamw": lambda: optax.adamw(lr, weight_decay=0.01),
  }[args.optimizer]()
  optimizer = nnx.Optimizer(
      model, optax.chain(optax.clip_by_global_norm(1.0), tx), wrt=nnx.Param)
  use_context = args.optimizer == "cegm_adamw"

  def loss_fn(model, x, y):
    with cgf_optax.nnx.capture_context(model) as ctx:
      logits = model(x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, dict(ctx)

  @nnx.jit
  def train_step(model, optimizer, x, y):
    (loss, ctx), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, x, y)
    extra = {"context": ctx, "value": loss} if use_context else {}
    optimizer.update(model, grads, **extra)
    return loss

  @nnx.jit
  def eval_step(model, x, y):
    return loss_fn(model, x, y)[0]

  for step in range(args.steps):
    x, y = batch_at(corpus.train, step, batch_size=16, seq_len=128, seed=1)
    loss = train_step(model, optimizer, x, y)
    if (step + 1) % 50 == 0 or step + 1 == args.steps:
      vx, vy = batch_at(corpus.val, 0, batch_size=32, seq_len=128, seed=0)
      val = eval_step(model, vx, vy)
      print(f"step {step + 1:4d}  train {float(loss) / math.log(2):.3f}  "
            f"val {float(val) / math.log(2):.3f} bits/byte")


if __name__ == "__main__":
  main()
