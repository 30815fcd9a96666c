"""The λ rule, paired (issue 18, item 4): `cegm_adamw` with
``loss_signal="relative"`` against ``"log_ratio"``, same seeds, same lr.

The quality harness's ``main`` experiment tunes each arm on its own, so two
arms may be compared at different learning rates; here both rules run at
each learning rate of a grid, seed for seed (same initialisation, same
batches), and the per-seed differences of the final test loss
(bits/byte) get a t interval::

  python benchmarks/quality/lambda_rule.py --preset reduced --lrs 0.003 0.009 \\
      --seeds 0 1 2 3 4 --out benchmarks/results/quality/lambda-rule-cpu.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from benchmarks.quality.arms import ARMS  # noqa: E402
from benchmarks.quality.experiments import PRESETS, run_one  # noqa: E402
from benchmarks.quality.harness import shakespeare_data, t_interval  # noqa: E402

RULES = {"relative": "cegm_adamw_relative", "log_ratio": "cegm_adamw"}


def main(argv: list[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--preset", choices=sorted(PRESETS), default="reduced")
  p.add_argument("--lrs", type=float, nargs="+", default=[0.003, 0.009])
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
  p.add_argument("--out", type=Path, default=None)
  args = p.parse_args(argv)
  setup = PRESETS[args.preset].setup
  data = shakespeare_data()
  res = {"command": "python benchmarks/quality/lambda_rule.py " + shlex.join(
      sys.argv[1:] if argv is None else argv), "preset": args.preset,
         "setup": str(setup), "by_lr": {}}
  for lr in args.lrs:
    finals = {rule: [run_one(ARMS[arm], setup, data, lr, s).final["test"]
                     for s in args.seeds] for rule, arm in RULES.items()}
    diff = [b - a for a, b in zip(finals["relative"], finals["log_ratio"],
                                  strict=True)]
    t = t_interval(diff)
    mean, half = t["mean"], t["ci"]
    res["by_lr"][str(lr)] = {
        "test": finals, "log_ratio_minus_relative": diff,
        "mean_diff": mean, "ci95": half,
        "log_ratio_better": sum(d < 0 for d in diff)}
    print(f"lr={lr}: log_ratio - relative = {mean:+.4f} ± {half:.4f} "
          f"bits/byte (95% t, n={len(diff)}); log_ratio lower in "
          f"{sum(d < 0 for d in diff)}/{len(diff)}", flush=True)
  if args.out:
    args.out.write_text(json.dumps(res, indent=1))
  return res


if __name__ == "__main__":
  main()
