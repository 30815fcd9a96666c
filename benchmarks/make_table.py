"""Markdown tables of the GPU benchmark results, for README.md.

Reads ``benchmarks/results/lm_throughput-*.json`` (one table per file, by
model size), the training loop's own speed against it
(``engine_throughput-h200.json``) and the 1B ``step_overhead``
re-measurements (CEGM after the pooling change; ``cgfm_adamw/lowrank`` with
and without ``stagger``, fp32 and bf16), and prints them as markdown. With
``--write`` it replaces the blocks between ``<!-- NAME:start -->`` and
``<!-- NAME:end -->`` in README.md (``NAME`` = ``lm_throughput``,
``engine_throughput``, ``step_overhead_1b``) and leaves the rest of the file
alone.

Usage::

  python benchmarks/make_table.py            # print
  python benchmarks/make_table.py --write    # update README.md
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
README = os.path.join(os.path.dirname(HERE), "README.md")
GiB = 1 << 30

# The 1B step_overhead runs of the table, in order: (file, label).
STEP_OVERHEAD_1B = (
    ("step_overhead-h200-1b-float32.json",
     "H200, fp32, context 8192 tokens, every alias"),
    ("step_overhead-h100-1b-float32-cegm.json", "fp32, context 8192 tokens"),
    ("step_overhead-h100-1b-float32-lowrank.json", "fp32"),
    ("step_overhead-h100-1b-float32-lowrank-stagger.json", "fp32, `stagger`"),
    ("step_overhead-h100-1b-bfloat16-lowrank.json", "bf16"),
    ("step_overhead-h100-1b-bfloat16-lowrank-stagger.json", "bf16, `stagger`"),
)


def load(path: str) -> dict[str, Any]:
  with open(path) as f:
    return json.load(f)

# ``cgf-optax compare`` against ``lm_throughput.py`` on the same model.
ENGINE = "engine_throughput-h200.json"


def lm_files() -> list[str]:
  """The main run of each size (``lm_throughput-<device>-<size>.json``),
  not the variants that carry a suffix."""
  files = sorted(f for f in glob.glob(os.path.join(RESULTS,
                                                   "lm_throughput-*.json"))
                 if re.fullmatch(r"lm_throughput-[^-]+-\d+[mb]\.json",
                                 os.path.basename(f)))
  return sorted(files, key=lambda f: load(f)["model"]["params"])


def lm_table(path: str) -> str:
  d = load(path)
  m, a = d["model"], d["args"]
  name = os.path.basename(path)
  iso = d["timing"]["isolate"]
  head = (f"**GPT {a['preset']}**: {m['params'] / 1e6:,.0f}M parameters "
          f"({m['num_layers']} × {m['d_model']}, vocabulary {m['vocab_size']}"
          f"), batch {a['batch']} × {a['seq']} tokens, {m['dtype']} compute, "
          f"{m['param_dtype']} parameters and states, attention "
          f"{m['attention_impl'] or 'default'}, "
          f"{'remat' if m['remat'] else 'no remat'}; {d['device']['kind']}, "
          f"jax {d['versions']['jax']}; MFU against "
          f"{d['peak_flops'] / 1e12:g} TFLOP/s ([`{name}`]"
          f"(benchmarks/results/{name})).")
  cols = ["optimizer", "tokens/s", "MFU", "× adamw", "step ms (median / worst)",
          "state GiB", "peak GiB" if iso else "planned peak GiB"]
  lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  for r in d["results"]:
    if iso:
      peak = r["memory"]["peak_bytes_in_use"]
    else:
      peak = r["memory_plan"]["planned_peak_bytes"]
    ratio = "-" if r.get("vs_adamw") is None else f"{r['vs_adamw']:.3f}"
    if r["optimizer"] == "adamw":
      ratio = "1"
    lines.append(
        f"| {r['arm']} | {r['tokens_per_s']:,.0f} | {100 * r['mfu']:.1f}% | "
        f"{ratio} | {1e3 * r['median_step_s']:.1f} / "
        f"{1e3 * r['worst_step_s']:.1f} | {r['state_bytes'] / GiB:.2f} | "
        f"{peak / GiB:.1f} |")
  for f in d.get("failed") or []:
    lines.append(f"| {f['arm']} | failed (exit {f['returncode']}) | | | | | |")
  return "\n".join(lines)


def lm_block() -> str:
  return "\n\n".join(lm_table(f) for f in lm_files())


def engine_block() -> str:
  d = load(os.path.join(RESULTS, ENGINE))
  cols = ["model", "batch × seq", "optimizer", "`cgf-optax compare` tokens/s",
          "`lm_throughput.py` tokens/s", "ratio"]
  lines = [f"{d['device']}, jax {d['jax']}, bf16, cuDNN attention, byte "
           f"vocabulary; `python benchmarks/{d['command']}` "
           f"([`{ENGINE}`](benchmarks/results/{ENGINE})).", "",
           "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  for size in d["sizes"]:
    for r in size["rows"]:
      lines.append(
          f"| {size['n_params'] / 1e6:.1f}M | {size['batch']} × {size['seq']}"
          f" | {r['optimizer'].split(':')[0]} | {r['cli_tokens_per_s']:,.0f} "
          f"| {r['bench_tokens_per_s']:,.0f} | {r['ratio']:.3f} |")
  return "\n".join(lines)


def step_overhead_block() -> str:
  cols = ["run", "optimizer", "median ms", "mean ms", "worst ms",
          "refresh / plain ms", "× adamw (median / mean)"]
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  for name, label in STEP_OVERHEAD_1B:
    path = os.path.join(RESULTS, name)
    if not os.path.exists(path):
      continue
    for r in load(path)["results"]:
      rp = ("-" if r.get("refresh_median_ms") is None else
            f"{r['refresh_median_ms']:.1f} / {r['plain_median_ms']:.1f}")
      lines.append(
          f"| [{label}](benchmarks/results/{name}) | {r['name']} | "
          f"{r['median_ms']:.2f} | {r['mean_ms']:.2f} | {r['worst_ms']:.2f} | "
          f"{rp} | {r['median_vs_adamw']:.2f} / {r['mean_vs_adamw']:.2f} |")
  return "\n".join(lines)


def replace_block(text: str, name: str, body: str) -> str:
  pat = re.compile(rf"(<!-- {name}:start -->\n).*?(<!-- {name}:end -->)",
                   re.S)
  if not pat.search(text):
    raise SystemExit(f"README.md has no <!-- {name}:start/end --> block")
  return pat.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--write", action="store_true",
                 help="replace the generated blocks in README.md")
  args = p.parse_args()
  blocks = {"lm_throughput": lm_block(), "engine_throughput": engine_block(),
            "step_overhead_1b": step_overhead_block()}
  if not args.write:
    for body in blocks.values():
      print(body, end="\n\n")
    return
  with open(README) as f:
    text = f.read()
  for name, body in blocks.items():
    text = replace_block(text, name, body)
  with open(README, "w") as f:
    f.write(text)
  print(f"updated {README}")


if __name__ == "__main__":
  main()
