"""A GPT trained with every CGFM and CEGM alias over several processes.

JAX's multi-process runtime: one process per host, each with its own
devices, one mesh over all of them. Every process runs this same script;
it differs only in ``--process-id``. What a multi-host program adds to the
one-process sharded training of ``examples/sharded_lm.py``:

* :func:`cgf_optax.sharding.initialize` first (JAX's
  :func:`jax.distributed.initialize`);
* each process builds only its rows of every global batch
  (:func:`cgf_optax.sharding.process_rows`) and turns them into the global
  batch (:func:`cgf_optax.sharding.global_batch`);
* values come back to the host with :func:`cgf_optax.sharding.to_host`
  (the loss, replicated; the params, split over the processes, gathered).

The optimizer state is created by :func:`cgf_optax.sharding.init_sharded` as
on one process: each process creates only its devices' shards.

On one machine, two processes of two virtual CPU devices each (Gloo
collectives), mesh ``data=2,model=2`` over the four::

    for i in 0 1; do
      XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu \\
      python examples/multihost_lm.py --coordinator 127.0.0.1:12355 \\
          --num-processes 2 --process-id $i &
    done; wait

On a cluster of GPU hosts, the same command on every host with the first
host's address and ``--mesh data=<all GPUs>``; under SLURM (or Open MPI,
Kubernetes) ``--coordinator auto``. With ``--num-processes 1`` (no
coordinator) it is a one-process run: its losses are those of the
multi-process run.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
import optax
from flax import nnx

import cgf_optax
from cgf_optax import sharding
from cgf_optax.nnx import capture_context
from cgf_optax.train import GPT, batch_at, gpt_config, load_corpus

OPTIMIZERS = {
    "cgfm": lambda: cgf_optax.cgfm(1e-2, rank=2, refresh_every=2),
    "cgfm_adamw": lambda: cgf_optax.cgfm_adamw(3e-3, rank=2, num_scales=3),
    "cegm": lambda: cgf_optax.cegm(1e-2, num_heads=2, adapt_rate=0.1),
    "cegm_adamw": lambda: cgf_optax.cegm_adamw(3e-3, num_heads=2,
                                               adapt_rate=0.1),
}


def train(name: str, mesh: jax.sharding.Mesh, args: argparse.Namespace
          ) -> tuple[list[float], float]:
  """``args.steps`` steps of ``name``; the losses and the params' L2 norm."""
  corpus = load_corpus("shakespeare")
  cfg = gpt_config("tiny", d_model=64, num_layers=1, num_heads=2,
                   max_seq_len=args.seq_len, partitioned=True)
  with jax.set_mesh(mesh):          # Flax creates the kernels sharded
    graphdef, params = nnx.split(GPT(cfg, rngs=nnx.Rngs(0)), nnx.Param)
  tx = OPTIMIZERS[name]()
  context = name.startswith("cegm")
  opt_state = sharding.init_sharded(tx, params)
  keep = jax.tree.map(lambda a: a.sharding, (params, opt_state))

  def loss_fn(params, x, y):
    model = nnx.merge(graphdef, params)
    with capture_context(model) as ctx:
      logits = model(x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, dict(ctx)

  @jax.jit
  def step(params, opt_state, x, y):
    (loss, ctx), g = jax.value_and_grad(loss_fn, has_aux=True)(params, x, y)
    extra = {"context": ctx, "value": loss} if context else {}
    u, opt_state = tx.update(g, opt_state, params, **extra)
    params = optax.apply_updates(params, u)
    params, opt_state = jax.lax.with_sharding_constraint(
        (params, opt_state), keep)
    return params, opt_state, loss

  rows = sharding.process_rows(mesh, args.batch_size)   # this process's
  losses = []
  for i in range(args.steps):
    local = batch_at(corpus.train, i, args.batch_size, args.seq_len, seed=1,
                     rows=rows)
    x, y = sharding.global_batch(local, mesh, args.batch_size)
    params, opt_state, loss = step(params, opt_state, x, y)
    losses.append(float(sharding.to_host(loss)))
  flat = np.concatenate([np.ravel(p) for p in jax.tree.leaves(
      sharding.to_host(params))])     # gathered from every process
  return losses, float(np.linalg.norm(flat.astype(np.float64)))


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--coordinator", default="",
                  help="HOST:PORT of process 0, or auto (a managed cluster)")
  ap.add_argument("--num-processes", type=int, default=1)
  ap.add_argument("--process-id", type=int, default=0)
  ap.add_argument("--heartbeat-timeout", type=int, default=100,
                  help="seconds before the others stop when one process "
                       "died unnoticed by a collective")
  ap.add_argument("--mesh", default="data=2,model=2")
  ap.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS),
                  choices=list(OPTIMIZERS))
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--batch-size", type=int, default=8)
  ap.add_argument("--seq-len", type=int, default=16)
  args = ap.parse_args()

  if args.coordinator == "auto":
    sharding.initialize(heartbeat_timeout=args.heartbeat_timeout)
  elif args.coordinator:
    sharding.initialize(args.coordinator, args.num_processes, args.process_id,
                        heartbeat_timeout=args.heartbeat_timeout)
  mesh = sharding.make_mesh(args.mesh)      # every process's devices
  say = print if jax.process_index() == 0 else (lambda *a: None)
  say(f"{jax.process_count()} processes, {jax.device_count()} devices "
      f"({jax.local_device_count()} each), mesh {dict(mesh.shape)}")
  for name in args.optimizers:
    losses, norm = train(name, mesh, args)
    say(f"{name:>10}  losses {' '.join(f'{v:.6f}' for v in losses)}  "
        f"|params| {norm:.6f}")
    say(f"RESULT {name} {' '.join(repr(v) for v in losses)} {norm!r}")


if __name__ == "__main__":
  main()
