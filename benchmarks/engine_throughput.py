"""``cgf-optax compare`` against ``benchmarks/lm_throughput.py`` on the same
model, batch and optimizers: does the training loop reach its own step's
speed?

For each size, one after the other on the same device:

1. ``cgf-optax compare`` (the user's command: data feed, metrics every step,
   evaluation at the end only, no checkpoints, no telemetry) trains each
   optimizer ``--cli-steps`` steps; its ``results.json`` gives tokens/s
   (first fetched step to last, so compilation is not in it);
2. ``lm_throughput.py`` times the same optimizers' step on device-resident
   random tokens (its pipelined tokens/s).

The JSON (``--out``; default ``benchmarks/results/engine_throughput-<device>
.json``) has, per size and optimizer, both numbers and their ratio, the two
commands and the device. Target: ratio ≥ 0.9.

Usage::

  python benchmarks/engine_throughput.py                       # GPU sizes
  python benchmarks/engine_throughput.py --sizes cpu-smoke     # a CPU check
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))
from benchmarks._results import write_json  # noqa: E402

# name -> (CLI model flags, lm_throughput model flags, batch, seq)
SIZES: dict[str, tuple[list[str], list[str], int, int]] = {
    "85m": (["--model", "125m"], ["--preset", "125m"], 32, 1024),
    "25m": (["--model", "125m", "--d-model", "512", "--num-layers", "8",
             "--num-heads", "8"],
            ["--preset", "125m", "--d-model", "512", "--num-layers", "8",
             "--num-heads", "8"], 64, 512),
    "cpu-smoke": (["--model", "tiny"], ["--preset", "tiny"], 4, 64),
}
OPTIMIZERS = ("adamw", "cgfm_adamw", "cegm_adamw:adapt_rate=0.1,num_heads=4")


def _run(cmd: list[str]) -> float:
  print("$", " ".join(cmd), flush=True)
  t0 = time.perf_counter()
  r = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True,
                     env={**os.environ, "PYTHONPATH": os.pathsep.join(
                         filter(None, [str(ROOT),
                                       os.environ.get("PYTHONPATH")]))})
  if r.returncode:
    sys.stderr.write(r.stdout[-4000:] + r.stderr[-4000:])
    raise SystemExit(f"command failed ({r.returncode}): {' '.join(cmd)}")
  return time.perf_counter() - t0


def arm_of(spec: str) -> str:
  """An optimizer spec as an lm_throughput arm (same options)."""
  return spec


def measure(size: str, args: argparse.Namespace, work: Path
            ) -> dict[str, Any]:
  cli_model, bench_model, batch, seq = SIZES[size]
  out = work / size
  cli = [
      sys.executable, "-m", "cgf_optax.train.cli", "compare",
      "--optimizers", *args.optimizers, *cli_model,
      "--seq-len", str(seq), "--batch-size", str(batch),
      "--steps", str(args.cli_steps), "--eval-every", str(args.cli_steps),
      "--eval-batches", "1", "--telemetry-every", "0",
      "--checkpoint-every", "0", "--data", args.data, "--no-progress",
      "--out", str(out)]
  cli_s = _run(cli)
  res = json.loads((out / "results.json").read_text())
  bench_json = work / f"lm_throughput-{size}.json"
  bench = [sys.executable, "benchmarks/lm_throughput.py", *bench_model,
           "--vocab", "256", "--batch", str(batch), "--seq", str(seq),
           "--steps", str(args.bench_steps), "--warmup", "5",
           "--schedule-steps", str(args.cli_steps),
           "--arms", *[arm_of(o) for o in args.optimizers],
           "--out", str(bench_json)]
  bench_s = _run(bench)
  rows = json.loads(bench_json.read_text())["results"]
  by_arm = {r["arm"]: r for r in rows}
  table = []
  for spec, r in zip(args.optimizers, res["results"], strict=True):
    b = by_arm[arm_of(spec)]
    slug = "".join(c if c.isalnum() or c in "._-" else "_" for c in r["label"])
    times = [json.loads(x)["time"] for x in
             (out / slug / "metrics.jsonl").read_text().splitlines()]
    gaps = np.diff(times)
    table.append({"optimizer": spec, "cli_tokens_per_s": r["tokens_per_s"],
                  "bench_tokens_per_s": b["tokens_per_s"],
                  "ratio": r["tokens_per_s"] / b["tokens_per_s"],
                  "bench_mfu": b["mfu"], "cli_final_val_bits":
                  r["final_val_bits"],
                  "cli_median_step_s": float(np.median(gaps)),
                  "cli_first_steps_s": [float(g) for g in gaps[:8]],
                  "bench_median_step_s": b["median_step_s"],
                  "bench_pipelined_step_s": b["pipelined_step_s"]})
  return {"size": size, "n_params": res["n_params"], "batch": batch,
          "seq": seq, "cli_command": " ".join(cli[1:]),
          "bench_command": " ".join(bench[1:]), "cli_wall_s": cli_s,
          "bench_wall_s": bench_s, "rows": table}


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--sizes", nargs="+", default=["85m", "25m"],
                 choices=tuple(SIZES))
  p.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS))
  p.add_argument("--cli-steps", type=int, default=200)
  p.add_argument("--bench-steps", type=int, default=50)
  p.add_argument("--data", default="python")
  p.add_argument("--out")
  args = p.parse_args(argv)
  import jax
  device = jax.devices()[0].device_kind
  with tempfile.TemporaryDirectory() as d:
    sizes = [measure(s, args, Path(d)) for s in args.sizes]
  for s in sizes:
    for r in s["rows"]:
      print(f"{s['size']:>9} {r['optimizer']:>40}  cli {r['cli_tokens_per_s']:>12,.0f}"
            f"  bench {r['bench_tokens_per_s']:>12,.0f}  ratio {r['ratio']:.3f}")
  result = {"command": " ".join([Path(sys.argv[0]).name, *(argv or
                                                            sys.argv[1:])]),
            "device": device, "jax": jax.__version__, "sizes": sizes,
            "target": "cli / bench tokens/s >= 0.9"}
  out = args.out or str(ROOT / "benchmarks" / "results" /
                        f"engine_throughput-{device.replace(' ', '_')}.json")
  write_json(result, out)
  print(f"wrote {out}")
  return result


if __name__ == "__main__":
  main()
