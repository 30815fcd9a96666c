"""What checkpoint checksums cost: save and restore with and without them.

A training state of ``--params`` fp32 parameters in GPT shapes plus AdamW's
two moments (``optax.adamw``'s state, random values: trained weights do not
compress) is saved and restored by :class:`cgf_optax.train.checkpoint.
RunCheckpointer` with ``checksums=True`` (CRC-32 of every file recorded at
commit, verified on restore) and ``checksums=False``, alternating, ``--rounds``
times each. Save time runs from ``save`` to the end of ``wait`` (the whole
asynchronous write, commit included); restore time is ``restore`` until the
arrays are ready. The ratios with/without are what count; on a busy machine
they are noisy, so the time of the checksum pass alone (``write_checksums``
over the committed folder, page cache warm) is reported beside them::

  python benchmarks/checkpoint_overhead.py --params 300e6 --rounds 3

Writes ``benchmarks/results/checkpoint_overhead-<device>.json``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from benchmarks._results import sanitize, write_json  # noqa: E402
from cgf_optax.train.checkpoint import (  # noqa: E402
    RunCheckpointer,
    write_checksums,
)


def make_params(n: float, d: int, seed: int = 0) -> dict[str, jax.Array]:
  """Blocks of a GPT of width ``d`` (qkv, out, up, down) until ``n``
  parameters, random normal fp32."""
  shapes, total = {}, 0
  while total < n:
    i = len(shapes) // 4
    for name, shape in (("qkv", (d, 3 * d)), ("o", (d, d)),
                        ("up", (d, 4 * d)), ("down", (4 * d, d))):
      shapes[f"block{i}/{name}"] = shape
      total += shape[0] * shape[1]
  keys = jax.random.split(jax.random.key(seed), len(shapes))
  return {k: jax.random.normal(key, s, jnp.float32)
          for key, (k, s) in zip(keys, shapes.items(), strict=True)}


def _time_save_restore(state, directory: Path, checksums: bool
                       ) -> tuple[float, float, float]:
  """Seconds to save (until committed), to restore, and to checksum the
  saved folder alone."""
  shutil.rmtree(directory, ignore_errors=True)
  ck = RunCheckpointer(directory, every=1, keep=1, checksums=checksums)
  t0 = time.perf_counter()
  ck.save(1, state, {"run": "bench"})
  ck.wait()
  save = time.perf_counter() - t0
  t0 = time.perf_counter()
  _, restored, _ = ck.restore(state, {"run": "bench"})
  jax.block_until_ready(restored)
  restore = time.perf_counter() - t0
  ck.close()
  t0 = time.perf_counter()
  write_checksums(directory / "1")
  return save, restore, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--params", type=float, default=300e6)
  p.add_argument("--d-model", type=int, default=1024)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--dir", default="", help="where to write (default: a "
                 "temporary folder)")
  p.add_argument("--out", default="")
  args = p.parse_args(argv)

  params = make_params(args.params, args.d_model)
  n = sum(x.size for x in params.values())
  opt_state = optax.adamw(1e-3).init(params)
  state = {"params": params,
           "opt_state": jax.tree.map(lambda x: x + 0.5, opt_state)}
  nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
  base = Path(args.dir or tempfile.mkdtemp(prefix="ckpt_bench_"))
  times: dict[bool, list[tuple[float, float, float]]] = {True: [],
                                                         False: []}
  _time_save_restore(state, base / "warmup", True)      # compile, page cache
  for r in range(args.rounds):
    for checksums in ((True, False) if r % 2 == 0 else (False, True)):
      times[checksums].append(
          _time_save_restore(state, base / f"c{int(checksums)}", checksums))
      print(f"round {r} checksums={checksums}: save "
            f"{times[checksums][-1][0]:.2f} s, restore "
            f"{times[checksums][-1][1]:.2f} s", flush=True)
  shutil.rmtree(base, ignore_errors=True)

  def med(flag: bool, i: int) -> float:
    return statistics.median(t[i] for t in times[flag])

  dev = jax.devices()[0]
  result = {
      "command": ["python", "benchmarks/checkpoint_overhead.py",
                  *(sys.argv[1:] if argv is None else argv)],
      "device": {"kind": dev.device_kind, "platform": dev.platform,
                 "host_cpus": os.cpu_count()},
      "directory_filesystem_note": "local disk of the machine that ran it",
      "jax": jax.__version__,
      "params": n, "state_bytes": nbytes, "rounds": args.rounds,
      "save_s": {"checksums": med(True, 0), "without": med(False, 0)},
      "restore_s": {"checksums": med(True, 1), "without": med(False, 1)},
      "checksum_pass_s": med(False, 2),
      "checksum_pass_over_save": med(False, 2) / med(False, 0),
      "save_ratio": med(True, 0) / med(False, 0),
      "restore_ratio": med(True, 1) / med(False, 1),
      "all_times_s": {"checksums": times[True], "without": times[False]},
  }
  print(f"{n / 1e6:.0f}M params, {nbytes / 2**30:.2f} GiB: save ×"
        f"{result['save_ratio']:.3f}, restore ×{result['restore_ratio']:.3f}; "
        f"the checksum pass alone {result['checksum_pass_s']:.2f} s "
        f"({result['checksum_pass_over_save']:.1%} of a save without)")
  out = args.out or (ROOT / "benchmarks" / "results" /
                     f"checkpoint_overhead-{sanitize(dev.device_kind)}.json")
  print(f"wrote {write_json(result, out)}")
  return result


if __name__ == "__main__":
  main()
