"""Tables 1-4 of the paper as pure functions of given models and adversarial sets.

Usage::

    from intriguing_jax import tables
    models = {"FC10(10^-4)": tables.Model(model.apply, variables), ...}     # apply_fn(params, x) -> logits
    idx = tables.select_examples(len(y_train), 1000, seed=0)               # seeded subset (A6)
    targets = tables.draw_targets(y_train, seed=0)[idx]                     # one wrong label each (A5)
    adv = reproduce.adversarial_sets(models, x_train[idx], y_train[idx], targets)   # or your own sets
    rows1 = tables.table1(models, adv, (x_train, y_train), (x_test, y_test))
    rows2 = tables.table2(models, adv, seed=0)                              # matrix + Gaussian-noise rows
    rows3 = tables.table3(p_models, adv_test, p1, p2, (x_test, y_test))
    rows4 = tables.table4(p_models, adv_test, seed=0)                       # + magnified rows (RMS 0.1)

Conventions (paper.md §9; ``paper.READINGS``): errors are plain error rates against the *true* labels
(A9); attack failures stay in the sets (A7); distortion is the per-example RMS pixel change, averaged over
examples (A8); Gaussian noise and magnified perturbations are not clipped by default (A10, A11).
"""

from __future__ import annotations

from typing import Any, Callable, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import jax
import numpy as np

from intriguing_jax import attack
from intriguing_jax import metrics

ArrayPair = Tuple[Any, Any]


class Model(NamedTuple):
  """A classifier: ``apply_fn(params, x) -> logits [B, K]`` (for Flax, ``model.apply`` and the variables)."""
  apply_fn: Callable
  params: Any


class AdversarialSet(NamedTuple):
  """One model's adversarial set (paper §4.2): the originals, their targets and the attack outputs."""
  x: np.ndarray              # [N, ...] original images in [0, 1]
  labels: np.ndarray         # [N] int32 true labels
  targets: np.ndarray        # [N] int32 attack targets (never the true label)
  x_adv: np.ndarray          # [N, ...] adversarial images
  success: np.ndarray        # [N] bool: the source model predicts the target on x_adv
  distortion: np.ndarray     # [N] float32 RMS distortion sqrt(mean((x_adv - x)^2))
  c: np.ndarray              # [N] penalty weight found by the attack's c search
  clean_correct: np.ndarray  # [N] bool: the source model classifies x correctly


def select_examples(num_total: int, num_examples: Optional[int], *, seed: int = 0) -> np.ndarray:
  """Indices of the examples to attack: all of them (in order), or a seeded random subset (A6).

  The subset is the first ``num_examples`` entries of one seeded permutation of ``range(num_total)``, so a
  larger request extends a smaller one. Returns [num_examples] int64 indices.
  """
  if num_total < 1:
    raise ValueError(f"num_total must be >= 1, got {num_total}")
  if num_examples is None:
    return np.arange(num_total)
  if not 1 <= num_examples <= num_total:
    raise ValueError(f"num_examples must be in [1, {num_total}], got {num_examples}")
  return np.random.default_rng(seed).permutation(num_total)[:num_examples]


def draw_targets(labels: Any, *, seed: int = 0, num_classes: int = 10) -> np.ndarray:
  """One target per example, uniform over the ``num_classes - 1`` wrong labels (A5).

  ``target_i = (labels_i + o_i) mod num_classes`` with ``o_i`` uniform in [1, num_classes) from a seeded
  generator, so the target of example i depends only on (seed, i, labels_i). Returns [N] int32.
  """
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be a 1-d integer array, got shape {labels.shape} dtype {labels.dtype}")
  if num_classes < 2:
    raise ValueError(f"num_classes must be >= 2, got {num_classes}")
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"labels must lie in [0, {num_classes}), got range [{labels.min()}, {labels.max()}]")
  offsets = np.random.default_rng(seed).integers(1, num_classes, size=labels.shape[0])
  return ((labels + offsets) % num_classes).astype(np.int32)


def rms(x: Any, x_adv: Any) -> np.ndarray:
  """[N] float32 per-example RMS distortion sqrt(mean((x_adv - x)^2)), computed in float64 (A8)."""
  d = (np.asarray(x_adv, np.float64) - np.asarray(x, np.float64)).reshape(np.shape(x)[0], -1)
  return np.sqrt(np.mean(d * d, axis=1)).astype(np.float32)


def _mean(v: np.ndarray) -> float:
  return float(np.mean(v)) if v.size else float("nan")


def _check_sets(models: Mapping[str, Model], adversarial: Mapping[str, AdversarialSet], where: str,
                same_examples: bool = False) -> None:
  missing = [m for m in models if m not in adversarial]
  if not models or missing:
    raise ValueError(f"{where}: models is empty" if not models else
                     f"{where}: adversarial has no set for model(s) {missing}")
  first, *rest = list(models)
  for nm in rest if same_examples else ():
    if adversarial[nm].x.shape != adversarial[first].x.shape or not np.array_equal(adversarial[nm].labels,
                                                                                  adversarial[first].labels):
      raise ValueError(f"{where}: the adversarial sets of {first!r} and {nm!r} are not made from the same "
                       "examples")


def noisy(seed: int, k: int, x: np.ndarray, stddev: float, clip: bool = False) -> np.ndarray:
  """x (float images) plus Gaussian noise of ``stddev`` drawn with the key ``fold_in(PRNGKey(seed), k)``."""
  if not np.issubdtype(np.asarray(x).dtype, np.floating):
    raise ValueError(f"noisy: x must be float images (e.g. in [0, 1]), got dtype {np.asarray(x).dtype}")
  key = jax.random.fold_in(jax.random.PRNGKey(seed), k)
  return np.asarray(attack.gaussian_noise(key, jax.numpy.asarray(x), stddev, clip=clip), np.float32)


def _matrix_row(models, x, x_dist, labels, batch_size, distortion=None, **fields) -> dict:
  """A Table 2/4 row: ``fields``, the plain error rate of every column model on (x_dist, labels), and the
  mean RMS distortion (of ``distortion`` [N] when given, else ``rms(x, x_dist)``)."""
  errors = {col: metrics.error_rate(m.apply_fn, m.params, x_dist, labels, batch_size=batch_size)
            for col, m in models.items()}
  return dict(fields, **errors, av_distortion=_mean(rms(x, x_dist) if distortion is None else distortion))


def table1(models: Mapping[str, Model], adversarial: Mapping[str, AdversarialSet], train: ArrayPair,
           test: ArrayPair, *, batch_size: int = 1000) -> List[dict]:
  """Table 1: training/test error and average minimum distortion of each model.

  ``adversarial``: name -> AdversarialSet (of training images in the paper); ``train``, ``test``: (images
  [N, ...], labels [N]). One dict per model: ``model``, ``train_error``, ``test_error``,
  ``av_min_distortion`` (mean over all attacked examples), ``av_distortion_correct`` (over those the model
  classified correctly), ``av_distortion_success`` (over successes), ``success_rate``, ``num_attacked``,
  ``num_failed``, ``mean_log10_c`` (over the finite positive c).
  """
  _check_sets(models, adversarial, "table1")
  rows = []
  for name, m in models.items():
    a = adversarial[name]
    c = a.c[np.isfinite(a.c) & (a.c > 0)]
    rows.append({
        "model": name,
        "train_error": metrics.error_rate(m.apply_fn, m.params, train[0], train[1], batch_size=batch_size),
        "test_error": metrics.error_rate(m.apply_fn, m.params, test[0], test[1], batch_size=batch_size),
        "av_min_distortion": _mean(a.distortion),
        "av_distortion_correct": _mean(a.distortion[a.clean_correct]),
        "av_distortion_success": _mean(a.distortion[a.success]),
        "success_rate": _mean(a.success.astype(np.float64)),
        "num_attacked": int(a.x.shape[0]),
        "num_failed": int(np.sum(~a.success)),
        "mean_log10_c": _mean(np.log10(c)),
    })
  return rows


def table2(models: Mapping[str, Model], adversarial: Mapping[str, AdversarialSet], *,
           noise_stddevs: Sequence[float] = (0.1, 0.3), clip_noise: bool = False, seed: int = 0,
           batch_size: int = 1000) -> List[dict]:
  """Table 2: cross-model generalisation, the adversarial set made for model i fed to model j.

  ``models`` are the rows and the columns; ``adversarial`` holds one set per model, of the same examples.
  Reference rows add Gaussian noise of each of ``noise_stddevs`` to the examples (noise i: key
  ``fold_in(PRNGKey(seed), 1000 + i)``; clipped to [0, 1] only with ``clip_noise``, A10). One dict per row:
  ``row`` (the source model, or "Gaussian noise, stddev=s"), ``kind`` ("adversarial" | "noise"), ``source``
  (model name or None), ``stddev`` (noise only), the error of each column model (A9), ``av_distortion``.
  """
  _check_sets(models, adversarial, "table2", same_examples=True)
  for s in noise_stddevs:
    if not s > 0:
      raise ValueError(f"noise_stddevs must be positive, got {s}")
  rows = []
  for src in models:
    a = adversarial[src]
    rows.append(_matrix_row(models, a.x, a.x_adv, a.labels, batch_size, a.distortion, row=src,
                            kind="adversarial", source=src))
  x, labels = adversarial[next(iter(models))].x, adversarial[next(iter(models))].labels
  for i, s in enumerate(noise_stddevs):
    xn = noisy(seed, 1000 + i, x, float(s), clip_noise)
    rows.append(_matrix_row(models, x, xn, labels, batch_size, row=f"Gaussian noise, stddev={s:g}",
                            kind="noise", source=None, stddev=float(s)))
  return rows


def table3(models: Mapping[str, Model], adversarial: Mapping[str, AdversarialSet], p1: ArrayPair,
           p2: ArrayPair, test: ArrayPair, *, batch_size: int = 1000) -> List[dict]:
  """Table 3: the P1/P2 models' errors on P1, P2 and the test set, and their min. av. distortion.

  ``adversarial``: name -> AdversarialSet of *test* images (paper §4.2); ``p1``, ``p2``, ``test``: (images,
  labels). One dict per model: ``model``, ``error_p1``, ``error_p2``, ``error_test``, ``min_av_distortion``,
  ``av_distortion_correct``, ``success_rate``, ``num_failed``.
  """
  _check_sets(models, adversarial, "table3")
  rows = []
  for name, m in models.items():
    a = adversarial[name]
    err = lambda d, m=m: metrics.error_rate(m.apply_fn, m.params, d[0], d[1], batch_size=batch_size)
    rows.append({"model": name, "error_p1": err(p1), "error_p2": err(p2), "error_test": err(test),
                 "min_av_distortion": _mean(a.distortion),
                 "av_distortion_correct": _mean(a.distortion[a.clean_correct]),
                 "success_rate": _mean(a.success.astype(np.float64)), "num_failed": int(np.sum(~a.success))})
  return rows


MAGNIFY_READINGS = ("per_example", "per_set")
_READING_TEXT = {"per_example": "each example rescaled", "per_set": "one factor per set"}


def magnify(x: Any, x_adv: Any, magnify_to: float, reading: str, *, clip: bool = False) -> np.ndarray:
  """Table 4's magnified images (A11) of the perturbations ``x_adv - x`` ([N, ...] each), two readings.

  ``"per_example"``: ``x + magnify_to (x' - x) / RMS(x' - x)``, every perturbation rescaled to an RMS of
  ``magnify_to`` (perturbations larger than ``magnify_to`` shrink). ``"per_set"``: ``x + f (x' - x)`` with
  one factor ``f = magnify_to / mean RMS(x' - x)`` for the whole set ("magnifies the distortion on average
  ... to 0.1"): the set's *mean* RMS becomes ``magnify_to`` and every perturbation grows when f > 1.
  ``clip`` clips the result to [0, 1]. Returns float32 [N, ...].
  """
  if reading not in MAGNIFY_READINGS:
    raise ValueError(f"reading must be one of {MAGNIFY_READINGS}, got {reading!r}")
  if not magnify_to > 0:
    raise ValueError(f"magnify_to must be positive, got {magnify_to}")
  x, x_adv = np.asarray(x, np.float32), np.asarray(x_adv, np.float32)
  if reading == "per_example":
    return np.asarray(attack.scale_perturbation(jax.numpy.asarray(x), jax.numpy.asarray(x_adv),
                                                float(magnify_to), clip=clip), np.float32)
  d = _mean(rms(x, x_adv))
  out = x + (magnify_to / d if d > 0 else 0.0) * (x_adv - x)
  return np.clip(out, 0.0, 1.0) if clip else out


def _shrunk(distortion: np.ndarray, magnify_to: float, reading: str) -> np.ndarray:
  """[N] bool: the examples whose perturbation :func:`magnify` scales by a factor below 1."""
  if reading == "per_example":
    return distortion > magnify_to
  return np.full(distortion.shape, _mean(distortion) > magnify_to)


def table4(models: Mapping[str, Model], adversarial: Mapping[str, AdversarialSet], *, magnify_to: float = 0.1,
           readings: Sequence[str] = MAGNIFY_READINGS, noise_stddev: Optional[float] = None,
           clip: bool = False, seed: int = 0, batch_size: int = 1000) -> List[dict]:
  """Table 4: cross-training-set generalisation, plain and magnified, with Gaussian-noise references.

  Upper block: each model's adversarial set fed to every model, then Gaussian noise of stddev
  ``noise_stddev`` (None: the measured mean distortion of the sets, the paper's 0.06; key
  ``fold_in(PRNGKey(seed), 2000)``). Lower block: for each of ``readings`` (:func:`magnify`), the same
  perturbations magnified to ``magnify_to``, then Gaussian noise of stddev ``magnify_to`` (key
  ``fold_in(PRNGKey(seed), 2001)``). ``clip`` clips noisy and magnified images to [0, 1].

  Returns:
    One dict per row: ``row``, ``kind`` ("adversarial" | "noise" | "magnified"), ``block`` ("upper" |
    "lower"), ``source``, ``stddev`` (noise rows), the error of each column model, ``av_distortion``
    (measured); magnified rows also ``reading``, ``magnification`` (``magnify_to`` / the set's mean
    distortion) and ``shrunk_fraction`` (examples whose perturbation the reading makes smaller).
  """
  _check_sets(models, adversarial, "table4", same_examples=True)
  if noise_stddev is not None and not noise_stddev > 0:
    raise ValueError(f"noise_stddev must be positive or None, got {noise_stddev}")
  if not readings or not set(readings) <= set(MAGNIFY_READINGS):
    raise ValueError(f"readings must be a non-empty subset of {MAGNIFY_READINGS}, got {readings}")
  x, labels = adversarial[next(iter(models))].x, adversarial[next(iter(models))].labels
  upper, lower = [], []
  for src in models:
    a = adversarial[src]
    d = _mean(a.distortion)
    upper.append(_matrix_row(models, a.x, a.x_adv, a.labels, batch_size, a.distortion,
                             row=f"Distorted for {src} (av. stddev={d:.3g})", kind="adversarial",
                             block="upper", source=src))
  for reading in readings:
    for src in models:
      a = adversarial[src]
      d = _mean(a.distortion)
      xm = magnify(a.x, a.x_adv, magnify_to, reading, clip=clip)
      lower.append(_matrix_row(
          models, a.x, xm, a.labels, batch_size, kind="magnified", block="lower", source=src, reading=reading,
          row=f"Distorted for {src} amplified to stddev={magnify_to:g} ({_READING_TEXT[reading]})",
          magnification=magnify_to / d if d > 0 else float("nan"),
          shrunk_fraction=_mean(_shrunk(a.distortion, magnify_to, reading).astype(np.float64))))
  s_up = float(np.mean([r["av_distortion"] for r in upper])) if noise_stddev is None else float(noise_stddev)
  s_low = float(magnify_to)
  for rows, s, k, text in ((upper, s_up, 2000, f"{s_up:.3g}"), (lower, s_low, 2001, f"{magnify_to:g}")):
    xn = noisy(seed, k, x, s, clip)
    rows.append(_matrix_row(models, x, xn, labels, batch_size, row=f"Gaussian noise with stddev={text}",
                            kind="noise", block=rows[0]["block"], source=None, stddev=s))
  return upper + lower


def magnified_diagonal(models: Mapping[str, Model], adversarial: Mapping[str, AdversarialSet], *,
                       magnify_to: float = 0.1, readings: Sequence[str] = MAGNIFY_READINGS,
                       clips: Sequence[bool] = (False, True), batch_size: int = 1000) -> List[dict]:
  """Why Table 4's magnified diagonal falls short of 100 %: each source model on its own magnified set.

  For every reading (:func:`magnify`) and box clipping in ``clips``, one dict per source: ``row``,
  ``source``, ``reading``, ``clip``, ``error`` (the diagonal cell), ``pred_target`` / ``pred_true`` (the
  fractions predicted as the attack's target / the true label), and, splitting the examples by whether
  the magnification shrinks their perturbation (``shrunk_fraction``), ``error_shrunk`` and
  ``error_grown``; ``error_unmagnified`` is the source's error on its plain adversarial set.
  """
  _check_sets(models, adversarial, "magnified_diagonal")
  out = []
  for reading in readings:
    for clip in clips:
      for src, m in models.items():
        a = adversarial[src]
        pred = metrics.predict(m.apply_fn, m.params, magnify(a.x, a.x_adv, magnify_to, reading, clip=clip),
                               batch_size=batch_size)
        wrong = pred != a.labels
        shrunk = _shrunk(a.distortion, magnify_to, reading)
        adv_pred = metrics.predict(m.apply_fn, m.params, a.x_adv, batch_size=batch_size)
        out.append({"row": f"{src} | {reading} | clip={clip}", "source": src, "reading": reading,
                    "clip": bool(clip), "error": _mean(wrong.astype(np.float64)),
                    "pred_target": _mean((pred == a.targets).astype(np.float64)),
                    "pred_true": _mean((~wrong).astype(np.float64)),
                    "shrunk_fraction": _mean(shrunk.astype(np.float64)),
                    "error_shrunk": _mean(wrong[shrunk].astype(np.float64)),
                    "error_grown": _mean(wrong[~shrunk].astype(np.float64)),
                    "error_unmagnified": _mean((adv_pred != a.labels).astype(np.float64))})
  return out
