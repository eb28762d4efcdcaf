"""The report of Tables 1-4: the paper's qualitative claims checked on our numbers, aggregation over
seeds, the Figure 5-7 analogues, and the Markdown/HTML report with every cell as "ours / paper".

Usage::

    from intriguing_jax import paper, tables, tables_report
    results = {"table1": rows1, "table2": rows2, "table3": rows3, "table4": rows4}   # from tables.table1..4
    results["claims"] = tables_report.qualitative_claims(results, lambda_order=paper.LAMBDA_ORDER)
    figures = tables_report.save_figures("runs/mnist", adv, models, prefix="train")
    tables_report.build_report(results, figures=figures).write("runs/mnist", "report")
"""

from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from intriguing_jax import metrics
from intriguing_jax import plotting
from intriguing_jax import report
from intriguing_jax import tables
from intriguing_jax.paper import LAMBDA_ORDER, READINGS
from intriguing_jax.paper import PAPER_TABLE1, PAPER_TABLE2, PAPER_TABLE3, PAPER_TABLE4
from intriguing_jax.tables import AdversarialSet, Model


def _claim(claim: str, holds: Any, evidence: str) -> dict:
  return {"claim": claim, "holds": bool(holds), "evidence": evidence}


def _offdiag(rows: Sequence[dict], kind: str, reading: Optional[str] = None) -> Dict[str, float]:
  """Source -> mean error of the other models on the source's ``kind`` row (columns: adversarial sources;
  magnified rows of the magnification ``reading`` only, when given)."""
  cols = [r["source"] for r in rows if r.get("kind") == "adversarial"]
  out = {}
  for r in rows:
    vals = [r[c] for c in cols if c != r.get("source") and c in r]
    if r.get("kind") == kind and r.get("source") in cols and vals and r.get("reading") == reading:
      out[r["source"]] = float(np.mean(vals))
  return out


def _table2_claims(t2: Sequence[dict]) -> List[dict]:
  """Adversarial rows beat the smallest noise row of at least their distortion; the diagonal is 100%."""
  out, adv = [], _offdiag(t2, "adversarial")
  noise = [r for r in t2 if r.get("kind") == "noise"]
  if len(adv) > 1 and noise:
    parts, holds = [], True
    for src, e in adv.items():
      d = next(r["av_distortion"] for r in t2 if r.get("source") == src)
      ref = min([r for r in noise if r["stddev"] >= d] or [max(noise, key=lambda r: r["stddev"])],
                key=lambda r: r["stddev"])
      ne = float(np.mean([ref[c] for c in adv if c != src]))
      holds &= e > ne
      parts.append(f"{src} (distortion {d:.3f}): {100 * e:.1f}% vs noise stddev {ref['stddev']:g}: "
                   f"{100 * ne:.1f}%")
    out.append(_claim("Adversarial examples transfer to other models far more than Gaussian noise of the "
                      "same or larger stddev (Table 2).", holds,
                      "Mean error on the other models: " + "; ".join(parts) + "."))
  diag = [r[r["source"]] for r in t2 if r.get("kind") == "adversarial" and r["source"] in r]
  if diag:
    out.append(_claim("Every adversarial set has 100% error on the model it was made for (Table 2 diagonal).",
                      min(diag) >= 1.0, "Diagonal errors: " + ", ".join(f"{100 * v:.2f}%" for v in diag)
                      + "."))
  return out


def _table4_claims(t4: Sequence[dict]) -> List[dict]:
  """Per magnification reading: magnified sets beat noise of the same stddev and transfer more than the
  unmagnified sets."""
  out, up = [], _offdiag(t4, "adversarial")
  nl = [r for r in t4 if r.get("kind") == "noise" and r.get("block") == "lower"]
  readings = list(dict.fromkeys(r.get("reading") for r in t4 if r.get("kind") == "magnified"))
  for reading in readings:
    mag = _offdiag(t4, "magnified", reading)
    if not mag:
      continue
    mag_mean, tag = float(np.mean(list(mag.values()))), f" (magnified: {reading})" if reading else ""
    if len(up) > 1 and nl:
      noise_err = float(np.mean([nl[0][c] for c in up]))
      out.append(_claim(f"Magnified adversarial distortions transfer across training sets far more than "
                        f"Gaussian noise of the same stddev (Table 4){tag}.", min(mag.values()) > noise_err,
                        f"Mean off-diagonal error of the magnified sets {100 * mag_mean:.1f}% (per set: "
                        + ", ".join(f"{k} {100 * v:.1f}%" for k, v in mag.items())
                        + f") vs noise stddev {nl[0]['stddev']:g}: {100 * noise_err:.1f}%."))
    if up:
      up_mean = float(np.mean(list(up.values())))
      out.append(_claim(f"Adversarial examples remain hard for models trained on a disjoint training set, "
                        f"though less effective; magnification raises their transfer (Table 4){tag}.",
                        mag_mean > up_mean, f"Mean off-diagonal error {100 * up_mean:.1f}% at the original "
                        f"distortion, {100 * mag_mean:.1f}% magnified."))
  return out


def qualitative_claims(results: Mapping[str, Any], *,
                       lambda_order: Sequence[str] = LAMBDA_ORDER) -> List[dict]:
  """One dict per claim of the paper checkable on ``results`` (``table1``/``table2``/``table4`` -> rows of the
  table functions; ``lambda_order``: Table 1 names of one architecture by increasing weight decay): ``claim``
  (the paper's statement), ``holds`` (bool), ``evidence`` (a sentence with our numbers)."""
  out = _table2_claims(results.get("table2") or [])
  d = {r["model"]: r["av_min_distortion"] for r in results.get("table1") or [] if r["model"] in lambda_order}
  order = [n for n in lambda_order if n in d]
  if len(order) >= 2:
    out.append(_claim("Stronger weight decay (higher lambda) needs a larger minimum distortion (Table 1).",
                      all(d[b] > d[a] for a, b in zip(order, order[1:])),
                      ", ".join(f"{n}: {d[n]:.4f}" for n in order) + "."))
  return out + _table4_claims(results.get("table4") or [])


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
        stats = (float(np.nanmean(vals)), float(np.nanstd(vals))) if np.isfinite(vals).any() else None
        row[k], row[k + "_std"] = stats or (math.nan, math.nan)
      else:
        row[k] = v
    out.append(row)
  return out


def _adv_captions(a: AdversarialSet, pred: np.ndarray, k: int) -> List[str]:
  """Under each adversarial image: its true class, the attack's target and the source model's prediction."""
  return [f"true {y} > target {t}\npred {p}" for y, t, p in zip(a.labels[:k], a.targets[:k], pred[:k])]


def _pair_captions(first: Sequence[str], second: Sequence[str]) -> List[str]:
  """Captions of :func:`plotting.pairs_grid`'s layout (3 pairs per row) from per-example captions."""
  return [c for pair in zip(first, second) for c in pair]


def _fig7(out_dir, adversarial, models, names, pair_models, prefix, k, noise_stddev, seed, batch_size):
  """Figure 7 analogues: k (original, adversarial) pairs per pair model, then Gaussian noise."""
  figs = []
  acc = lambda nm, xs, ys: 100 * (1 - metrics.error_rate(*models[nm], xs, ys, batch_size=batch_size))
  for label, nm in zip("ab", pair_models):
    a = adversarial[nm]
    pred = metrics.predict(*models[nm], a.x_adv[:k], batch_size=batch_size)
    rel = os.path.join("figures", f"{prefix}_fig7{label}_{plotting.safe_name(nm)}.png")
    plotting.save_image_grid(plotting.pairs_grid(a.x[:k], a.x_adv[:k], ncols_pairs=3),
                             os.path.join(out_dir, rel), titles=["original", "adversarial"] * 3,
                             captions=_pair_captions([f"true {y}" for y in a.labels[:k]],
                                                     _adv_captions(a, pred, k)))
    figs.append((rel, f"Figure 7({label}) analogue: adversarial examples for {nm} (odd columns original, "
                      f"even columns adversarial; under each: true class > attack target, and {nm}'s "
                      f"prediction); av. distortion of these {k}: {a.distortion[:k].mean():.3f}; "
                      f"accuracy of {nm} on them: {acc(nm, a.x_adv[:k], a.labels[:k]):.0f}%."))
  a = adversarial[names[0]]
  xn = tables.noisy(seed, 3000, a.x, float(noise_stddev))
  accs = ", ".join(f"{nm} {acc(nm, xn, a.labels):.0f}%" for nm in pair_models)
  preds = {nm: metrics.predict(*models[nm], xn[:k], batch_size=batch_size) for nm in pair_models}
  noisy = [f"true {y}\npred " + ", ".join(str(p[i]) for p in preds.values())
           for i, y in enumerate(a.labels[:k])]
  rel = os.path.join("figures", f"{prefix}_fig7c_noise.png")
  plotting.save_image_grid(plotting.pairs_grid(a.x[:k], np.clip(xn[:k], 0.0, 1.0), ncols_pairs=3),
                           os.path.join(out_dir, rel), titles=["original", "noisy"] * 3,
                           captions=_pair_captions([f"true {y}" for y in a.labels[:k]], noisy))
  figs.append((rel, f"Figure 7(c) analogue: Gaussian noise with stddev={noise_stddev:g} (shown clipped to "
                    f"[0,1]; under each: true class and the prediction of {', '.join(pair_models)}, in "
                    f"that order); accuracy on all {a.x.shape[0]} noisy examples (unclipped): {accs} "
                    "(paper: 51%)."))
  return figs


def save_figures(out_dir: str, adversarial: Mapping[str, AdversarialSet], models: Mapping[str, Model], *,
                 prefix: str, pair_models: Optional[Sequence[str]] = None, noise_stddev: float = 1.0,
                 seed: int = 0, num_pairs: int = 12, num_triplet_examples: int = 2,
                 batch_size: int = 1000) -> List[Tuple[str, str]]:
  """Writes the MNIST figures of one group of adversarial sets as PNGs under ``out_dir/figures``; returns
  (path relative to ``out_dir``, caption) for each: the Figure 7 analogue (per pair model, default the
  first two, ``num_pairs`` (original, adversarial) pairs labelled with true class, target and the model's
  prediction; and Gaussian noise of ``noise_stddev``, paper 1.0, with those models' accuracy on it), the
  Figure 5 analogue (per model, (original | difference on a symmetric diverging scale | adversarial) for
  ``num_triplet_examples`` examples), and the per-model CDFs of the distortion."""
  if num_pairs < 3:
    raise ValueError(f"num_pairs must be >= 3, got {num_pairs}")
  names = [n for n in models if n in adversarial]
  if not names:
    raise ValueError("save_figures: no model has an adversarial set")
  pair_models = [n for n in (pair_models or names[:2]) if n in adversarial]
  os.makedirs(os.path.join(out_dir, "figures"), exist_ok=True)
  n = adversarial[names[0]].x.shape[0]
  k = min(num_pairs, n) // 3 * 3
  figs = _fig7(out_dir, adversarial, models, names, pair_models, prefix, k, noise_stddev, seed,
               batch_size) if k >= 3 else []
  t = min(num_triplet_examples, n)
  sets = [adversarial[nm] for nm in names]
  captions = [c for nm, a in zip(names, sets)
              for c in _adv_captions(a, metrics.predict(*models[nm], a.x_adv[:t], batch_size=batch_size), t)]
  rel = os.path.join("figures", f"{prefix}_fig5_triplets.png")
  plotting.save_difference_grid(np.stack([a.x[:t] for a in sets]), np.stack([a.x_adv[:t] for a in sets]),
                                os.path.join(out_dir, rel), row_labels=names, captions=captions)
  figs.append((rel, "Figure 5 analogue: per model, (original | difference x_adv - x | adversarial, with true "
                    "class > target and the model's prediction) for the same examples and targets; the "
                    "differences share one symmetric colour scale (blue darker, red brighter)."))
  rel = os.path.join("figures", f"{prefix}_distortion_cdf.png")
  plotting.save_cdfs({nm: adversarial[nm].distortion for nm in names}, os.path.join(out_dir, rel),
                     xlabel="RMS distortion per example", title=f"{prefix}: minimum distortion per model")
  figs.append((rel, "Empirical CDF of the per-example minimum distortion of each model (a curve further "
                    "right: larger distortions needed)."))
  return figs


def _cell(row: Mapping[str, Any], key: str, paper_value: Any, pct: bool) -> str:
  """'ours / paper', or 'ours' when ``paper_value`` is ``...`` (no paper column). Ours is the mean ± s.d.
  over seeds when ``<key>_std`` is present; a missing value reads n/a, a missing paper value –."""
  v, std = row.get(key), row.get(key + "_std")
  scale, fmt, unit = (100, ".3g", "%") if pct else (1, ".3f", "")
  ours = "n/a"
  if not (v is None or (isinstance(v, float) and math.isnan(v))):
    spread = f" ± {scale * std:.2g}" if std is not None and np.isfinite(std) else ""
    ours = f"{scale * v:{fmt}}{unit}{spread}"
  if paper_value is ...:
    return ours
  if paper_value is None:
    return f"{ours} / –"
  return f"{ours} / " + (f"{100 * paper_value:.3g}%" if pct else f"{paper_value:.3g}")


def _paper_key(row: Mapping[str, Any]) -> str:
  """The key of a Table 2/4 row in ``PAPER_TABLE2``/``PAPER_TABLE4``."""
  if row.get("kind") == "noise":
    return f"noise:{row['block']}" if "block" in row else f"noise:{row['stddev']:g}"
  if row.get("kind") == "magnified":
    return f"magnified:{row.get('source')}"
  return row.get("source", "")


def _matrix_rows(rows: Sequence[dict], paper: Mapping[str, Mapping[str, float]]) -> List[dict]:
  cols = [r["source"] for r in rows if r.get("kind") == "adversarial"]
  return [{"row": r["row"], **{c: _cell(r, c, p.get(c), True) for c in cols},
           "av. distortion": _cell(r, "av_distortion", p.get("av_distortion"), False)}
          for r, p in ((r, paper.get(_paper_key(r), {})) for r in rows)]


# Report columns of Tables 1 and 3: (header, row key, key of the paper's value or None, percentage). A
# column whose key no row has (the refine=False ones without ``config.unrefined``) is left out.
_T1_COLUMNS = (("train error", "train_error", "train_error", True),
               ("test error", "test_error", "test_error", True),
               ("av. min. distortion", "av_min_distortion", "av_min_distortion", False),
               ("av. min. distortion, paper's method (refine=False)", "av_min_distortion_unrefined",
                "av_min_distortion", False),
               ("av. distortion (orig. correct)", "av_distortion_correct", None, False),
               ("attack success", "success_rate", None, True),
               ("success, refine=False", "success_rate_unrefined", None, True))
_T3_COLUMNS = (("error on P1", "error_p1", "error_p1", True), ("error on P2", "error_p2", "error_p2", True),
               ("error on test", "error_test", "error_test", True),
               ("min av. distortion", "min_av_distortion", "min_av_distortion", False),
               ("min av. distortion, refine=False", "min_av_distortion_unrefined", "min_av_distortion",
                False),
               ("attack success", "success_rate", None, True))
# Columns of the magnified-diagonal breakdown (tables.magnified_diagonal): (header, key, percentage).
_DIAG_COLUMNS = (("reading", "reading", False), ("clipped to [0,1]", "clip", False),
                 ("diagonal error", "error", True), ("pred. = target", "pred_target", True),
                 ("pred. = true label", "pred_true", True), ("shrunk", "shrunk_fraction", True),
                 ("error, shrunk", "error_shrunk", True), ("error, grown", "error_grown", True),
                 ("error before magnifying", "error_unmagnified", True))


def _model_rows(rows: Sequence[dict], paper: Mapping[str, Mapping[str, float]], columns) -> List[dict]:
  columns = [c for c in columns if any(c[1] in r for r in rows)]
  return [{"model": r["model"], **{h: _cell(r, k, paper.get(r["model"], {}).get(pk) if pk else ..., pct)
                                   for h, k, pk, pct in columns}} for r in rows]


def _asymmetry(t4: Sequence[dict], a: str = "FC100-100-10", b: str = "FC123-456-10") -> Optional[str]:
  """A sentence on the transfer between ``a`` and ``b`` in both directions, ours and the paper's."""
  by = {(r.get("kind"), r.get("reading"), r.get("source")): r for r in t4}
  parts = []
  for kind, reading, label in (("adversarial", None, "at the original distortion"),
                               ("magnified", "per_example", "magnified, each example rescaled"),
                               ("magnified", "per_set", "magnified, one factor per set")):
    ra, rb = by.get((kind, reading, a)), by.get((kind, reading, b))
    if ra and rb and b in ra and a in rb:
      pa = PAPER_TABLE4.get(a if kind == "adversarial" else f"magnified:{a}", {}).get(b)
      pb = PAPER_TABLE4.get(b if kind == "adversarial" else f"magnified:{b}", {}).get(a)
      parts.append(f"{label}: {a} -> {b} {_cell(ra, b, pa, True)}, {b} -> {a} {_cell(rb, a, pb, True)}")
  return ("Transfer between the two P1 models in both directions (ours / paper): " + "; ".join(parts) + ".") \
      if parts else None


def _diagonal_finding(rows: Sequence[dict]) -> str:
  """What the magnified-diagonal breakdown shows, in one paragraph of measured ranges (unclipped rows)."""
  rng = lambda rs, k: (f"{100 * min(r[k] for r in rs):.1f}-{100 * max(r[k] for r in rs):.1f}%"
                       if rs and all(np.isfinite(r[k]) for r in rs) else "n/a")
  each = [r for r in rows if r.get("reading") == "per_example" and not r.get("clip")]
  one = [r for r in rows if r.get("reading") == "per_set" and not r.get("clip")]
  text = []
  if each:
    text.append(f"Each example rescaled: diagonal {rng(each, 'error')} over the source models. It shrinks "
                f"{rng(each, 'shrunk_fraction')} of the perturbations (those larger than 0.1), of which "
                f"{rng(each, 'error_shrunk')} stay misclassified; of the grown ones "
                f"{rng(each, 'error_grown')} stay misclassified.")
  if one:
    text.append(f"One factor per set (no perturbation shrinks): diagonal {rng(one, 'error')}.")
  return " ".join(text) + " Clipped rows: see the table. Details: notes/tables.md."


def _add_tables(rep: Any, results: Mapping[str, Any]) -> None:
  if results.get("table1"):
    rep.heading("Table 1: models, errors and average minimum distortion (training-set examples)")
    rows = [dict(o, **{"failed / attacked": f"{r.get('num_failed', 0):.0f} / {r.get('num_attacked', 0):.0f}"})
            for o, r in zip(_model_rows(results["table1"], PAPER_TABLE1, _T1_COLUMNS), results["table1"])]
    rep.table(rows, caption="Table 1 (ours / paper). Distortion averaged over all attacked examples (A6); "
              "failures are counted, not dropped (A7). 'av. min. distortion' is the attack's default, the "
              "paper's c search followed by a refinement at the best c found (attack.AttackOptions.refine); "
              "the refine=False column, where present, is the paper's method alone on the same examples "
              "and targets.")
  if results.get("table2"):
    rep.heading("Table 2: cross-model generalisation (rows: examples made for; columns: model evaluated)")
    rep.table(_matrix_rows(results["table2"], PAPER_TABLE2), caption="Table 2 (ours / paper): error of the "
              "column model on the row's distorted training examples, against the true labels (A9).")
  if results.get("table3"):
    rep.heading("Table 3: models for cross-training-set generalisation (clean errors)")
    rep.table(_model_rows(results["table3"], PAPER_TABLE3, _T3_COLUMNS),
              caption="Table 3 (ours / paper). Distortion of the test-set adversarial examples.")
  t4 = results.get("table4")
  if t4:
    rep.heading("Table 4: cross-training-set generalisation (test-set examples)")
    rep.table(_matrix_rows(t4, PAPER_TABLE4), caption="Table 4 (ours / paper). Upper block: the adversarial "
              "sets and Gaussian noise of their mean stddev. Lower block: the perturbations magnified to "
              "stddev 0.1 under two readings of the paper (A11): each example's perturbation rescaled to an "
              "RMS of 0.1 (larger ones shrink), and one factor per set, 0.1 / the set's mean RMS (every "
              "perturbation grows; the set's mean RMS becomes 0.1); then Gaussian noise of stddev 0.1. Both "
              "readings are compared with the paper's one printed lower block.")
    mags = [r for r in t4 if r.get("kind") == "magnified" and r.get("reading") == "per_set"
            and np.isfinite(r.get("magnification", np.nan))]
    if mags:
      rep.paragraph("Magnification factor of the per-set reading (0.1 / the set's av. distortion): "
                    + ", ".join(f"{r['source']} x{r['magnification']:.2f}" for r in mags)
                    + ". The paper says 'on average by 40%, from stddev 0.06 to 0.1' (which would be +67%).")
    sentence = _asymmetry(t4)
    if sentence:
      rep.paragraph(sentence)
  if results.get("table4_diagonal"):
    rep.heading("Table 4's magnified diagonal: each model on its own magnified set")
    cells = lambda r: {h: _cell(r, k, ..., True) if pct else str(r.get(k)) for h, k, pct in _DIAG_COLUMNS}
    rep.table([{"model": r["source"], **cells(r)} for r in results["table4_diagonal"]],
              caption="Per source model, reading and box clipping: its error on its own magnified set "
              "(paper: 100%), the fractions predicted as the attack's target and as the true label, and the "
              "error "
              "split by whether the magnification shrinks the example's perturbation (per-example reading: "
              "the examples whose attack distortion exceeds 0.1).")
    rep.paragraph(_diagonal_finding(results["table4_diagonal"]))


# Columns of the certified bracket (certify.bracket): (header, key, percentage; None: a plain number).
_BRACKET_COLUMNS = (("certified radius", "certified", None), ("certified toward the target",
                    "certified_to_target", None), ("attack distortion", "attack", None),
                    ("ratio", "ratio", None), ("violations", "violations", None),
                    ("certified acc. L2 0.3", "certified_accuracy_0.3", True),
                    ("certified acc. L2 1", "certified_accuracy_1", True),
                    ("largest L_ij", "pair_bound", None), ("product of layer bounds", "global_bound", None))


def _add_bracket(rep: Any, results: Mapping[str, Any]) -> None:
  fmt = lambda r, k, pct: (_cell(r, k, ..., pct) if pct is not None else
                           (f"{r[k]:.0f}" if k == "violations" else f"{r[k]:.3g}"))
  for key, what in (("bracket_train", "Table 1 models, training-set examples"),
                    ("bracket_test", "Table 3 models, test-set examples")):
    if not results.get(key):
      continue
    rep.heading(f"Certified radius <= minimal distortion <= attack ({what})")
    rep.table([{"model": r["model"], **{h: fmt(r, k, pct) for h, k, pct in _BRACKET_COLUMNS}}
               for r in results[key]],
              caption="Means over the attacked examples, RMS units (L2 / sqrt(784)). Certified radius: the "
              "margin of the predicted class over each other class divided by the Lipschitz bound of that "
              "logit difference (the product of the layer bounds, the last layer's replaced by the exact "
              "norm of the pair's weight difference; intriguing_jax.certify). Toward the target: the same "
              "for the attack's target only, a lower bound on the targeted minimal distortion; ratio: its "
              "mean over the attack's mean. Violations: successful attacks closer than the certified radius "
              "toward their target (must be 0). Certified accuracy: correct and certified at that L2 "
              "radius (pixels in [0, 1]).")


def build_report(results: Mapping[str, Any], *, figures: Sequence[Tuple[str, str]] = (),
                 title: str = "Intriguing properties of neural networks: Tables 1-4 on MNIST") -> Any:
  """A :class:`intriguing_jax.report.Report` (``.write(out_dir, "report")``) of every table in ``results``,
  ours beside the paper's. ``results``: ``table1``..``table4`` rows (possibly aggregated over seeds),
  optional ``claims`` (:func:`qualitative_claims`), ``config`` (settings dict), ``timings`` (name ->
  seconds), ``notes`` (str list); ``figures``: (relative PNG path, caption) pairs (:func:`save_figures`)."""
  rep = report.Report(title)
  if results.get("config"):
    rep.paragraph("Settings:")
    rep.bullets([f"{k}: {v}" for k, v in results["config"].items()])
  rep.paragraph("Every cell reads 'ours / paper'. Errors are percentages; distortions are RMS pixel changes "
                "(pixels in [0,1]). With several seeds, ours is the mean ± std over seeds.")
  for note in results.get("notes") or ():
    rep.paragraph(note)
  if results.get("claims"):
    rep.heading("The paper's qualitative claims, checked on our numbers")
    rep.bullets([f"{'HOLDS' if c['holds'] else 'DOES NOT HOLD'}: {c['claim']} {c['evidence']}"
                 for c in results["claims"]])
  _add_tables(rep, results)
  _add_bracket(rep, results)
  if figures:
    rep.heading("Figures")
    for rel, cap in figures:
      rep.image(rel, caption=cap)
  rep.heading("Readings chosen where the paper is ambiguous (paper.md §9)")
  rep.bullets(list(READINGS))
  if results.get("timings"):
    rep.heading("Wall time of the invocation that wrote this report")
    rep.paragraph("Models and attack chunks found finished in the workdir are restored, not recomputed, and "
                  "cost (almost) no time here; the first run's times are in its log.")
    rep.bullets([f"{k}: {v:.1f} s" for k, v in results["timings"].items()])
  return rep
