"""The quality benchmark: AdamW vs Muon vs CGFM vs CEGM, tuned equally.

One command runs the whole protocol and writes JSON and PNG plots under
``benchmarks/results/quality/<preset>/``, and ``summary.md`` (the tables)::

  python benchmarks/quality/run.py --preset reduced      # ~30 min, 2-core CPU
  python benchmarks/quality/run.py --preset full         # hours
  python benchmarks/quality/run.py --preset reduced --only noise
  python benchmarks/quality/run.py --preset reduced --arms cgfm_flow_only

``--arms`` runs only those arms of ``main`` (sweep and seeds, as always) and
merges them into the existing ``main.json``; the other arms are not re-run.

Experiments (``--only``, in the order they run): ``main`` (equal
learning-rate sweep, seeds, steps and wall-clock to AdamW's loss, gradient
variability), ``memory``, ``context``, ``init``, ``noise``, ``domains``.
The table experiments reuse the best learning rates from ``main.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from benchmarks.quality.arms import ARMS  # noqa: E402
from benchmarks.quality.experiments import EXPERIMENTS, PRESETS, log  # noqa: E402
from benchmarks.quality.report import summarize  # noqa: E402


def parse(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--preset", choices=sorted(PRESETS), default="reduced")
  p.add_argument("--only", nargs="+", choices=list(EXPERIMENTS),
                 help="run only these experiments")
  p.add_argument("--arms", nargs="+", choices=list(ARMS),
                 help="run only these arms of 'main' and merge them into "
                      "the existing main.json")
  p.add_argument("--out", type=Path, default=None,
                 help="output folder (default benchmarks/results/quality/"
                      "<preset>)")
  args = p.parse_args(argv)
  if args.arms and args.only not in (None, ["main"]):
    p.error("--arms applies to the 'main' experiment only; drop --only or "
            "use --only main")
  return args


def run(argv: list[str] | None = None) -> dict[str, dict]:
  args = parse(argv)
  preset = PRESETS[args.preset]
  out = args.out or ROOT / "benchmarks" / "results" / "quality" / preset.name
  command = "python benchmarks/quality/run.py " + shlex.join(
      sys.argv[1:] if argv is None else argv)
  results = {}
  t0 = time.perf_counter()
  names = ["main"] if args.arms else args.only or list(EXPERIMENTS)
  for name in names:
    t = time.perf_counter()
    log(f"== {name} ({preset.name})")
    if args.arms:
      results[name] = EXPERIMENTS[name](
          dataclasses.replace(preset, arms=tuple(args.arms)), out, command,
          merge=True)
    else:
      results[name] = EXPERIMENTS[name](preset, out, command)
    log(f"== {name} done in {time.perf_counter() - t:.0f}s")
  summarize(out)
  log(f"all done in {time.perf_counter() - t0:.0f}s; results in {out}")
  return results


if __name__ == "__main__":
  run()
