"""What checkpoint checksums cost: save and restore with and without them.

A training state of ``--params`` fp32 parameters in GPT shapes plus AdamW's
two moments (``optax.adamw``'s state, random values: trained weights do not
compress) is saved and restored by :class:`cgf_optax.train.checkpoint.
RunCheckpointer` with ``checksums=True`` (CRC-32C of every file recorded at
commit, verified on restore) and ``checksums=False``, alternating, ``--rounds``
times each. Save time runs from ``save`` to the end of ``wait`` (the whole
asynchronous write, commit included). Restore time is ``restore`` until the
arrays are ready, measured after all saves, from the last save of each kind.
The ratios of the medians with/without are what count, but a save's time
varies by 2x from round to round with the disk's write-back, so the time
spent hashing is reported beside them: in each save (the hook after the
files are written, before the commit rename) over the median save without,
and in each restore (before Orbax reads) over the median restore without.
These are the direct measures of what checksums add::

  python benchmarks/checkpoint_overhead.py --params 300e6 --rounds 7

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
from typing import Any

import jax
import jax.numpy as jnp
import optax

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from benchmarks._results import sanitize, write_json  # noqa: E402
from cgf_optax.train import checkpoint  # noqa: E402


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


class _Timed:
  """Replaces ``checkpoint.<name>`` by a wrapper that records the seconds of
  each call: the checksum pass of a save (``write_checksums``, Orbax's
  post-finalization hook) and of a restore (``_checksum_problem``), the
  only steps checksums add to either's critical path."""

  def __init__(self, name: str):
    self.seconds: list[float] = []
    self._inner = getattr(checkpoint, name)
    setattr(checkpoint, name, self)

  def __call__(self, root: Path) -> Any:
    t0 = time.perf_counter()
    try:
      return self._inner(root)
    finally:
      self.seconds.append(time.perf_counter() - t0)


def _time_save(state, directory: Path, checksums: bool, hook: _Timed
               ) -> tuple[float, float]:
  """Seconds to save into a fresh ``directory`` (until committed), and the
  seconds spent in the checksum hook during it (0 without checksums)."""
  shutil.rmtree(directory, ignore_errors=True)
  ck = checkpoint.RunCheckpointer(directory, every=1, keep=1,
                                  checksums=checksums)
  os.sync()                 # earlier rounds' dirty pages written back first
  before = len(hook.seconds)
  t0 = time.perf_counter()
  ck.save(1, state, {"run": "bench"})
  ck.wait()
  save = time.perf_counter() - t0
  ck.close()
  return save, sum(hook.seconds[before:])


def _time_restore(state, directory: Path, checksums: bool) -> float:
  """Seconds to restore the checkpoint in ``directory`` until the arrays
  are ready (verifying its checksums if ``checksums``)."""
  ck = checkpoint.RunCheckpointer(directory, every=1, keep=1,
                                  checksums=checksums)
  t0 = time.perf_counter()
  _, restored, _ = ck.restore(state, {"run": "bench"})
  jax.block_until_ready(restored)
  seconds = time.perf_counter() - t0
  ck.close()
  return seconds


def _alternating(rounds: int):
  """``(round, checksums)`` with the order swapped every round."""
  for r in range(rounds):
    for checksums in ((True, False) if r % 2 == 0 else (False, True)):
      yield r, checksums


def main(argv: list[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--params", type=float, default=300e6)
  p.add_argument("--d-model", type=int, default=1024)
  p.add_argument("--rounds", type=int, default=5)
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
  hook, verify = _Timed("write_checksums"), _Timed("_checksum_problem")
  folder = {c: base / f"c{int(c)}" for c in (True, False)}
  _time_save(state, folder[True], True, hook)     # compile, page cache
  saves: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
  for r, checksums in _alternating(args.rounds):
    saves[checksums].append(_time_save(state, folder[checksums], checksums,
                                       hook))
    print(f"round {r} checksums={checksums}: save "
          f"{saves[checksums][-1][0]:.2f} s", flush=True)
  # Restores of the last save with checksums, verified or not (the same
  # files: two folders differ by more than their checksums), apart from
  # the saves' write-back.
  os.sync()
  restores: dict[bool, list[float]] = {True: [], False: []}
  for r, checksums in _alternating(args.rounds):
    restores[checksums].append(_time_restore(state, folder[True],
                                             checksums))
    print(f"round {r} checksums={checksums}: restore "
          f"{restores[checksums][-1]:.2f} s", flush=True)
  shutil.rmtree(base, ignore_errors=True)
  med = statistics.median
  save = {c: med(t[0] for t in saves[c]) for c in (True, False)}
  restore = {c: med(restores[c]) for c in (True, False)}
  in_hook = med(t[1] for t in saves[True])

  dev = jax.devices()[0]
  result = {
      "command": ["python", "benchmarks/checkpoint_overhead.py",
                  *(sys.argv[1:] if argv is None else argv)],
      "device": {"kind": dev.device_kind, "platform": dev.platform,
                 "host_cpus": os.cpu_count()},
      "directory_filesystem_note": "local disk of the machine that ran it",
      "jax": jax.__version__,
      "params": n, "state_bytes": nbytes, "rounds": args.rounds,
      "save_s": {"checksums": save[True], "without": save[False]},
      "restore_s": {"checksums": restore[True], "without": restore[False]},
      "checksum_in_save_s": in_hook,
      "checksum_in_save_over_save": in_hook / save[False],
      "checksum_in_restore_s": med(verify.seconds),
      "checksum_in_restore_over_restore": med(verify.seconds) / restore[False],
      "save_ratio": save[True] / save[False],
      "restore_ratio": restore[True] / restore[False],
      "all_times_s": {"save_and_hook": {"checksums": saves[True],
                                        "without": saves[False]},
                      "restore": {"checksums": restores[True],
                                  "without": restores[False]}},
  }
  print(f"{n / 1e6:.0f}M params, {nbytes / 2**30:.2f} GiB: save ×"
        f"{result['save_ratio']:.3f}, restore ×{result['restore_ratio']:.3f}; "
        f"the checksum hook in a save {result['checksum_in_save_s']:.2f} s "
        f"({result['checksum_in_save_over_save']:.1%} of a save without), in "
        f"a restore {result['checksum_in_restore_s']:.2f} s "
        f"({result['checksum_in_restore_over_restore']:.1%})")
  out = args.out or (ROOT / "benchmarks" / "results" /
                     f"checkpoint_overhead-{sanitize(dev.device_kind)}.json")
  print(f"wrote {write_json(result, out)}")
  return result


if __name__ == "__main__":
  main()
