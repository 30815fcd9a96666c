"""Markdown tables of the quality benchmark's JSON (``summary.md``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .harness import t_interval


def _f(s: dict[str, Any] | None, nd: int = 3) -> str:
  if not s or s.get("mean") is None:
    return "—"
  if s.get("ci") is None:
    return f"{s['mean']:.{nd}f}"
  return f"{s['mean']:.{nd}f} ± {s['ci']:.{nd}f}"


def _load(out: Path, name: str) -> dict[str, Any] | None:
  p = out / f"{name}.json"
  return json.loads(p.read_text()) if p.exists() else None


def paired(runs_a: list[dict[str, Any]], runs_b: list[dict[str, Any]],
           key: str = "test") -> dict[str, Any]:
  """Mean and 95% t-interval of ``a - b`` over the seeds both have (the
  same seed means the same initialisation and the same batches)."""
  b = {r["seed"]: r["final"].get(key) for r in runs_b}
  d = [r["final"].get(key) - b[r["seed"]] for r in runs_a
       if r["seed"] in b and r["final"].get(key) is not None
       and b[r["seed"]] is not None]
  return t_interval(d)


def main_table(res: dict[str, Any]) -> str:
  rows = ["| arm | group | best lr (grid) | test bits/byte | Δ vs AdamW (paired) | "
          "steps to AdamW (reached) | seconds to AdamW | grad-norm CV | "
          "cos(g_t, g_t-1) | cos(u_t, u_t-1) | state MB |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
  ref = res["runs"].get("adamw")
  for n, a in res["arms"].items():
    if "error" in a:
      rows.append(f"| {n} | {a['group']} | failed: {a['error']} |" + " |" * 8)
      continue
    grid = ", ".join(f"{g:.3g}" for g in a["lr_grid"])
    edge = " (edge)" if a["best_at_edge"] else ""
    d = _f(paired(res["runs"][n], ref)) if ref else "—"
    st = a.get("steps_to_target", {})
    n_seeds = len(st.get("per_seed", []))
    steps = f"{_f(st, 0)} ({a.get('reached', 0)}/{n_seeds})"
    v = a["variability"]
    rows.append(
        f"| {n} | {a['group']} | {a['best_lr']:.3g}{edge} [{grid}] | "
        f"{_f(a['test'])} | {d} | {steps} | "
        f"{_f(a.get('time_to_target'), 1)} | {_f(v['grad_norm_cv'])} | "
        f"{_f(v['grad_cos'])} | {_f(v['update_cos'])} | "
        f"{a['state_bytes'] / 1e6:.2f} |")
  return "\n".join(rows)


def levels_table(res: dict[str, Any], evals: tuple[str, ...] = ("test",),
                 extra: str | None = None) -> str:
  arms = list(res["lrs"])
  levels = res["levels"]
  head = "| arm | lr | " + " | ".join(
      f"{lv} {e}" if len(evals) > 1 else str(lv)
      for lv in levels for e in evals) + " |"
  rows = [head, "|---|---|" + "---|" * (len(levels) * len(evals))]
  for a in arms:
    cells = []
    for lv in levels:
      for e in evals:
        t = res["table"].get(f"{a}|{lv}", {})
        cell = _f(t.get(e))
        base = res["runs"].get(f"adamw|{lv}")
        if a != "adamw" and base:
          cell += f"; Δ {_f(paired(res['runs'][f'{a}|{lv}'], base, e))}"
        if extra and extra in t:
          cell += f" (ppl {t[extra]:.2f})"
        cells.append(cell)
    rows.append(f"| {a} | {res['lrs'][a]['lr']:.3g} | " + " | ".join(cells)
                + " |")
  return "\n".join(rows)


def retention_table(res: dict[str, Any]) -> str:
  arms = list(res["lrs"])
  rows = ["| arm | length | " + "bits by position range | far half |",
          "|---|---|---|---|"]
  for lv in res["levels"]:
    for a in arms:
      t = res["table"][f"{a}|{lv}"]
      pos = ", ".join(f"{k}: {v:.3f}" for k, v in t["by_position"].items())
      rows.append(f"| {a} | {lv} | {pos} | {_f(t['far_half'])} |")
  return "\n".join(rows)


def memory_table(res: dict[str, Any]) -> str:
  sb = res["state_bytes"]
  sizes = list(sb)
  arms = [k for k in sb[sizes[0]] if k != "params_bytes"]
  rows = ["| arm | " + " | ".join(
      f"{s} ({sb[s]['params_bytes'] / 1e6:.1f} MB params)" for s in sizes)
          + " |", "|---|" + "---|" * len(sizes)]
  for a in arms:
    rows.append(f"| {a} | " + " | ".join(
        f"{sb[s][a] / 1e6:.2f} MB ({sb[s][a] / sb[s]['adamw']:.2f}×)"
        if "adamw" in sb[s] else f"{sb[s][a] / 1e6:.2f} MB" for s in sizes)
        + " |")
  return "\n".join(rows)


def summarize(out: Path) -> str:
  parts = []
  if (r := _load(out, "main")) is not None:
    parts += ["## main", f"`{r['command']}`; {r['protocol']}; target "
              f"{r.get('target_test_bits', float('nan')):.4f} bits/byte",
              main_table(r)]
  if (r := _load(out, "memory")) is not None:
    parts += ["## memory (optimizer state)", memory_table(r)]
  if (r := _load(out, "context")) is not None:
    parts += ["## context (test bits/byte, per-byte perplexity)",
              levels_table(r, extra="perplexity"), retention_table(r)]
  if (r := _load(out, "init")) is not None:
    parts += ["## init (test bits/byte)", levels_table(r),
              "spread across initialisers: " + json.dumps(
                  r["spread_across_inits"])]
  if (r := _load(out, "noise")) is not None:
    parts += ["## noise (clean test bits/byte)", levels_table(r)]
  if (r := _load(out, "domains")) is not None:
    parts += ["## domains (bits/byte)",
              levels_table(r, evals=("test", "genre", "python"))]
  text = "\n\n".join(parts) + "\n"
  (out / "summary.md").write_text(text)
  return text
