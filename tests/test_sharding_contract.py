"""Sharding (/work/shared/OPTAX-CONTRACT.md item 10), as Optax's
`optax/_src/sharding_test.py` checks it.

It needs 8 virtual CPU devices, which XLA only creates if
`XLA_FLAGS=--xla_force_host_platform_device_count=8` is set before JAX starts;
other test files have started JAX already, so the checks run in one
subprocess (all aliases in it) and report back as JSON.
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

REPO = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent('''
    import json
    import traceback

    import jax
    import jax.numpy as jnp

    import cgf_optax

    assert jax.device_count() == 8, jax.devices()
    mesh = jax.make_mesh((8,), ("x",),
                         axis_types=(jax.sharding.AxisType.Explicit,))
    sharding = jax.sharding.NamedSharding(mesh, jax.P(None, "x"))
    # Optax's leaf (a stack of 2 matrices 8x4, sharded on the fan-in axis)
    # and a kernel 4x16 sharded on its fan-out axis.
    SHAPES = {"stack": (2, 8, 4), "kernel": (4, 16)}
    DTYPE = jnp.float16  # as Optax's test

    def types(tree):
      return jax.tree.map(lambda x: str(jax.typeof(x)), tree)

    def check(opt):
      out = {}

      def run(name, fn):
        try:
          fn()
          out[name] = "ok"
        except Exception as e:  # noqa: BLE001
          out[name] = (f"{type(e).__name__}: {e}".splitlines()[0][:400]
                       + " | at " + " <- ".join(
                           f"{f.name}:{f.lineno}" for f in reversed(
                               traceback.extract_tb(e.__traceback__)[-4:])))

      with jax.set_mesh(mesh):
        params = {k: jnp.ones(s, DTYPE, out_sharding=sharding)
                  for k, s in SHAPES.items()}
        abstract = {k: jax.ShapeDtypeStruct(s, DTYPE, sharding=sharding)
                    for k, s in SHAPES.items()}

        def init_abstract():
          assert opt.init(abstract) is not None
          jax.eval_shape(opt.init, abstract)

        def init_jit():
          t0, t1 = types(opt.init(params)), types(jax.jit(opt.init)(params))
          assert t0 == t1, (t0, t1)

        def update_eager():
          state0 = opt.init(params)
          _, state1 = opt.update(params, state0, params)
          t0, t1 = types(state0), types(state1)
          assert t0 == t1, (t0, t1)

        def update_jit():
          state0 = opt.init(params)
          _, state1 = jax.jit(opt.update)(params, state0, params)
          t0, t1 = types(state0), types(state1)
          assert t0 == t1, (t0, t1)

        for name, fn in [("init_abstract", init_abstract),
                         ("init_jit", init_jit),
                         ("update_eager", update_eager),
                         ("update_jit", update_jit)]:
          run(name, fn)
      return out

    results = {}
    for strategy in ("lowrank", "temporal", "mean"):
      results[f"cgfm-{strategy}"] = check(
          cgf_optax.cgfm(1.0, strategy=strategy, rank=2))
      results[f"cgfm_adamw-{strategy}"] = check(
          cgf_optax.cgfm_adamw(1.0, strategy=strategy, rank=2))
    for scope in ("leaf", "global"):
      results[f"cegm-{scope}"] = check(cgf_optax.cegm(
          1.0, require_context=False, normalize_scope=scope))
    results["cegm_adamw"] = check(
        cgf_optax.cegm_adamw(1.0, require_context=False))
    print("RESULTS=" + json.dumps(results))
''')


def test_state_sharding_is_preserved_on_8_cpu_devices():
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "")
                      + " --xla_force_host_platform_device_count=8").strip()
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(
      [str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                     if p])
  proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=600,
                        check=False)
  lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS=")]
  assert proc.returncode == 0 and lines, (
      f"subprocess failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}")
  results = json.loads(lines[-1][len("RESULTS="):])
  assert len(results) == 9
  failures = [f"{alias} {check}: {msg}"
              for alias, checks in results.items()
              for check, msg in checks.items() if msg != "ok"]
  assert not failures, "\n".join(failures)
