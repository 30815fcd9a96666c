"""Sharded-training checks, run on 8 virtual CPU devices in a subprocess.

``python tests/sharded_checks.py CHECK [NAME ...]`` prints one line
``RESULTS=<json>``; ``tests/test_sharded_training.py`` runs it with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (JAX must see the flag
before it starts, and other test files have started it already).

Checks:

* ``gpt NAME...``: for each optimizer, a GPT trained ``STEPS`` steps

  - under ``jax.jit`` on a ``(data=4, model=2)`` mesh (FSDP + tensor
    parallel, batches split on ``data``): losses and params against the same
    training on one device, the optimizer state's shardings, and (for the
    Adam-based CGFM and CEGM aliases) the collectives of the compiled
    optimizer update, none of which may carry a whole matrix;
  - data-parallel inside ``jax.shard_map`` over 8 devices (the CEGM aliases
    with ``axis_name="data"``), against one device.

  (``jit NAME...`` and ``shard_map NAME...`` run one half.)
* ``collectives``: ``fsdp``: the norm transforms and the aliases inside
  ``jax.shard_map`` on params split over the devices (a tree mixing split
  and replicated leaves, ``norm_axis_name=cgf_optax.sharding.split_axes(
  specs)``) against the unsplit updates, with a control without the axis;
  the plain norm transforms also with ``check_vma=False``, so that a wrong
  reduction fails on its value rather than on shard_map's replication check;
  ``batch_axes``: ``cegm`` on a context and losses split over 8 devices,
  with ``axis_name`` equal to the unsplit update on every device, without it
  not (the control).
* ``cli TMPDIR``: ``cgf-optax train --mesh data=4,model=2``, stopped after 2
  steps and resumed, against the unsharded run; its checkpoint restores
  sharded like the target.
"""

from __future__ import annotations

import json
import math
import re
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import cgf_optax
from cgf_optax import sharding
from cgf_optax.nnx import capture_context
from cgf_optax.train.model import GPT, gpt_config
from cgf_optax.train.parallel import init_partitioned, run_mesh

STEPS = 3
BATCH, SEQ = 8, 16
MODEL = dict(d_model=64, num_layers=1, num_heads=2, max_seq_len=SEQ)
LR = 1e-2


def optimizer(name: str, **kw: Any) -> tuple[optax.GradientTransformation, bool]:
  """``(tx, takes_context)`` for a name of the test matrix."""
  if name == "adamw":
    return optax.adamw(LR), False
  if name == "cgfm":
    return cgf_optax.cgfm(LR, rank=2, refresh_every=2), False
  if name == "cgfm_adamw":
    return cgf_optax.cgfm_adamw(LR, rank=2, num_scales=3, refresh_every=2), False
  if name == "cgfm_adamw-temporal":
    return cgf_optax.cgfm_adamw(LR, strategy="temporal", num_scales=3), False
  if name == "cgfm_adamw-mean":
    return cgf_optax.cgfm_adamw(LR, strategy="mean"), False
  if name == "cegm":
    return cgf_optax.cegm(LR, num_heads=2, adapt_rate=0.5, **kw), True
  if name == "cegm_adamw":
    return cgf_optax.cegm_adamw(LR, num_heads=2, adapt_rate=0.5, **kw), True
  raise ValueError(name)


def batches() -> list[tuple[np.ndarray, np.ndarray]]:
  rng = np.random.default_rng(0)
  out = []
  for _ in range(STEPS):
    x = rng.integers(0, 256, size=(BATCH, SEQ + 1)).astype(np.int32)
    out.append((x[:, :-1], x[:, 1:]))
  return out


def loss_fn(graphdef, ctx: bool):
  def fn(params, x, y):
    model = nnx.merge(graphdef, params)
    if ctx:
      with capture_context(model) as c:
        logits = model(x)
      c = dict(c)
    else:
      logits, c = model(x), None
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, c
  return fn


def train_step(graphdef, tx, ctx: bool, keep: Any = None):
  lf = loss_fn(graphdef, ctx)

  def step(params, state, x, y):
    (loss, c), g = jax.value_and_grad(lf, has_aux=True)(params, x, y)
    extra = {"context": c, "value": loss} if ctx else {}
    u, state = tx.update(g, state, params, **extra)
    params = optax.apply_updates(params, u)
    if keep is not None:
      params, state = jax.lax.with_sharding_constraint((params, state), keep)
    return params, state, loss
  return jax.jit(step)


_REFS: dict[str, tuple[list[float], Any]] = {}
# (check, name) -> (losses, params) of the sharded runs, to compare them.
_RUNS: dict[tuple[str, str], tuple[list[float], Any]] = {}
_MODEL: list[Any] = []


def model() -> tuple[Any, Any]:
  """``(graphdef, params)`` of the test GPT on one device (built once)."""
  if not _MODEL:
    _MODEL.extend(nnx.split(GPT(gpt_config("tiny", **MODEL),
                                rngs=nnx.Rngs(0)), nnx.Param))
  return _MODEL[0], _MODEL[1]


def single_device(name: str) -> tuple[list[float], Any]:
  """Losses and final params of the one-device run (computed once)."""
  if name not in _REFS:
    _REFS[name] = _single_device(name)
  return _REFS[name]


def _single_device(name: str) -> tuple[list[float], Any]:
  tx, ctx = optimizer(name)
  graphdef, params = model()
  state = tx.init(params)
  step = train_step(graphdef, tx, ctx)
  losses = []
  for x, y in batches():
    params, state, loss = step(params, state, x, y)
    losses.append(float(loss))
  return losses, params


def _flat(tree: Any) -> np.ndarray:
  return np.concatenate([np.ravel(np.asarray(x, np.float64))
                         for x in jax.tree.leaves(tree)])


def compare(losses, params, ref_losses, ref_params) -> dict[str, float]:
  """Largest relative loss difference; the params' difference relative to
  their change over the run (the training's own scale), in L2 and max
  norms."""
  a, b, b0 = _flat(params), _flat(ref_params), _flat(model()[1])
  return {"loss_rel": max(abs(x - y) / abs(y)
                          for x, y in zip(losses, ref_losses, strict=True)),
          "param_rel": float(np.linalg.norm(a - b) / np.linalg.norm(b - b0)),
          "param_max_rel": float(np.max(np.abs(a - b))
                                 / np.max(np.abs(b - b0)))}


def _collective_sizes(hlo: str) -> list[int]:
  sizes = []
  pat = (r"= \(?([a-z0-9]+\[[0-9,]*\][^ ]*)\)? (all-gather|all-reduce|"
         r"reduce-scatter|all-to-all|collective-permute)")
  for shape, _ in re.findall(pat, hlo):
    dims = re.search(r"\[([0-9,]*)\]", shape).group(1)
    sizes.append(math.prod(int(d) for d in dims.split(",") if d))
  return sizes


def check_jit(names: list[str], hlo_names: tuple[str, ...] = ()
              ) -> dict[str, Any]:
  mesh = run_mesh("data=4,model=2")
  graphdef, params0 = init_partitioned(gpt_config("tiny", **MODEL), 0, mesh)
  out = {}
  for name in names:
    tx, ctx = optimizer(name)
    params = params0
    state = sharding.init_sharded(tx, params)
    keep = jax.tree.map(lambda a: a.sharding, (params, state))
    step = train_step(graphdef, tx, ctx, keep)
    losses = []
    for x, y in batches():
      x, y = sharding.shard_batch((x, y), mesh)
      params, state, loss = step(params, state, x, y)
      losses.append(float(loss))
    ref_losses, ref_params = single_device(name)
    res = compare(losses, params, ref_losses, ref_params)
    _RUNS["jit", name] = (losses, params)

    # The state's shardings: as derived from the params', kept by the step.
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    kept = [s.sharding for s in jax.tree.leaves(state)]
    derived = jax.tree.leaves(sharding.state_shardings(state, params))
    res["state_as_derived"] = all(
        a.is_equivalent_to(b, x.ndim) for a, b, x in
        zip(kept, derived, jax.tree.leaves(state), strict=True))
    res["state_on_mesh"] = all(isinstance(s, NamedSharding) and s.mesh == mesh
                               for s in kept)
    pshapes = {tuple(p.shape): sharding.spec_of(p)
               for p in jax.tree.leaves(params)}
    # Arrays shaped like a parameter are sharded like it (unique shapes).
    res["params_shaped_like_params"] = all(
        sharding.spec_of(x) == pshapes[tuple(x.shape)]
        for _, x in flat if tuple(x.shape) in pshapes and x.ndim >= 2)
    replicated = [x.size for _, x in flat
                  if all(a is None for a in sharding.spec_of(x))]
    res["largest_replicated"] = max(replicated, default=0)
    res["largest_param_axis"] = max(max(p.shape, default=1)
                                    for p in jax.tree.leaves(params))
    res["sharded_arrays"] = sum(1 for _, x in flat
                                if any(sharding.spec_of(x)))
    res["state_arrays"] = len(flat)
    bases = [sharding.spec_of(x) for path, x in flat
             if "basis" in jax.tree_util.keystr(path)]
    res["bases_sharded"] = (all(any(s) for s in bases) if bases else None)

    # The optimizer update alone: its collectives are all smaller than the
    # smallest matrix (no whole matrix or context is gathered).
    if name not in hlo_names:
      out[name] = res
      continue
    # The context arrives as the model's activations do: split on "data".
    lf = loss_fn(graphdef, ctx)
    c = (jax.jit(lambda p, x, y, lf=lf: lf(p, x, y)[1],
                 out_shardings=sharding.batch_sharding(mesh, 3))(params, x, y)
         if ctx else None)
    extra = {"context": c, "value": jnp.float32(1.0)} if ctx else {}
    upd = jax.jit(lambda g, s, p, e, tx=tx: tx.update(g, s, p, **e),
                  out_shardings=keep)
    hlo = upd.lower(params, state, params, extra).compile().as_text()
    sizes = _collective_sizes(hlo)
    res["largest_collective"] = max(sizes, default=0)
    res["smallest_matrix"] = min(p.size for p in jax.tree.leaves(params)
                                 if p.ndim >= 2)
    out[name] = res
  return out


def check_shard_map(names: list[str]) -> dict[str, Any]:
  mesh = sharding.make_mesh({"data": 8})
  out = {}
  for name in names:
    kw = {"axis_name": "data"} if name.startswith("cegm") else {}
    tx, ctx = optimizer(name, **kw)
    graphdef, params = model()
    lf = loss_fn(graphdef, ctx)

    def local_step(params, state, x, y, tx=tx, ctx=ctx, lf=lf):
      def global_loss(p):            # the gradient of the whole batch's loss
        loss, c = lf(p, x, y)
        return jax.lax.pmean(loss, "data"), (loss, c)
      (loss, (local_loss, c)), g = jax.value_and_grad(
          global_loss, has_aux=True)(params)
      # The CEGM transforms get this device's loss and tokens: their
      # axis_name reduces them over the batch.
      extra = {"context": c, "value": local_loss} if ctx else {}
      u, state = tx.update(g, state, params, **extra)
      return optax.apply_updates(params, u), state, loss

    step = jax.jit(jax.shard_map(
        local_step, mesh=mesh, in_specs=(P(), P(), P("data"), P("data")),
        out_specs=(P(), P(), P())))
    rep = NamedSharding(mesh, P())
    params = jax.device_put(params, rep)
    state = jax.device_put(tx.init(params), rep)
    losses = []
    for x, y in batches():
      x, y = sharding.shard_batch((x, y), mesh)
      params, state, loss = step(params, state, x, y)
      losses.append(float(loss))
    ref_losses, ref_params = single_device(name)
    out[name] = compare(losses, params, ref_losses, ref_params)
    _RUNS["shard_map", name] = (losses, params)
  return out


def check_batch_axes() -> dict[str, Any]:
  """entangle's loss and context_align's pooling over a batch split across
  devices inside shard_map: with ``axis_name`` every device gets the
  whole-batch result, without it each its own."""
  mesh = sharding.make_mesh({"data": 8})
  rng = np.random.default_rng(2)
  params = {"k": jnp.asarray(rng.standard_normal((8, 6)), jnp.float32)}
  steps = [({"k": jnp.asarray(rng.standard_normal((8, 6)), jnp.float32)},
            jnp.asarray(rng.standard_normal((64, 8)), jnp.float32),
            jnp.asarray(rng.uniform(1, 2, size=8), jnp.float32))
           for _ in range(STEPS)]
  out = {}
  for axis in ("data", None):
    tx = cgf_optax.cegm(0.1, num_heads=2, adapt_rate=0.5, axis_name=axis)
    ref_tx = cgf_optax.cegm(0.1, num_heads=2, adapt_rate=0.5)
    p, st = params, ref_tx.init(params)
    for g, c, losses in steps:
      u, st = ref_tx.update(g, st, p, context={"k": c}, value=jnp.mean(losses))
      p = optax.apply_updates(p, u)
    ref, ref_lam = p, float(st[0].lam)

    def local(p, st, g, c, loss, tx=tx):
      u, st = tx.update(g, st, p, context={"k": c}, value=loss[0])
      p = optax.apply_updates(p, u)
      return p, st, jax.tree.map(lambda a: a[None], p)

    # check_vma=False: without axis_name the devices' results differ (the
    # control), which a replicated out_spec would refuse.
    step = jax.jit(jax.shard_map(
        local, mesh=mesh, in_specs=(P(), P(), P(), P("data"), P("data")),
        out_specs=(P(), P(), P("data")), check_vma=False))
    p, st = params, tx.init(params)
    for g, c, losses in steps:
      p, st, per_device = step(p, st, g, c, losses)
    spread = float(jnp.max(jnp.abs(per_device["k"] - per_device["k"][0])))
    scale = float(jnp.max(jnp.abs(ref["k"] - params["k"])))
    out["with_axis" if axis else "without_axis"] = {
        "rel": float(jnp.max(jnp.abs(p["k"] - ref["k"]))) / scale,
        "device_spread": spread / scale,
        "lam_diff": abs(float(st[0].lam) - ref_lam)}
  return out


def check_fsdp() -> dict[str, Any]:
  """Norms over params split across devices inside shard_map."""
  mesh = sharding.make_mesh({"x": 8})
  specs = {"b": P(), "s": P(), "v": P(None, "x"), "w": P("x", None)}
  shapes = {"b": (8,), "s": (), "v": (8, 16), "w": (16, 8)}
  rng = np.random.default_rng(1)
  grads = [{k: jnp.asarray(rng.standard_normal(s), jnp.float32)
            for k, s in shapes.items()} for _ in range(STEPS)]
  params0 = {k: jnp.asarray(rng.standard_normal(s), jnp.float32)
             for k, s in shapes.items()}
  axes = sharding.split_axes(specs)
  txs = {
      "normalize-global": lambda a: cgf_optax.normalize("global", axis_name=a),
      "normalize-leaf": lambda a: cgf_optax.normalize("leaf", axis_name=a),
      "modulate-global": lambda a: cgf_optax.modulate_by_gradient_norm(
          axis_name=a),
      "modulate-leaf-ema": lambda a: cgf_optax.modulate_by_gradient_norm(
          "ema", scope="leaf", axis_name=a),
      "cgfm-temporal": lambda a: cgf_optax.cgfm(
          0.1, strategy="temporal", momentum=0.9, norm_axis_name=a),
      "cgfm_adamw-temporal": lambda a: cgf_optax.cgfm_adamw(
          0.1, strategy="temporal", norm_axis_name=a),
      "cegm": lambda a: cgf_optax.cegm(
          0.1, require_context=False, normalize_scope="global",
          norm_axis_name=a),
      "cegm_adamw": lambda a: cgf_optax.cegm_adamw(
          0.1, require_context=False, norm_axis_name=a),
      # The control: local norms of the blocks are not the norm.
      "normalize-global-no-axis": lambda a: cgf_optax.normalize("global"),
  }
  # The split-norm transforms also run with shard_map's replication check
  # off ("rel_unchecked"): with it on, a wrong reduction (a missing psum)
  # is stopped at trace time by the check, before any value is compared;
  # off, the run goes to the end and a wrong reduction fails on its value.
  unchecked = ("normalize-global", "normalize-leaf", "modulate-global",
               "modulate-leaf-ema")
  shard = {k: NamedSharding(mesh, s) for k, s in specs.items()}

  def sharded_rel(tx, ref, check_vma):
    p = jax.device_put(params0, shard)
    st = sharding.init_sharded(tx, p)
    st_specs = jax.tree.map(lambda s: s.spec,
                            jax.tree.map(lambda a: a.sharding, st))

    def local(p, st, g):
      u, st = tx.update(g, st, p, value=jnp.float32(1.0))
      return optax.apply_updates(p, u), st

    step = jax.jit(jax.shard_map(local, mesh=mesh,
                                 in_specs=(specs, st_specs, specs),
                                 out_specs=(specs, st_specs),
                                 check_vma=check_vma))
    for g in grads:
      p, st = step(p, st, jax.device_put(g, shard))
    # Replicated leaves: every device's copy is compared, not only one.
    diff = max(float(np.max(np.abs(np.asarray(s.data) - np.asarray(ref[k])[
        s.index]))) for k in ref for s in p[k].addressable_shards)
    scale = max(float(jnp.max(jnp.abs(ref[k] - params0[k]))) for k in ref)
    return diff / scale

  out = {}
  for name, make in txs.items():
    ref_tx, tx = make(None), make(axes)
    p, st = params0, ref_tx.init(params0)
    for g in grads:
      u, st = ref_tx.update(g, st, p, value=jnp.float32(1.0))
      p = optax.apply_updates(p, u)
    ref = p
    out[name] = {}
    # (The control's replicated leaves differ across devices, which a
    # replicated out_spec refuses unless unchecked.)
    try:
      out[name]["rel"] = sharded_rel(tx, ref, not name.endswith("no-axis"))
    except Exception as e:  # noqa: BLE001 - reported, then asserted on
      out[name]["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    if name in unchecked:
      out[name]["rel_unchecked"] = sharded_rel(tx, ref, False)
  return out


def check_cli(tmp: str) -> dict[str, Any]:
  """``cgf-optax train --mesh data=4,model=2``, stopped and resumed, against
  the unsharded run; the checkpoint restores sharded."""
  import tempfile

  from cgf_optax.train import RunCheckpointer, TrainConfig, build_optimizer, cli, loop
  from cgf_optax.train.config import parse_optimizer_spec

  # Identical programs (the resumed run's) load from this cache.
  jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(dir=tmp))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  spec = "cgfm_adamw:rank=2,num_scales=3"
  base = ["train", "--optimizer", spec, "--d-model", "64", "--num-layers",
          "1", "--num-heads", "2", "--seq-len", "16", "--batch-size", "8",
          "--steps", "4", "--eval-every", "4", "--eval-batches", "1",
          "--telemetry-every", "0", "--checkpoint-every", "2",
          "--no-progress"]
  one, sharded = f"{tmp}/one", f"{tmp}/sharded"
  mesh = ["--mesh", "data=4,model=2"]
  assert cli.main([*base, "--out", one]) == 0
  assert cli.main([*base, *mesh, "--out", sharded, "--stop-after", "2"]) == 0
  assert cli.main([*base, *mesh, "--out", sharded, "--resume"]) == 0

  def losses(d):
    with open(f"{d}/metrics.jsonl") as f:
      return [json.loads(line)["loss"] for line in f]
  a, b = losses(one), losses(sharded)
  res = {"steps": [len(a), len(b)],
         "loss_rel": max(abs(x - y) / abs(x) for x, y in zip(a, b,
                                                             strict=True))}
  with open(f"{sharded}/results.json") as f:
    res["mesh"] = json.load(f)["mesh"]

  cfg = TrainConfig(optimizers=(spec,), d_model=64, num_layers=1,
                    num_heads=2, seq_len=16, batch_size=8, steps=4,
                    mesh="data=4,model=2")
  _, params = loop.init_model(cfg)
  target = {"params": params, "opt_state": sharding.init_sharded(
      build_optimizer(parse_optimizer_spec(spec), cfg), params)}
  ckpt = RunCheckpointer(f"{sharded}/checkpoints", 2, 2)
  step, state, _ = ckpt.restore(target, {})
  ckpt.close()
  res["restored_step"] = step
  res["restored_sharded_like_target"] = all(
      a.sharding.is_equivalent_to(b.sharding, a.ndim) for a, b in zip(
          jax.tree.leaves(state), jax.tree.leaves(target), strict=True))
  res["restored_sharded_arrays"] = sum(
      1 for x in jax.tree.leaves(state) if any(sharding.spec_of(x)))
  return res


def main(argv: list[str]) -> None:
  assert jax.device_count() == 8, jax.devices()
  check, names = argv[0], argv[1:]
  if check == "gpt":      # jit and shard_map against one device
    adaptive = tuple(n for n in names if n in ("cgfm_adamw", "cegm_adamw"))
    res = {"jit": check_jit(names, adaptive),
           "shard_map": check_shard_map(names)}
    res["shard_map_vs_jit"] = {
        n: compare(*_RUNS["shard_map", n], *_RUNS["jit", n]) for n in names}
  elif check == "jit":
    res = check_jit(names, tuple(names))
  elif check == "shard_map":
    res = check_shard_map(names)
  elif check == "collectives":
    res = {"fsdp": check_fsdp(), "batch_axes": check_batch_axes()}
  elif check == "cli":
    res = check_cli(names[0])
  else:
    raise SystemExit(f"unknown check {check!r}")
  print("RESULTS=" + json.dumps(res))


if __name__ == "__main__":
  main(sys.argv[1:])
