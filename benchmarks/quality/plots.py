"""Small PNG plots of the quality benchmark's JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

COLORS = {"main": "C0", "peer": "C2", "cgfm-ablation": "C1",
          "cegm-ablation": "C3"}
DPI = 80


def _save(fig: Any, path: Path) -> None:
  fig.tight_layout()
  fig.savefig(path, dpi=DPI)
  plt.close(fig)


def _err(s: dict[str, Any]) -> float:
  return s["ci"] if s.get("ci") is not None else 0.0


def main(res: dict[str, Any], out: Path) -> None:
  arms = res["arms"]
  names = [n for n in arms
           if arms[n].get("test", {}).get("mean") is not None]
  fig, axes = plt.subplots(1, 3, figsize=(15, 0.3 * len(names) + 2))
  y = np.arange(len(names))
  for ax, key, label in (
      (axes[0], "test", "final test loss (bits/byte), mean ± 95% CI"),
      (axes[1], "steps_to_target", "steps to AdamW's final test loss"),
      (axes[2], "variability", "grad-norm CV (window 20) ± 95% CI")):
    vals, errs = [], []
    for n in names:
      s = arms[n].get(key, {})
      if key == "variability":
        s = s.get("grad_norm_cv", {})
      vals.append(s.get("mean") if s.get("mean") is not None else np.nan)
      errs.append(_err(s) if s else 0.0)
    ax.barh(y, vals, xerr=errs, color=[COLORS[arms[n]["group"]]
                                       for n in names])
    ax.set_yticks(y, names if ax is axes[0] else [""] * len(names))
    ax.invert_yaxis()
    ax.set_xlabel(label, fontsize=9)
    if key == "test" and "adamw" in arms:
      ax.axvline(arms["adamw"]["test"]["mean"], color="k", lw=0.8)
      lo = np.nanmin(vals) - 0.1
      ax.set_xlim(left=max(lo, 0))
  fig.suptitle(f"quality benchmark ({res['preset']}): blue main, green "
               "peers, orange CGFM ablations, red CEGM ablations",
               fontsize=10)
  _save(fig, out / "main.png")

  # Curves of the six main arms: test loss vs steps and vs time.
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for n, rs in res["runs"].items():
    if arms[n]["group"] != "main" or not rs:
      continue
    steps = rs[0]["steps"]
    c = np.array([[v if v is not None else np.nan for v in r["curve"]["test"]]
                  for r in rs if len(r["curve"]["test"]) == len(steps)])
    t = np.array([r["time"] for r in rs if len(r["time"]) == len(steps)])
    axes[0].plot(steps, np.nanmean(c, 0), label=n)
    axes[1].plot(np.mean(t, 0), np.nanmean(c, 0), label=n)
  for ax, xl in zip(axes, ("step", "training seconds (this shared CPU)"),
                    strict=True):
    ax.set_xlabel(xl)
    ax.set_ylabel("test bits/byte (seed mean)")
    if "target_test_bits" in res:
      ax.axhline(res["target_test_bits"], color="k", lw=0.6, ls="--")
    ax.set_ylim(top=min(ax.get_ylim()[1], 6))
  axes[0].legend(fontsize=8)
  _save(fig, out / "main_curves.png")


def _arms_levels(res: dict[str, Any]) -> tuple[list[str], list[Any]]:
  arms = sorted({k.split("|")[0] for k in res["table"]},
                key=list(res["lrs"]).index)
  return arms, res["levels"]


def levels(res: dict[str, Any], out: Path, name: str, xlabel: str) -> None:
  arms, levels = _arms_levels(res)
  fig, ax = plt.subplots(figsize=(6, 3.5))
  x = np.arange(len(levels))
  w = 0.8 / len(arms)
  for i, a in enumerate(arms):
    s = [res["table"][f"{a}|{lv}"]["test"] for lv in levels]
    ax.bar(x + i * w, [v["mean"] or np.nan for v in s], w,
           yerr=[_err(v) for v in s], label=a)
  ax.set_xticks(x + w * (len(arms) - 1) / 2, [str(v) for v in levels])
  ax.set_xlabel(xlabel)
  ax.set_ylabel("final test bits/byte ± 95% CI")
  vals = [res["table"][k]["test"]["mean"] for k in res["table"]]
  vals = [v for v in vals if v is not None]
  if vals:
    ax.set_ylim(min(vals) - 0.2, max(vals) + 0.2)
  ax.legend(fontsize=8)
  _save(fig, out / f"{name}.png")


def context(res: dict[str, Any], out: Path) -> None:
  arms, levels = _arms_levels(res)
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for a in arms:
    axes[0].plot(levels, [res["table"][f"{a}|{L}"]["perplexity"]
                          for L in levels], "o-", label=a)
  axes[0].set_xscale("log", base=2)
  axes[0].set_xlabel("context length (bytes)")
  axes[0].set_ylabel("test perplexity per byte")
  axes[0].legend(fontsize=8)
  longest = levels[-1]
  for a in arms:
    pos = np.mean([r["position"]["test"]
                   for r in res["runs"][f"{a}|{longest}"]], 0)
    k = max(1, len(pos) // 32)
    sm = np.convolve(pos, np.ones(k) / k, mode="valid")
    axes[1].plot(np.arange(len(sm)) + k // 2, sm, label=a)
  axes[1].set_xlabel(f"position in the window (trained at {longest})")
  axes[1].set_ylabel("test bits/byte at that position")
  axes[1].set_ylim(top=min(axes[1].get_ylim()[1], 5))
  axes[1].legend(fontsize=8)
  _save(fig, out / "context.png")


def domains(res: dict[str, Any], out: Path) -> None:
  arms, levels = _arms_levels(res)
  sets = ("test", "genre", "python")
  fig, ax = plt.subplots(figsize=(6, 3.5))
  x = np.arange(len(sets))
  w = 0.8 / len(arms)
  for i, a in enumerate(arms):
    s = [res["table"][f"{a}|{levels[0]}"][e] for e in sets]
    ax.bar(x + i * w, [v["mean"] or np.nan for v in s], w,
           yerr=[_err(v) for v in s], label=a)
  ax.set_xticks(x + w * (len(arms) - 1) / 2,
                ["held-out plays\n(seen genres)", "Roman plays\n(unseen genre)",
                 "Python stdlib"])
  ax.set_ylabel("final bits/byte ± 95% CI")
  ax.legend(fontsize=8)
  _save(fig, out / "domains.png")


def memory(res: dict[str, Any], out: Path) -> None:
  table = res["state_bytes"]
  sizes = list(table)
  arms = [k for k in table[sizes[0]] if k != "params_bytes"]
  fig, ax = plt.subplots(figsize=(10, 3.5))
  x = np.arange(len(arms))
  w = 0.8 / len(sizes)
  for i, s in enumerate(sizes):
    ratio = [table[s][a] / max(table[s]["params_bytes"], 1) for a in arms]
    mb = table[s]["params_bytes"] / 1e6
    ax.bar(x + i * w, ratio, w, label=f"{s} ({mb:.1f} MB params)")
  ax.set_xticks(x + w * (len(sizes) - 1) / 2, arms, rotation=60, ha="right",
                fontsize=8)
  ax.set_ylabel("optimizer state / parameter bytes")
  ax.legend(fontsize=8)
  _save(fig, out / "memory.png")
