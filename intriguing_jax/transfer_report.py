"""The report side of Tables 1-4 (``transfer``): the paper's qualitative claims checked on our numbers,
aggregation over seeds, figures, and the Markdown/HTML report.

Usage::

    from intriguing_jax import transfer, transfer_report
    rows1 = transfer.table1(models, train, test, adversarial=adv)       # ... table2-4 likewise
    results = {"table1": rows1, "table2": rows2, "table3": rows3, "table4": rows4}
    results["claims"] = transfer_report.qualitative_claims(results, lambda_order=transfer.LAMBDA_ORDER)
    figures = transfer_report.save_figures("runs/mnist", adv, models, prefix="train")
    transfer_report.build_report(results, figures=figures).write("runs/mnist", "report")

Over several seeds, ``aggregate_rows`` turns per-seed rows into mean / s.d. rows first. The functions are
also reachable as ``transfer.qualitative_claims`` etc.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import jax
import numpy as np

from intriguing_jax import metrics
from intriguing_jax.transfer import (
    AdversarialSet, Models, PAPER_TABLE1, PAPER_TABLE2, PAPER_TABLE3, PAPER_TABLE4, READINGS, logits_fns)
from intriguing_jax.transfer import _gaussian_noise, _safe_name  # pylint: disable=protected-access

__all__ = ["qualitative_claims", "aggregate_rows", "save_figures", "build_report"]

# --------------------------------------------------------------------------------------------------
# Qualitative claims, aggregation over seeds
# --------------------------------------------------------------------------------------------------

def _offdiag(rows: Sequence[dict], cols: Sequence[str], kind: str) -> Dict[str, float]:
  out = {}
  for r in rows:
    if r.get("kind") == kind and r.get("source") in cols:
      vals = [r[c] for c in cols if c != r["source"] and c in r]
      if vals:
        out[r["source"]] = float(np.mean(vals))
  return out


def qualitative_claims(results: Mapping[str, Any], *, lambda_order: Optional[Sequence[str]] = None) -> List[dict]:
  """Checks the paper's qualitative claims on our numbers.

  Args:
    results: any of ``table1``, ``table2``, ``table4`` -> rows as returned by the table functions.
    lambda_order: Table 1 model names with the same architecture, by increasing weight decay (default:
      the FC10 rows "FC10(10^-4)", "FC10(10^-2)", "FC10(1)" when present).

  Returns:
    One dict per claim that could be checked: ``claim`` (the paper's statement), ``holds`` (bool) and
    ``evidence`` (a sentence with our numbers).
  """
  out = []
  t1, t2, t4 = results.get("table1"), results.get("table2"), results.get("table4")
  if t2:
    cols = [r["source"] for r in t2 if r.get("kind") == "adversarial"]
    adv = _offdiag(t2, cols, "adversarial")
    noise = [r for r in t2 if r.get("kind") == "noise"]
    if adv and noise and len(cols) > 1:
      parts, holds = [], True
      for src, e in adv.items():
        d = next(r["av_distortion"] for r in t2 if r.get("source") == src)
        bigger = [r for r in noise if r["stddev"] >= d] or [max(noise, key=lambda r: r["stddev"])]
        ref = min(bigger, key=lambda r: r["stddev"])
        ne = float(np.mean([ref[c] for c in cols if c != src]))
        holds &= e > ne
        parts.append(f"{src} (distortion {d:.3f}): {100 * e:.1f}% vs noise stddev {ref['stddev']:g}: "
                     f"{100 * ne:.1f}%")
      out.append({"claim": "Adversarial examples transfer to other models far more than Gaussian noise of the "
                           "same or larger stddev (Table 2).",
                  "holds": bool(holds),
                  "evidence": "Mean error on the other models: " + "; ".join(parts) + "."})
    diag = [r[r["source"]] for r in t2 if r.get("kind") == "adversarial" and r["source"] in r]
    if diag:
      out.append({"claim": "Every adversarial set has 100% error on the model it was made for (Table 2 diagonal).",
                  "holds": bool(min(diag) >= 1.0),
                  "evidence": "Diagonal errors: " + ", ".join(f"{100 * v:.2f}%" for v in diag) + "."})
  if t1:
    order = list(lambda_order) if lambda_order else [n for n in ("FC10(10^-4)", "FC10(10^-2)", "FC10(1)")
                                                     if any(r["model"] == n for r in t1)]
    d = [next(r["av_min_distortion"] for r in t1 if r["model"] == n) for n in order if
         any(r["model"] == n for r in t1)]
    if len(d) >= 2:
      out.append({"claim": "Stronger weight decay (higher lambda) needs a larger minimum distortion (Table 1).",
                  "holds": bool(all(b > a for a, b in zip(d, d[1:]))),
                  "evidence": ", ".join(f"{n}: {v:.4f}" for n, v in zip(order, d)) + "."})
  if t4:
    cols = [r["source"] for r in t4 if r.get("kind") == "adversarial"]
    mag = _offdiag(t4, cols, "magnified")
    up = _offdiag(t4, cols, "adversarial")
    nl = [r for r in t4 if r.get("kind") == "noise" and r.get("block") == "lower"]
    if mag and nl and len(cols) > 1:
      noise_err = float(np.mean([nl[0][c] for c in cols]))
      mag_mean = float(np.mean(list(mag.values())))
      out.append({"claim": "Magnified adversarial distortions transfer across training sets far more than "
                           "Gaussian noise of the same stddev (Table 4).",
                  "holds": bool(min(mag.values()) > noise_err),
                  "evidence": f"Mean off-diagonal error of the magnified sets {100 * mag_mean:.1f}% (per set: "
                              + ", ".join(f"{k} {100 * v:.1f}%" for k, v in mag.items())
                              + f") vs noise stddev {nl[0]['stddev']:g}: {100 * noise_err:.1f}%."})
    if up and mag:
      up_mean = float(np.mean(list(up.values())))
      mag_mean = float(np.mean(list(mag.values())))
      out.append({"claim": "Adversarial examples remain hard for models trained on a disjoint training set, "
                           "though less effective; magnification raises their transfer (Table 4).",
                  "holds": bool(mag_mean > up_mean),
                  "evidence": f"Mean off-diagonal error {100 * up_mean:.1f}% at the original distortion, "
                              f"{100 * mag_mean:.1f}% magnified."})
  return out


def aggregate_rows(per_seed: Sequence[Sequence[dict]], key: str) -> List[dict]:
  """Mean (and ``<field>_std``) over seeds of tables with the same rows, matched on ``key``."""
  if not per_seed:
    raise ValueError("per_seed is empty")
  if len(per_seed) == 1:
    return [dict(r) for r in per_seed[0]]
  out = []
  for i, r0 in enumerate(per_seed[0]):
    matches = [next((r for r in rows if r.get(key) == r0.get(key)), rows[i]) for rows in per_seed]
    row = {}
    for k, v in r0.items():
      if isinstance(v, (float, int, np.floating, np.integer)) and not isinstance(v, bool):
        vals = np.array([float(m.get(k, np.nan)) for m in matches])
        row[k] = float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")
        row[k + "_std"] = float(np.nanstd(vals)) if np.isfinite(vals).any() else float("nan")
      else:
        row[k] = v
    out.append(row)
  return out


# --------------------------------------------------------------------------------------------------
# Figures 5-7 analogues and the report
# --------------------------------------------------------------------------------------------------

def save_figures(out_dir: str, adversarial: Mapping[str, AdversarialSet], models: Models, *, prefix: str,
                 pair_models: Optional[Sequence[str]] = None, noise_stddev: float = 1.0, seed: int = 0,
                 num_pairs: int = 12, num_triplet_examples: int = 2, magnify: float = 10.0,
                 batch_size: int = 1000) -> List[Tuple[str, str]]:
  """Writes the MNIST figures of one group of adversarial sets as PNGs under ``out_dir/figures``.

  * Figure 7 analogue: for each of ``pair_models`` (default: the first two), a grid of ``num_pairs``
    (original, adversarial) pairs, odd columns original; plus one grid of Gaussian noise of stddev
    ``noise_stddev`` (paper: 1.0) with the accuracy of those models on the noisy examples.
  * Figure 5 analogue: one row per model of (original | ``magnify``x difference on grey | adversarial)
    triplets for the first ``num_triplet_examples`` examples.
  * The distribution of the per-example distortion of every model (overlaid histograms).

  Returns:
    (path relative to ``out_dir``, caption) for each figure written.
  """
  from intriguing_jax import plotting  # pylint: disable=g-import-not-at-top
  if num_pairs < 3:
    raise ValueError(f"num_pairs must be >= 3, got {num_pairs}")
  fns = logits_fns(models)
  names = [n for n in fns if n in adversarial]
  if not names:
    raise ValueError("save_figures: no model has an adversarial set")
  pair_models = [n for n in (pair_models or names[:2]) if n in adversarial]
  os.makedirs(os.path.join(out_dir, "figures"), exist_ok=True)
  figs = []
  k = min(num_pairs, adversarial[names[0]].x.shape[0])
  k -= k % 3
  if k >= 3:
    for label, nm in zip("ab", pair_models):
      a = adversarial[nm]
      acc = 1.0 - metrics.error_rate(fns[nm], a.x_adv[:k], a.labels[:k], batch_size=batch_size)
      rel = os.path.join("figures", f"{prefix}_fig7{label}_{_safe_name(nm)}.png")
      plotting.save_image_grid(plotting.pairs_grid(a.x[:k], a.x_adv[:k], ncols_pairs=3),
                               os.path.join(out_dir, rel), titles=["original", "adversarial"] * 3)
      figs.append((rel, f"Figure 7({label}) analogue: adversarial examples for {nm} (odd columns original, even "
                        f"columns adversarial); av. distortion of these {k}: {a.distortion[:k].mean():.3f}; "
                        f"accuracy of {nm} on them: {100 * acc:.0f}%."))
    a = adversarial[names[0]]
    xn = _gaussian_noise(jax.random.fold_in(jax.random.PRNGKey(seed), 3000), a.x, float(noise_stddev), False)
    accs = ", ".join(f"{nm} {100 * (1 - metrics.error_rate(fns[nm], xn, a.labels, batch_size=batch_size)):.0f}%"
                     for nm in pair_models)
    rel = os.path.join("figures", f"{prefix}_fig7c_noise.png")
    plotting.save_image_grid(plotting.pairs_grid(a.x[:k], np.clip(xn[:k], 0.0, 1.0), ncols_pairs=3),
                             os.path.join(out_dir, rel), titles=["original", "noisy"] * 3)
    figs.append((rel, f"Figure 7(c) analogue: Gaussian noise with stddev={noise_stddev:g} (shown clipped to "
                      f"[0,1]); accuracy on all {a.x.shape[0]} noisy examples (unclipped): {accs} "
                      "(paper: 51%)."))
  t = min(num_triplet_examples, adversarial[names[0]].x.shape[0])
  grid = np.stack([plotting.adversarial_triplets(adversarial[nm].x[:t], adversarial[nm].x_adv[:t],
                                                 magnify=magnify).reshape((3 * t,) + adversarial[nm].x.shape[1:])
                   for nm in names])
  rel = os.path.join("figures", f"{prefix}_fig5_triplets.png")
  plotting.save_image_grid(grid, os.path.join(out_dir, rel), row_labels=names,
                           titles=["original", f"{magnify:g}x diff", "adversarial"] * t)
  figs.append((rel, f"Figure 5 analogue: per model, (original | difference magnified {magnify:g}x on grey | "
                    "adversarial) for the same examples and targets."))
  rel = os.path.join("figures", f"{prefix}_distortion_hist.png")
  plotting.save_histograms({nm: adversarial[nm].distortion for nm in names}, os.path.join(out_dir, rel),
                           xlabel="RMS distortion per example", title=f"{prefix}: minimum distortion per model")
  figs.append((rel, "Distribution of the per-example minimum distortion of each model."))
  return figs


def _pct(row: Mapping[str, Any], key: str) -> str:
  v = row.get(key)
  if v is None or (isinstance(v, float) and math.isnan(v)):
    return "n/a"
  s = f"{100 * v:.3g}%"
  std = row.get(key + "_std")
  return s + (f" ± {100 * std:.2g}" if std is not None and np.isfinite(std) else "")


def _num(row: Mapping[str, Any], key: str) -> str:
  v = row.get(key)
  if v is None or (isinstance(v, float) and math.isnan(v)):
    return "n/a"
  std = row.get(key + "_std")
  return f"{v:.3f}" + (f" ± {std:.2g}" if std is not None and np.isfinite(std) else "")


def _paper_pct(v: Optional[float]) -> str:
  return "–" if v is None else f"{100 * v:.3g}%"


def _paper_num(v: Optional[float]) -> str:
  return "–" if v is None else f"{v:.3g}"


def _paper_key_t2(row: Mapping[str, Any]) -> str:
  return f"noise:{row['stddev']:g}" if row.get("kind") == "noise" else row.get("source", "")


def _paper_key_t4(row: Mapping[str, Any]) -> str:
  if row.get("kind") == "noise":
    return f"noise:{row.get('block')}"
  if row.get("kind") == "magnified":
    return f"magnified:{row.get('source')}"
  return row.get("source", "")


def _matrix_report_rows(rows: Sequence[dict], paper: Mapping[str, Mapping[str, float]], key_fn: Callable,
                        cols: Sequence[str]) -> List[dict]:
  out = []
  for r in rows:
    p = paper.get(key_fn(r), {})
    o = {"row": r["row"]}
    for c in cols:
      o[c] = f"{_pct(r, c)} / {_paper_pct(p.get(c))}"
    o["av. distortion"] = f"{_num(r, 'av_distortion')} / {_paper_num(p.get('av_distortion'))}"
    out.append(o)
  return out


def build_report(results: Mapping[str, Any], *, figures: Sequence[Tuple[str, str]] = (),
                 title: str = "Intriguing properties of neural networks: Tables 1-4 on MNIST") -> Any:
  """A :class:`intriguing_jax.report.Report` with every table present in ``results``, ours beside the paper's.

  Args:
    results: ``table1``..``table4`` (rows, possibly aggregated over seeds), optional ``claims`` (from
      :func:`qualitative_claims`), ``config`` (dict shown as the run's settings), ``command`` (str),
      ``timings`` (name -> seconds), ``notes`` (list of str).
    figures: (relative PNG path, caption) pairs, e.g. from :func:`save_figures`.

  Returns:
    The Report; write it with ``report.write(out_dir, "report")``.
  """
  from intriguing_jax import report  # pylint: disable=g-import-not-at-top
  rep = report.Report(title)
  cfg = results.get("config") or {}
  if results.get("command"):
    rep.paragraph("Command:")
    rep.code(results["command"])
  if cfg:
    rep.bullets([f"{k}: {v}" for k, v in cfg.items()])
  rep.paragraph("Every cell reads 'ours / paper'. Errors are percentages; distortions are RMS pixel changes "
                "(pixels in [0,1]). With several seeds, ours is the mean ± std over seeds.")
  for note in results.get("notes") or ():
    rep.paragraph(note)
  claims = results.get("claims") or []
  if claims:
    rep.heading("The paper's qualitative claims, checked on our numbers")
    rep.bullets([f"{'HOLDS' if c['holds'] else 'DOES NOT HOLD'}: {c['claim']} {c['evidence']}" for c in claims])
  t1 = results.get("table1")
  if t1:
    rep.heading("Table 1: models, errors and average minimum distortion (training-set examples)")
    rows = []
    for r in t1:
      p = PAPER_TABLE1.get(r["model"], {})
      rows.append({"model": r["model"],
                   "train error": f"{_pct(r, 'train_error')} / {_paper_pct(p.get('train_error'))}",
                   "test error": f"{_pct(r, 'test_error')} / {_paper_pct(p.get('test_error'))}",
                   "av. min. distortion": f"{_num(r, 'av_min_distortion')} / {_paper_num(p.get('av_min_distortion'))}",
                   "av. distortion (orig. correct)": _num(r, "av_distortion_correct"),
                   "attack success": _pct(r, "success_rate"),
                   "failed / attacked": f"{r.get('num_failed', 0):.0f} / {r.get('num_attacked', 0):.0f}"})
    rep.table(rows, caption="Table 1 (ours / paper). Distortion averaged over all attacked examples (A6); "
                            "failures are counted, not dropped (A7).")
  t2 = results.get("table2")
  if t2:
    cols = [r["source"] for r in t2 if r.get("kind") == "adversarial"]
    rep.heading("Table 2: cross-model generalisation (rows: examples made for; columns: model evaluated)")
    rep.table(_matrix_report_rows(t2, PAPER_TABLE2, _paper_key_t2, cols),
              caption="Table 2 (ours / paper): error of the column model on the row's distorted training "
                      "examples, against the true labels (A9).")
  t3 = results.get("table3")
  if t3:
    rep.heading("Table 3: models for cross-training-set generalisation (clean errors)")
    rows = []
    for r in t3:
      p = PAPER_TABLE3.get(r["model"], {})
      rows.append({"model": r["model"],
                   "error on P1": f"{_pct(r, 'error_p1')} / {_paper_pct(p.get('error_p1'))}",
                   "error on P2": f"{_pct(r, 'error_p2')} / {_paper_pct(p.get('error_p2'))}",
                   "error on test": f"{_pct(r, 'error_test')} / {_paper_pct(p.get('error_test'))}",
                   "min av. distortion": f"{_num(r, 'min_av_distortion')} / {_paper_num(p.get('min_av_distortion'))}",
                   "attack success": _pct(r, "success_rate")})
    rep.table(rows, caption="Table 3 (ours / paper). Distortion of the test-set adversarial examples.")
  t4 = results.get("table4")
  if t4:
    cols = [r["source"] for r in t4 if r.get("kind") == "adversarial"]
    rep.heading("Table 4: cross-training-set generalisation (test-set examples)")
    rep.table(_matrix_report_rows(t4, PAPER_TABLE4, _paper_key_t4, cols),
              caption="Table 4 (ours / paper). Upper block: the adversarial sets and Gaussian noise of their "
                      "mean stddev; lower block: perturbations rescaled to RMS 0.1 (A11) and Gaussian noise "
                      "of stddev 0.1.")
    mags = [r for r in t4 if r.get("kind") == "magnified" and np.isfinite(r.get("magnification", np.nan))]
    if mags:
      rep.paragraph("Measured magnification factor (0.1 / the set's av. distortion): "
                    + ", ".join(f"{r['source']} x{r['magnification']:.2f}" for r in mags)
                    + ". The paper says 'on average by 40%, from stddev 0.06 to 0.1' (which would be +67%).")
  if figures:
    rep.heading("Figures")
    for rel, cap in figures:
      rep.image(rel, caption=cap)
  rep.heading("Readings chosen where the paper is ambiguous (paper.md §9)")
  rep.bullets(list(READINGS))
  timings = results.get("timings") or {}
  if timings:
    rep.heading("Wall time")
    rep.bullets([f"{k}: {v:.1f} s" for k, v in timings.items()])
  return rep
