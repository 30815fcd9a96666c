"""A GPT trained on a (data, model) device mesh with CGFM or CEGM.

Two styles, same model and data:

* ``--style jit`` (default): params sharded FSDP along ``data`` and tensor
  parallel (Megatron) along ``model`` as Flax creates them, the optimizer
  state initialised under ``jax.jit`` sharded like the params
  (:func:`cgf_optax.sharding.init_sharded`), batches split along ``data``;
  XLA inserts the collectives, and every global reduction of the optimizer
  (norms, the context pooling, the loss) is over the whole batch and params.
* ``--style shard_map``: data parallel inside :func:`jax.shard_map`: params
  and state replicated, each device differentiates the loss of its slice of
  the batch; the CEGM optimizers get ``axis_name="data"`` so that the loss
  that adapts λ and the context pooling span every device's tokens.

``cgf-optax train --mesh data=4,model=2`` does the first with checkpoints
and logs. On a CPU, ask XLA for virtual devices::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        python examples/sharded_lm.py --mesh data=4,model=2 --steps 50
    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        python examples/sharded_lm.py --style shard_map --optimizer cegm_adamw
"""

from __future__ import annotations

import argparse

import jax
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import cgf_optax
from cgf_optax.nnx import capture_context
from cgf_optax.train import GPT, batch_at, gpt_config, load_corpus


def make_optimizer(name: str, axis_name: str | None = None
                   ) -> optax.GradientTransformation:
  if name == "adamw":
    return optax.adamw(3e-3)
  if name == "cgfm_adamw":
    return cgf_optax.cgfm_adamw(3e-3, rank=4)
  return cgf_optax.cegm_adamw(3e-3, num_heads=4, adapt_rate=0.1,
                              axis_name=axis_name)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--optimizer", default="cgfm_adamw",
                  choices=("adamw", "cgfm_adamw", "cegm_adamw"))
  ap.add_argument("--style", default="jit", choices=("jit", "shard_map"))
  ap.add_argument("--mesh", default="data=4,model=2",
                  help="jit style: data=D,model=M (shard_map: data only)")
  ap.add_argument("--steps", type=int, default=50)
  ap.add_argument("--batch-size", type=int, default=16)
  ap.add_argument("--seq-len", type=int, default=64)
  args = ap.parse_args()

  sizes = dict(item.split("=") for item in args.mesh.split(","))
  data = int(sizes.get("data", 1))
  model_axis = int(sizes.get("model", 1)) if args.style == "jit" else 1
  mesh = jax.make_mesh((data, model_axis), ("data", "model"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  corpus = load_corpus("shakespeare")
  cfg = gpt_config("tiny", max_seq_len=args.seq_len,
                   partitioned=args.style == "jit")
  with jax.set_mesh(mesh):          # Flax creates the kernels sharded
    graphdef, params = nnx.split(GPT(cfg, rngs=nnx.Rngs(0)), nnx.Param)
  context = args.optimizer == "cegm_adamw"
  batch = NamedSharding(mesh, P("data", None))

  def loss_fn(params, x, y):
    model = nnx.merge(graphdef, params)
    if context:
      with capture_context(model) as ctx:
        logits = model(x)
      ctx = dict(ctx)
    else:
      logits, ctx = model(x), None
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, ctx

  if args.style == "jit":
    tx = make_optimizer(args.optimizer)
    opt_state = cgf_optax.sharding.init_sharded(tx, params)
    keep = jax.tree.map(lambda a: a.sharding, (params, opt_state))

    @jax.jit
    def step(params, opt_state, x, y):
      (loss, ctx), g = jax.value_and_grad(loss_fn, has_aux=True)(params, x, y)
      extra = {"context": ctx, "value": loss} if context else {}
      u, opt_state = tx.update(g, opt_state, params, **extra)
      params = optax.apply_updates(params, u)
      # Keep params and state on their shardings from step to step.
      params, opt_state = jax.lax.with_sharding_constraint(
          (params, opt_state), keep)
      return params, opt_state, loss
  else:
    tx = make_optimizer(args.optimizer, axis_name="data")
    opt_state = tx.init(params)

    def local_step(params, opt_state, x, y):
      def global_loss(p):            # the gradient of the whole batch's loss
        loss, ctx = loss_fn(p, x, y)
        return jax.lax.pmean(loss, "data"), (loss, ctx)
      (loss, (local_loss, ctx)), g = jax.value_and_grad(
          global_loss, has_aux=True)(params)
      # This device's loss and tokens: axis_name reduces them over "data".
      extra = {"context": ctx, "value": local_loss} if context else {}
      u, opt_state = tx.update(g, opt_state, params, **extra)
      return optax.apply_updates(params, u), opt_state, loss

    step = jax.jit(jax.shard_map(
        local_step, mesh=mesh, in_specs=(P(), P(), P("data"), P("data")),
        out_specs=(P(), P(), P())))

  print(f"{args.optimizer}, {args.style}, mesh {dict(mesh.shape)} on "
        f"{jax.devices()[0].device_kind}")
  for i in range(args.steps):
    x, y = (jax.device_put(a, batch) for a in batch_at(
        corpus.train, i, args.batch_size, args.seq_len, seed=1))
    params, opt_state, loss = step(params, opt_state, x, y)
    if i % 10 == 0 or i == args.steps - 1:
      print(f"step {i:4d}  loss {float(loss):.3f}")
  arrays = jax.tree.leaves(opt_state)
  split = [a for a in arrays if any(a.sharding.spec)]
  print(f"optimizer state: {len(split)} of {len(arrays)} arrays sharded, "
        f"{sum(a.nbytes for a in split) / 2**20:.2f} of "
        f"{sum(a.nbytes for a in arrays) / 2**20:.2f} MiB")


if __name__ == "__main__":
  main()
