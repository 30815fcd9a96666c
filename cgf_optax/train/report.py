"""Results table and plots of a comparison."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cgf_optax.train.loop import RunResult

__all__ = ["results_table", "plot_runs"]


def _fmt_bytes(n: int) -> str:
  return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def results_table(results: Sequence[RunResult], reference: str | None = None
                  ) -> str:
  """A plain-text table; ``reference`` (e.g. ``"adamw"``) gives the target
  validation loss for "steps to reach" and the throughput/memory ratios."""
  ref = next((r for r in results if r.label == reference), results[0])
  target = ref.final_val
  name = ref.label.partition(":")[0]     # the headers name it without options
  w = max(12, *(len(r.label) + (11 if r.diverged else 0) for r in results))
  head = (f"{'optimizer':<{w}} {'train b/B':>9} {'val b/B':>8} "
          f"{'steps to ' + name[:10] + ' val':>22} {'tokens/s':>10} "
          f"{'x ' + name[:8]:>10} {'opt state':>10} "
          f"{'x ' + name[:8]:>10}")
  lines = [head, "-" * len(head)]
  for r in results:
    reach = r.steps_to(target) if np.isfinite(target) else None
    note = " (diverged)" if r.diverged else ""
    lines.append(
        f"{r.label + note:<{w}} {r.final_train:>9.3f} "
        f"{r.final_val:>8.3f} {str(reach) if reach else 'not reached':>22} "
        f"{r.tokens_per_s:>10,.0f} "
        f"{r.tokens_per_s / max(ref.tokens_per_s, 1e-9):>9.2f}x "
        f"{_fmt_bytes(r.state_bytes):>10} "
        f"{r.state_bytes / max(ref.state_bytes, 1):>9.2f}x")
  return "\n".join(lines)


def _smooth(v: np.ndarray, k: int = 10) -> np.ndarray:
  if len(v) < k:
    return v
  return np.convolve(v, np.ones(k) / k, mode="valid")


def plot_runs(results: Sequence[RunResult], path: Path,
              baselines: dict[str, float] | None = None) -> list[Path]:
  """Writes ``path`` (losses against steps and wall clock) and, when any run
  has telemetry, ``path`` with suffix ``-telemetry``. Returns the files."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  color = {r.label: f"C{i % 10}" for i, r in enumerate(results)}
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
  for r in results:
    s, v = r.series("bits")
    ok = np.isfinite(v)
    _, t = r.series("time")
    axes[0].plot(s[ok][9:] if ok.sum() >= 10 else s[ok], _smooth(v[ok]),
                 label=r.label, lw=1.2, color=color[r.label])
    vs, vv = r.series("val_bits")
    axes[1].plot(vs, vv, marker="o", ms=3, label=r.label, color=color[r.label])
    tt = np.interp(vs, s, t) if len(s) else vs
    axes[2].plot(tt, vv, marker="o", ms=3, color=color[r.label],
                 label=r.label)
  titles = ["training loss (10-step mean)", "validation loss (held-out text)",
            "validation loss against training time"]
  xlabels = ["step", "step", "seconds (compilation included)"]
  for ax, title, xl in zip(axes, titles, xlabels, strict=True):
    for name, value in (baselines or {}).items():
      ax.axhline(value, color="grey", ls=":", lw=1)
      ax.annotate(name, (0.99, value), xycoords=("axes fraction", "data"),
                  ha="right", va="bottom", fontsize=7, color="grey")
    ax.set_title(title)
    ax.set_xlabel(xl)
    ax.set_ylabel("bits per byte")
    ax.grid(alpha=0.3)
  axes[1].legend(fontsize=8)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  files = [path]

  keys = ["grad_norm", "modulation_factor", "entangle_lambda",
          "scale_share/global"]
  have = [k for k in keys if any(len(_series(r, k)[0]) for r in results)]
  if have:
    fig, axes = plt.subplots(1, len(have), figsize=(4.5 * len(have), 3.8),
                             squeeze=False)
    for ax, key in zip(axes[0], have, strict=True):
      for r in results:
        s, v = _series(r, key)
        if len(s):
          ax.plot(s, v, label=r.label, lw=1, color=color[r.label])
      ax.set_title({"grad_norm": "gradient norm (before clipping)",
                    "modulation_factor": "CGFM modulation factor",
                    "entangle_lambda": "CEGM entanglement λ",
                    "scale_share/global": "CGFM: ‖global part‖ / ‖gradient‖"
                    }[key])
      ax.set_xlabel("step")
      ax.grid(alpha=0.3)
      if key == "grad_norm":
        ax.set_yscale("log")
    for ax in axes[0]:
      ax.legend(fontsize=7)
    fig.tight_layout()
    tpath = path.with_name(path.stem + "-telemetry" + path.suffix)
    fig.savefig(tpath, dpi=110)
    plt.close(fig)
    files.append(tpath)
  flow_runs = [r for r in results if len(r.series("flow_local/0")[0])]
  if flow_runs:
    files.append(_plot_flow(flow_runs, path.with_name(
        path.stem + "-flow" + path.suffix), plt))
  return files


def _plot_flow(results: Sequence[RunResult], path: Path, plt) -> Path:
  """Per-layer heat maps over steps of the activation cotangent's parts."""
  from matplotlib.colors import LogNorm
  fig, axes = plt.subplots(len(results), 2, figsize=(12, 2.6 * len(results)),
                           squeeze=False)
  for row, r in zip(axes, results, strict=True):
    layers = sorted(int(k.split("/")[1]) for k in r.records[-1]
                    if k.startswith("flow_local/"))
    if not layers:   # last record may lack telemetry: search back
      layers = sorted({int(k.split("/")[1]) for rec in r.records for k in rec
                       if k.startswith("flow_local/")})
    for ax, part in zip(row, ("local", "global"), strict=True):
      steps = r.series(f"flow_{part}/0")[0]
      grid = np.stack([r.series(f"flow_{part}/{i}")[1] for i in layers])
      grid = np.where(grid > 0, grid, np.nan)
      im = ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis",
                     norm=LogNorm(), interpolation="nearest",
                     extent=(steps[0], steps[-1], -0.5, len(layers) - 0.5))
      fig.colorbar(im, ax=ax)
      ax.set_title(f"{r.label}: ‖{part} part‖ of each block's output "
                   "cotangent", fontsize=9)
      ax.set_xlabel("step")
      ax.set_ylabel("block")
      ax.set_yticks(range(len(layers)))
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def _series(r: RunResult, key: str) -> tuple[np.ndarray, np.ndarray]:
  if key != "scale_share/global":
    return r.series(key)
  s, glob = r.series("scale_norm/global")
  s2, gn = r.series("grad_norm")
  if not len(s):
    return s, glob
  norm = dict(zip(s2.tolist(), gn.tolist(), strict=True))
  return s, np.asarray([g / max(norm.get(k, np.nan), 1e-30)
                        for k, g in zip(s.tolist(), glob.tolist(),
                                        strict=True)])
