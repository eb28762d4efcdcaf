"""Tables and figures for reports: Markdown tables, image grids, difference grids, CDFs and histograms
as PNG files.

Usage::

    from intriguing_jax import plotting
    text = plotting.markdown_table([{"model": "FC10", "error": 0.074}], floatfmt=".3g")
    plotting.save_image_grid(images[:12], "grid.png", ncols=6, titles=[...])
    plotting.save_cdfs({"FC10": d1, "FC100-100-10": d2}, "dist.png", xlabel="RMS distortion")
    plotting.save_difference_grid(x[None, :2], x_adv[None, :2], "diff.png", row_labels=["FC10"])

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


def _bare(ax: Any) -> None:
  ax.set_xticks([])
  ax.set_yticks([])
  for spine in ax.spines.values():
    spine.set_visible(False)


def _grid_axes(nrows: int, ncols: int, captions: Optional[Sequence[str]], cell: float = 0.9):
  """A figure of nrows x ncols bare axes; cells grow to fit captions of several lines."""
  lines = max([c.count("\n") + 1 for c in captions or () if c] or [0])
  plt = _pyplot()
  fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * cell * (1.25 if lines else 1.0),
                                                  nrows * cell * 1.05 + nrows * 0.14 * lines), squeeze=False,
                           layout="constrained")
  fig.get_layout_engine().set(w_pad=0.01, h_pad=0.01, wspace=0.02, hspace=0.02)
  for ax in axes.flat:
    _bare(ax)
  return fig, axes


def _label_axes(ax: Any, i: int, titles, captions) -> None:
  if titles is not None and i < len(titles) and titles[i]:
    ax.set_title(titles[i], fontsize=7)
  if captions is not None and i < len(captions) and captions[i]:
    ax.set_xlabel(captions[i], fontsize=6)


def save_image_grid(images: Any, path: str, *, ncols: Optional[int] = None,
                    titles: Optional[Sequence[str]] = None, row_labels: Optional[Sequence[str]] = None,
                    suptitle: Optional[str] = None, captions: Optional[Sequence[str]] = None) -> str:
  """Saves images with pixels in [0, 1] as a grid PNG at ``path``; returns ``path``.

  ``images``: [N, H, W(, C)] laid out ``ncols`` per row (default min(N, 10)), or [rows, cols, H, W(, C)].
  ``titles``: per image (flat order), above it; ``captions``: per image, under it (e.g. "true 3 -> target 5
  / pred 5"); ``row_labels``: per grid row, at the left. Empty strings draw nothing.
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
  fig, axes = _grid_axes(nrows, ncols, captions)
  for i, ax in enumerate(axes.flat):
    if i < images.shape[0]:
      ax.imshow(np.clip(images[i], 0.0, 1.0), cmap="gray" if images[i].ndim == 2 else None, vmin=0.0,
                vmax=1.0, interpolation="nearest")
      _label_axes(ax, i, titles, captions)
  if row_labels is not None:
    for r, label in enumerate(row_labels[:nrows]):
      axes[r, 0].set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
  if suptitle:
    fig.suptitle(suptitle, fontsize=9)
  return _save_figure(fig, path)


def save_difference_grid(x: Any, x_adv: Any, path: str, *, row_labels: Optional[Sequence[str]] = None,
                         captions: Optional[Sequence[str]] = None, suptitle: Optional[str] = None) -> str:
  """Figure 5 layout: per row, for each example, (original | x_adv - x | adversarial); returns ``path``.

  ``x``, ``x_adv``: [rows, T, H, W(, C)] in [0, 1] (e.g. one row per model, the same T examples). The
  differences (channel mean for colour) are drawn on the diverging "RdBu_r" colormap with ONE symmetric
  scale for the whole figure, vmax = max |x_adv - x| over all rows, white = 0, and a colorbar in pixel units.
  ``captions``: per adversarial image (rows * T, flat order), under it.
  """
  x = np.asarray(x, np.float32)
  x_adv = np.asarray(x_adv, np.float32)
  if x.shape != x_adv.shape or x.ndim not in (4, 5):
    raise ValueError(f"save_difference_grid: expected two equal [rows,T,H,W(,C)] shapes, got {x.shape} "
                     f"and {x_adv.shape}")
  if x.ndim == 5:
    diff = (x_adv - x).mean(-1)
    x, x_adv = (x[..., 0], x_adv[..., 0]) if x.shape[-1] == 1 else (x, x_adv)
  else:
    diff = x_adv - x
  vmax = float(np.max(np.abs(diff))) or 1e-6
  rows, t = x.shape[:2]
  fig, axes = _grid_axes(rows, 3 * t, captions)
  gray = dict(cmap="gray" if x.ndim == 4 else None, vmin=0.0, vmax=1.0, interpolation="nearest")
  for r in range(rows):
    for j in range(t):
      a0, a1, a2 = axes[r, 3 * j:3 * j + 3]
      a0.imshow(np.clip(x[r, j], 0.0, 1.0), **gray)
      im = a1.imshow(diff[r, j], cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest")
      a2.imshow(np.clip(x_adv[r, j], 0.0, 1.0), **gray)
      _label_axes(a2, r * t + j, None, captions)
      if r == 0:
        for ax, name in zip((a0, a1, a2), ("original", "difference", "adversarial")):
          ax.set_title(name, fontsize=7)
    if row_labels is not None and r < len(row_labels):
      axes[r, 0].set_ylabel(row_labels[r], fontsize=7, rotation=0, ha="right", va="center")
  bar = fig.colorbar(im, ax=axes, shrink=0.6, aspect=30, pad=0.01)
  bar.set_label("x_adv - x (pixel value)", fontsize=7)
  bar.ax.tick_params(labelsize=6)
  if suptitle:
    fig.suptitle(suptitle, fontsize=9)
  return _save_figure(fig, path)


_LINESTYLES = ("-", "--", "-.", ":")


def save_cdfs(series: Mapping[str, Any], path: str, *, xlabel: str = "", title: Optional[str] = None) -> str:
  """Saves the empirical CDF of each 1-D series (e.g. distortion per model) as one step curve per series,
  with a legend (name, n, median); returns ``path``. The curve of a series rises by 1/len(series) per
  finite value, so NaN/inf values (counted in the legend) leave it below 1."""
  if not series:
    raise ValueError("save_cdfs: no series given")
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 3.5))
  for i, (name, v) in enumerate(series.items()):
    v = np.asarray(v, np.float64).ravel()
    fin = np.sort(v[np.isfinite(v)])
    bad = f", {v.size - fin.size} non-finite" if fin.size < v.size else ""
    label = f"{name} (n={v.size}, median {np.median(fin):.3g}{bad})" if fin.size else f"{name} (no values)"
    ys = np.arange(1, fin.size + 1) / max(v.size, 1)
    ax.step(np.concatenate([fin[:1], fin]), np.concatenate([[0.0], ys]), where="post", label=label,
            linestyle=_LINESTYLES[i // 10 % len(_LINESTYLES)], linewidth=1.4)
  ax.set_xlabel(xlabel)
  ax.set_ylabel("fraction of examples <= x")
  ax.set_ylim(0.0, 1.02)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="lower right")
  if title:
    ax.set_title(title, fontsize=9)
  return _save_figure(fig, path)


def save_histograms(series: Mapping[str, Any], path: str, *, bins: int = 40, xlabel: str = "",
                    title: Optional[str] = None) -> str:
  """Saves step histograms (outlines, one colour per series, shared bins) of several 1-D series as a PNG.
  For many overlapping series prefer :func:`save_cdfs`."""
  if not series:
    raise ValueError("save_histograms: no series given")
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 3.5))
  finite = [np.asarray(v, np.float64)[np.isfinite(np.asarray(v, np.float64))] for v in series.values()]
  lo = min((v.min() for v in finite if v.size), default=0.0)
  hi = max((v.max() for v in finite if v.size), default=1.0)
  edges = np.linspace(lo, hi if hi > lo else lo + 1e-6, bins + 1)
  for (name, _), vals in zip(series.items(), finite):
    ax.hist(vals, bins=edges, histtype="step", linewidth=1.4,
            label=f"{name} (mean {vals.mean():.3g})" if vals.size else name)
  ax.set_xlabel(xlabel)
  ax.set_ylabel("count")
  ax.legend(fontsize=7)
  if title:
    ax.set_title(title, fontsize=9)
  return _save_figure(fig, path)


def pairs_grid(x: Any, x_dist: Any, *, ncols_pairs: int = 3) -> np.ndarray:
  """Figure 7 layout: [rows, 2*ncols_pairs, H, W, C], odd columns original, even columns distorted."""
  x = np.asarray(x, np.float32)
  x_dist = np.asarray(x_dist, np.float32)
  n = x.shape[0] - x.shape[0] % ncols_pairs
  if n == 0:
    raise ValueError(f"pairs_grid: need at least {ncols_pairs} images, got {x.shape[0]}")
  inter = np.stack([x[:n], x_dist[:n]], axis=1)  # [n, 2, ...]
  return inter.reshape((n // ncols_pairs, 2 * ncols_pairs) + x.shape[1:])

