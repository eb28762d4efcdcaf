"""Tables and figures for reports: Markdown tables, image grids and histograms as PNG files.

Usage::

    from intriguing_jax import plotting
    text = plotting.markdown_table([{"model": "FC10", "error": 0.074}], floatfmt=".3g")
    plotting.save_image_grid(images[:12], "grid.png", ncols=6, titles=[...])
    plotting.save_histograms({"FC10": d1, "FC100-100-10": d2}, "dist.png", xlabel="RMS distortion")

matplotlib is imported lazily with the non-interactive Agg backend, and every file is written atomically.
"""

from __future__ import annotations

import hashlib
import io
import math
import re
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from intriguing_jax import checkpoint


def safe_name(name: str) -> str:
  """A file-name-safe version of ``name`` plus 6 hex digits of its hash (distinct names stay distinct)."""
  safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"
  return safe + "_" + hashlib.sha256(name.encode()).hexdigest()[:6]


def format_cell(value: Any, floatfmt: str) -> str:
  """A table cell: "" for None, yes/no, n/a for NaN, ``floatfmt`` floats, escaped text."""
  if value is None:
    return ""
  if isinstance(value, (bool, np.bool_)):
    return "yes" if value else "no"
  if isinstance(value, (float, np.floating)):
    if math.isnan(value):
      return "n/a"
    return format(float(value), floatfmt)
  if isinstance(value, (int, np.integer)):
    return str(int(value))
  return str(value).replace("|", "\\|").replace("\n", " ")


def table_columns(rows: Sequence[Mapping[str, Any]], columns: Optional[Sequence[str]] = None) -> list:
  """``columns`` as a list, or the keys of all rows in first-seen order."""
  if columns is not None:
    return list(columns)
  out = []
  for row in rows:
    for k in row:
      if k not in out:
        out.append(k)
  return out


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Optional[Sequence[str]] = None,
                   *, floatfmt: str = ".4g") -> str:
  """Rows (dicts) as a GitHub-flavoured Markdown table ending with a newline: ``columns`` in order (default
  :func:`table_columns`), floats formatted with ``floatfmt`` (e.g. ".3g", ".1%")."""
  columns = table_columns(rows, columns)
  lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
  for row in rows:
    lines.append("| " + " | ".join(format_cell(row.get(c), floatfmt) for c in columns) + " |")
  return "\n".join(lines) + "\n"


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg", force=True)
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _save_figure(fig: Any, path: str) -> str:
  plt = _pyplot()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
  plt.close(fig)
  checkpoint.atomic_write_bytes(path, buf.getvalue())
  return path


def save_image_grid(images: Any, path: str, *, ncols: Optional[int] = None,
                    titles: Optional[Sequence[str]] = None, row_labels: Optional[Sequence[str]] = None,
                    suptitle: Optional[str] = None) -> str:
  """Saves images with pixels in [0, 1] as a grid PNG at ``path``; returns ``path``.

  ``images``: [N, H, W(, C)] laid out ``ncols`` per row (default min(N, 10)), or [rows, cols, H, W(, C)].
  ``titles``: per image (flat order); ``row_labels``: per grid row, at the left.
  """
  images = np.asarray(images, dtype=np.float32)
  if images.ndim == 5 or (images.ndim == 4 and images.shape[-1] not in (1, 3)):
    nrows, ncols = images.shape[:2]
    images = images.reshape((nrows * ncols,) + images.shape[2:])
  elif images.ndim in (3, 4):
    n = images.shape[0]
    ncols = ncols or min(n, 10)
    nrows = max(1, math.ceil(n / ncols))
  else:
    raise ValueError(f"save_image_grid: expected [N,H,W(,C)] or [rows,cols,H,W(,C)], got shape "
                     f"{images.shape}")
  if images.ndim == 4 and images.shape[-1] == 1:
    images = images[..., 0]
  plt = _pyplot()
  fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * 0.9, nrows * 0.9 * 1.05),
                           squeeze=False)
  for i, ax in enumerate(axes.flat):
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
      spine.set_visible(False)
    if i < images.shape[0]:
      ax.imshow(np.clip(images[i], 0.0, 1.0), cmap="gray" if images[i].ndim == 2 else None, vmin=0.0,
                vmax=1.0, interpolation="nearest")
      if titles is not None and i < len(titles):
        ax.set_title(titles[i], fontsize=7)
  if row_labels is not None:
    for r, label in enumerate(row_labels[:nrows]):
      axes[r, 0].set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
  if suptitle:
    fig.suptitle(suptitle, fontsize=9)
  return _save_figure(fig, path)


def save_histograms(series: Mapping[str, Any], path: str, *, bins: int = 40, xlabel: str = "",
                    title: Optional[str] = None) -> str:
  """Saves overlaid histograms of several 1-D series (e.g. distortion per model) as a PNG."""
  if not series:
    raise ValueError("save_histograms: no series given")
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 3.5))
  finite = [np.asarray(v, np.float64)[np.isfinite(np.asarray(v, np.float64))] for v in series.values()]
  lo = min((v.min() for v in finite if v.size), default=0.0)
  hi = max((v.max() for v in finite if v.size), default=1.0)
  edges = np.linspace(lo, hi if hi > lo else lo + 1e-6, bins + 1)
  for (name, _), vals in zip(series.items(), finite):
    ax.hist(vals, bins=edges, alpha=0.5, label=f"{name} (mean {vals.mean():.3g})" if vals.size else name)
  ax.set_xlabel(xlabel)
  ax.set_ylabel("count")
  ax.legend(fontsize=7)
  if title:
    ax.set_title(title, fontsize=9)
  return _save_figure(fig, path)


def adversarial_triplets(x: Any, x_adv: Any, *, magnify: float = 10.0) -> np.ndarray:
  """[N, 3, H, W, C] rows of (original, magnified difference on mid-grey, adversarial), as in Figure 5."""
  x = np.asarray(x, np.float32)
  x_adv = np.asarray(x_adv, np.float32)
  if x.shape != x_adv.shape:
    raise ValueError(f"adversarial_triplets: shapes differ {x.shape} vs {x_adv.shape}")
  diff = np.clip(0.5 + magnify * (x_adv - x), 0.0, 1.0)
  return np.stack([x, diff, x_adv], axis=1)


def pairs_grid(x: Any, x_dist: Any, *, ncols_pairs: int = 3) -> np.ndarray:
  """Figure 7 layout: [rows, 2*ncols_pairs, H, W, C], odd columns original, even columns distorted."""
  x = np.asarray(x, np.float32)
  x_dist = np.asarray(x_dist, np.float32)
  n = x.shape[0] - x.shape[0] % ncols_pairs
  if n == 0:
    raise ValueError(f"pairs_grid: need at least {ncols_pairs} images, got {x.shape[0]}")
  inter = np.stack([x[:n], x_dist[:n]], axis=1)  # [n, 2, ...]
  return inter.reshape((n // ncols_pairs, 2 * ncols_pairs) + x.shape[1:])

