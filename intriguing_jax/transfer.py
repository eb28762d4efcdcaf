"""Tables 1-4 of the paper on MNIST: minimum distortion, cross-model and cross-training-set transfer.

Usage::

    import jax
    from intriguing_jax import transfer, transfer_report
    models = {"FC10(10^-4)": (model.apply, variables), "FC100-100-10": logits_fn}   # or name -> logits_fn
    idx = transfer.select_examples(len(y_train), 1000, seed=0)          # seeded subset of the named set
    targets = transfer.draw_targets(y_train, seed=0)[idx]                # one wrong label per example (A5)
    adv = transfer.adversarial_sets(models, x_train[idx], y_train[idx], targets,
                                    cache_dir="runs/mnist/attacks/train")   # resumable, chunked
    rows1 = transfer.table1(models, (x_train, y_train), (x_test, y_test), adversarial=adv)
    rows2 = transfer.table2(models, adversarial=adv, seed=0)            # matrix + Gaussian-noise rows
    rows3 = transfer.table3(p_models, (x1, y1), (x2, y2), (x_test, y_test), adversarial=adv_test)
    rows4 = transfer.table4(p_models, adversarial=adv_test, seed=0)     # + magnified rows (RMS 0.1)
    claims = transfer_report.qualitative_claims({"table1": rows1, "table2": rows2, "table4": rows4})
    transfer_report.build_report({"table1": rows1, ..., "claims": claims}).write("runs/mnist", "report")

Every table function also builds its adversarial sets itself when ``adversarial`` is not given (pass the
data and, optionally, ``num_examples``, ``seed``, ``attack_fn``, ``attack_options``, ``cache_dir``,
``chunk_size``), so one call reruns one experiment on your own models.

Conventions (paper.md §9; the report lists them as "readings"):

* The attacked examples are a seeded random subset of the named set (the whole set by default): the
  training set for Tables 1-2, the test set for Tables 3-4 (A6). Each example gets one target drawn
  uniformly from its 9 wrong labels with a seeded RNG, the same target for every model (A5).
* Errors in the transfer matrices are plain error rates against the *true* labels (A9). Attack failures
  stay in the sets: the diagonal shows them as < 100% and Table 1 reports the success rate (A7).
* Distortion is the per-example RMS pixel change, averaged over examples (A8); Table 1 also gives the
  average over the examples the model originally classified correctly (A6).
* Gaussian noise is not clipped by default, so its distortion equals its stddev (A10); Table 4's magnified
  rows rescale each perturbation to an RMS of 0.1 (A11).

Attacks run in chunks through :func:`run_attack_cached`; every finished chunk is written atomically to the
cache directory together with a fingerprint of its inputs (images, targets, model parameters, attack
options), so a rerun after an interruption recomputes only the missing chunks.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import time
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

from absl import logging
import jax
import numpy as np

from intriguing_jax import checkpoint
from intriguing_jax import distributed
from intriguing_jax import metrics
from intriguing_jax.types import LogitsFn

ModelLike = Union[LogitsFn, Tuple[Callable, Any]]
Models = Mapping[str, ModelLike]
ArrayPair = Tuple[Any, Any]

# --------------------------------------------------------------------------------------------------
# The paper's numbers (paper.md §7, typed from the printed tables). Errors and success are fractions.
# --------------------------------------------------------------------------------------------------

PAPER_TABLE1 = {
    "FC10(10^-4)": {"train_error": 0.067, "test_error": 0.074, "av_min_distortion": 0.062},
    "FC10(10^-2)": {"train_error": 0.10, "test_error": 0.094, "av_min_distortion": 0.1},
    "FC10(1)": {"train_error": 0.212, "test_error": 0.20, "av_min_distortion": 0.14},
    "FC100-100-10": {"train_error": 0.0, "test_error": 0.0164, "av_min_distortion": 0.058},
    "FC200-200-10": {"train_error": 0.0, "test_error": 0.0154, "av_min_distortion": 0.065},
    "AE400-10": {"train_error": 0.0057, "test_error": 0.019, "av_min_distortion": 0.086},
}
_T2_COLS = ("FC10(10^-4)", "FC10(10^-2)", "FC10(1)", "FC100-100-10", "FC200-200-10", "AE400-10")
PAPER_TABLE2 = {  # row (examples made for / noise) -> column model -> error; "av_distortion".
    "FC10(10^-4)": dict(zip(_T2_COLS, (1.0, 0.117, 0.227, 0.02, 0.039, 0.027)), av_distortion=0.062),
    "FC10(10^-2)": dict(zip(_T2_COLS, (0.871, 1.0, 0.352, 0.359, 0.273, 0.098)), av_distortion=0.1),
    "FC10(1)": dict(zip(_T2_COLS, (0.719, 0.762, 1.0, 0.481, 0.47, 0.344)), av_distortion=0.14),
    "FC100-100-10": dict(zip(_T2_COLS, (0.289, 0.137, 0.211, 1.0, 0.066, 0.02)), av_distortion=0.058),
    "FC200-200-10": dict(zip(_T2_COLS, (0.382, 0.14, 0.238, 0.203, 1.0, 0.027)), av_distortion=0.065),
    "AE400-10": dict(zip(_T2_COLS, (0.234, 0.16, 0.248, 0.094, 0.066, 1.0)), av_distortion=0.086),
    "noise:0.1": dict(zip(_T2_COLS, (0.05, 0.101, 0.183, 0.0, 0.0, 0.008)), av_distortion=0.1),
    "noise:0.3": dict(zip(_T2_COLS, (0.156, 0.113, 0.227, 0.05, 0.043, 0.031)), av_distortion=0.3),
}
PAPER_TABLE3 = {
    "FC100-100-10": {"error_p1": 0.0, "error_p2": 0.024, "error_test": 0.02, "min_av_distortion": 0.062},
    "FC123-456-10": {"error_p1": 0.0, "error_p2": 0.025, "error_test": 0.021, "min_av_distortion": 0.059},
    "FC100-100-10'": {"error_p1": 0.023, "error_p2": 0.0, "error_test": 0.021, "min_av_distortion": 0.058},
}
_T4_COLS = ("FC100-100-10", "FC123-456-10", "FC100-100-10'")
PAPER_TABLE4 = {  # row -> column -> error; "av_distortion" is the row's stddev as printed.
    "FC100-100-10": dict(zip(_T4_COLS, (1.0, 0.262, 0.059)), av_distortion=0.062),
    "FC123-456-10": dict(zip(_T4_COLS, (0.0625, 1.0, 0.051)), av_distortion=0.059),
    "FC100-100-10'": dict(zip(_T4_COLS, (0.082, 0.082, 1.0)), av_distortion=0.058),
    "noise:upper": dict(zip(_T4_COLS, (0.022, 0.026, 0.024)), av_distortion=0.06),
    "magnified:FC100-100-10": dict(zip(_T4_COLS, (1.0, 0.98, 0.43)), av_distortion=0.1),
    "magnified:FC123-456-10": dict(zip(_T4_COLS, (0.96, 1.0, 0.22)), av_distortion=0.1),
    "magnified:FC100-100-10'": dict(zip(_T4_COLS, (0.27, 0.50, 1.0)), av_distortion=0.1),
    "noise:lower": dict(zip(_T4_COLS, (0.026, 0.028, 0.027)), av_distortion=0.1),
}
PAPER = {"table1": PAPER_TABLE1, "table2": PAPER_TABLE2, "table3": PAPER_TABLE3, "table4": PAPER_TABLE4}

# The readings chosen where the paper is ambiguous (paper.md §9), stated in every report.
READINGS = (
    "A1-A4 (attack): box-constrained L-BFGS on c*||r||^2 + CE(x+r, l) with a line search for the largest c "
    "whose minimiser is classified as l (intriguing_jax.attack.lbfgs_attack); success re-checked by argmax.",
    "A5 (targets): one target per example, uniform over the 9 wrong labels, seeded; the same targets for "
    "every model, so the rows of Tables 2 and 4 attack the same (image, target) pairs.",
    "A6 (examples): Tables 1-2 attack the training set, Tables 3-4 the test set; a seeded random subset when "
    "num_examples is smaller than the set (default: the whole set). Distortions are averaged over all "
    "attacked examples; the average over the examples the model originally classified correctly is also "
    "given.",
    "A7 (failures): attack failures are kept and reported (success rate, diagonal below 100%).",
    "A8 (distortion): per-example RMS pixel change sqrt(mean((x'-x)^2)) over the 784 pixels in [0,1], then "
    "averaged over examples.",
    "A9 (error metric): plain error rate of the evaluated model on the distorted set against the true labels "
    "of the originals (not conditioned on the clean prediction).",
    "A10 (noise): x + N(0, stddev^2), not clipped to [0,1] (so the measured distortion equals the stddev); "
    "the measured distortion is reported.",
    "A11 (magnification): x + 0.1 (x'-x)/RMS(x'-x), i.e. the perturbation rescaled to an RMS of 0.1 (the "
    "printed L2 formula would give RMS 0.0036), not clipped. The Table 4 upper noise row uses the measured "
    "mean distortion of the three sets (the paper's 0.06) unless a stddev is given.",
    "A12-A16 (models): see intriguing_jax.train / notes; P1 = first 30000, P2 = last 30000 training images; "
    "the three Table 3 networks share lambda = 1e-5, 1e-5, 1e-6 and differ in data, size and seed.",
)


# --------------------------------------------------------------------------------------------------
# Examples, targets, models
# --------------------------------------------------------------------------------------------------

def select_examples(num_total: int, num_examples: Optional[int], *, seed: int = 0) -> np.ndarray:
  """Indices of the examples to attack: all of them, or a seeded random subset (paper §9 A6).

  The subset is the first ``num_examples`` entries of one seeded permutation, so a larger request extends
  a smaller one (and reuses its cached attack chunks).

  Args:
    num_total: size of the named set (e.g. 60000).
    num_examples: how many to attack; None for all (in their original order).
    seed: permutation seed.

  Returns:
    [num_examples] int64 indices.
  """
  if num_total < 1:
    raise ValueError(f"num_total must be >= 1, got {num_total}")
  if num_examples is None:
    return np.arange(num_total)
  if not 1 <= num_examples <= num_total:
    raise ValueError(f"num_examples must be in [1, {num_total}], got {num_examples}")
  return np.random.default_rng(seed).permutation(num_total)[:num_examples]


def draw_targets(labels: Any, *, seed: int = 0, num_classes: int = 10) -> np.ndarray:
  """One target per example, uniform over the ``num_classes - 1`` wrong labels (paper §9 A5).

  Args:
    labels: [N] integer true labels in [0, num_classes).
    seed: seed of the draw; the target of example i depends only on (seed, i, labels[i]).

  Returns:
    [N] int32 targets with ``targets != labels``.
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


def as_logits_fn(model: ModelLike) -> LogitsFn:
  """A logits function from ``logits_fn`` or ``(apply_fn, params)`` (the latter becomes a partial)."""
  if isinstance(model, tuple):
    if len(model) != 2 or not callable(model[0]):
      raise ValueError("a model must be a logits_fn or an (apply_fn, params) pair")
    return functools.partial(model[0], model[1])
  if not callable(model):
    raise ValueError(f"a model must be a logits_fn or an (apply_fn, params) pair, got {type(model).__name__}")
  return model


def logits_fns(models: Models) -> Dict[str, LogitsFn]:
  """name -> logits_fn. Build this once and pass it to every table so compiled programs are reused."""
  if not models:
    raise ValueError("models is empty")
  return {name: as_logits_fn(m) for name, m in models.items()}


def _model_digest(model: ModelLike) -> str:
  """A fingerprint of the model's parameters (or of the function object when only a logits_fn is given)."""
  params = None
  if isinstance(model, tuple):
    params = model[1]
  elif isinstance(model, functools.partial) and model.args:
    params = model.args[0]
  if params is None:
    return f"fn:{getattr(model, '__qualname__', type(model).__name__)}"
  h = hashlib.sha256()
  for leaf in jax.tree_util.tree_leaves(params):
    a = np.asarray(leaf)
    h.update(str(a.shape).encode() + str(a.dtype).encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return "params:" + h.hexdigest()[:24]


# The paper's models: display name -> (intriguing_jax.train recipe, training data, seed offset).
# Table 3: FC100-100-10 and FC100-100-10' share the recipe and differ in data (P1 / P2) and seed (A16).
TABLE1_MODELS = (("FC10(10^-4)", "fc10-1e-4"), ("FC10(10^-2)", "fc10-1e-2"), ("FC10(1)", "fc10-1"),
                 ("FC100-100-10", "fc100-100-10"), ("FC200-200-10", "fc200-200-10"), ("AE400-10", "ae400-10"))
TABLE3_MODELS = (("FC100-100-10", "fc100-100-10", "p1", 0), ("FC123-456-10", "fc123-456-10", "p1", 0),
                 ("FC100-100-10'", "fc100-100-10", "p2", 1))
LAMBDA_ORDER = ("FC10(10^-4)", "FC10(10^-2)", "FC10(1)")


_STABLE_APPLY: Dict[Any, Callable] = {}


def stable_apply(model: Any) -> Callable:
  """``model.apply``, the same function object for every equal module (same class and attributes).

  Flax creates a new bound method on each ``model.apply`` access, and compiled attacks/evaluations are
  cached by function identity; sharing one object lets models of the same architecture (e.g. the three
  FC10 models) reuse one compiled attack program.
  """
  try:
    return _STABLE_APPLY.setdefault(model, model.apply)
  except TypeError:  # unhashable module
    return model.apply


def _run_name(recipe: str, seed: int, epochs: Optional[int], data_tag: str) -> str:
  """The run directory name scripts/train.py would use, so models trained there are reused."""
  from intriguing_jax import train as train_lib  # pylint: disable=g-import-not-at-top
  return train_lib.default_run_name(recipe, seed=seed, epochs=epochs, data_tag=data_tag)


def table1_models(train: ArrayPair, *, workdir: str, seed: int = 0, epochs: Optional[int] = None,
                  names: Optional[Sequence[str]] = None, data_tag: str = "") -> Dict[str, Tuple[Callable, Any]]:
  """Trains (or restores from ``workdir``) the six Table 1 models on ``train``.

  Args:
    train: (images [N, 28, 28, 1], labels [N]), the full training set in the paper.
    workdir: parent directory of the training runs (``intriguing_jax.train.get_or_train``).
    seed: initialisation / shuffling seed.
    epochs: overrides every recipe's epochs (quick runs); None keeps the recipes.
    names: subset of the display names of ``TABLE1_MODELS`` (default: all).
    data_tag: part of the run names telling this training set apart (empty for the full MNIST training
      set: then the runs are those of ``scripts/train.py --workdir=<workdir>``).

  Returns:
    display name -> (apply_fn, variables), in Table 1 order (``apply_fn`` from :func:`stable_apply`).
  """
  from intriguing_jax import train as train_lib  # pylint: disable=g-import-not-at-top
  known = [n for n, _ in TABLE1_MODELS]
  for n in names or ():
    if n not in known:
      raise ValueError(f"unknown Table 1 model {n!r}; known: {known}")
  out = {}
  for name, recipe in TABLE1_MODELS:
    if names and name not in names:
      continue
    logging.info("Table 1 model %s (recipe %s, seed %d): training or restoring", name, recipe, seed)
    model, variables = train_lib.get_or_train(recipe, train[0], train[1], workdir=workdir, seed=seed,
                                              epochs=epochs, run_name=_run_name(recipe, seed, epochs, data_tag))
    out[name] = (stable_apply(model), variables)
  return out


def table3_models(p1: ArrayPair, p2: ArrayPair, *, workdir: str, seed: int = 0, epochs: Optional[int] = None,
                  data_tag: str = "") -> Dict[str, Tuple[Callable, Any]]:
  """Trains (or restores) the Table 3 models: FC100-100-10 and FC123-456-10 on P1, FC100-100-10' on P2.

  Run names are ``scripts/train.py --split=p1|p2`` ones (e.g. "fc100-100-10_p2_seed1"), with
  ``data_tag`` appended to "p1"/"p2" when the halves come from a subset of the training set.

  Returns:
    display name -> (apply_fn, variables), in Table 3 order (``apply_fn`` from :func:`stable_apply`).
  """
  from intriguing_jax import train as train_lib  # pylint: disable=g-import-not-at-top
  data = {"p1": p1, "p2": p2}
  out = {}
  for name, recipe, part, offset in TABLE3_MODELS:
    s = seed + offset
    logging.info("Table 3 model %s (recipe %s on %s, seed %d): training or restoring", name, recipe, part, s)
    model, variables = train_lib.get_or_train(recipe, data[part][0], data[part][1], workdir=workdir, seed=s,
                                              epochs=epochs,
                                              run_name=_run_name(recipe, s, epochs, part + data_tag))
    out[name] = (stable_apply(model), variables)
  return out


# --------------------------------------------------------------------------------------------------
# Resumable, chunked attacks
# --------------------------------------------------------------------------------------------------

class AttackRecord(NamedTuple):
  """Attack outputs as numpy arrays (the fields of ``attack.AttackResult`` the tables use).

  Attributes:
    x_adv: [N, ...] adversarial images.
    success: [N] bool, argmax(model(x_adv)) == target.
    c: [N] penalty weight of the returned minimiser.
    distortion: [N] RMS distortion sqrt(mean((x_adv - x)^2)).
  """
  x_adv: np.ndarray
  success: np.ndarray
  c: np.ndarray
  distortion: np.ndarray


class AdversarialSet(NamedTuple):
  """One model's adversarial set (paper §4.2): the originals, their targets and the attack outputs.

  Attributes:
    x: [N, ...] original images in [0, 1].
    labels: [N] true labels.
    targets: [N] attack targets (never the true label).
    x_adv: [N, ...] adversarial images.
    success: [N] bool, the source model predicts the target on x_adv.
    distortion: [N] RMS distortion.
    c: [N] penalty weight found by the attack's line search.
    clean_correct: [N] bool, the source model classifies x correctly.
  """
  x: np.ndarray
  labels: np.ndarray
  targets: np.ndarray
  x_adv: np.ndarray
  success: np.ndarray
  distortion: np.ndarray
  c: np.ndarray
  clean_correct: np.ndarray


def _default_attack_fn() -> Callable:
  from intriguing_jax import attack  # pylint: disable=g-import-not-at-top
  return attack.lbfgs_attack


def _fingerprint(*parts: Any) -> np.ndarray:
  h = hashlib.sha256()
  for p in parts:
    if isinstance(p, np.ndarray):
      h.update(str(p.shape).encode() + str(p.dtype).encode())
      h.update(np.ascontiguousarray(p).tobytes())
    else:
      h.update(json.dumps(p, sort_keys=True, default=repr).encode())
    h.update(b"\x00")
  return np.frombuffer(h.digest(), np.uint8).copy()


def _rms(x: np.ndarray, x_adv: np.ndarray) -> np.ndarray:
  d = (np.asarray(x_adv, np.float64) - np.asarray(x, np.float64)).reshape(x.shape[0], -1)
  return np.sqrt(np.mean(d * d, axis=1)).astype(np.float32)


def _attack_chunk(attack_fn: Callable, logits_fn: Callable, params: Any, x: np.ndarray, targets: np.ndarray,
                  chunk_size: int, options: Mapping[str, Any]) -> AttackRecord:
  """Runs one chunk, padding the ragged last chunk to ``chunk_size`` so the compiled attack is reused."""
  k = x.shape[0]
  if k < chunk_size:
    pad = chunk_size - k
    x_in = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)], axis=0)
    t_in = np.concatenate([targets, np.repeat(targets[-1:], pad, axis=0)], axis=0)
  else:
    x_in, t_in = x, targets
  if params is not None:
    options = dict(options, params=params)
  res = attack_fn(logits_fn, jax.numpy.asarray(x_in), jax.numpy.asarray(t_in), **options)
  # distributed.gather: a globally sharded (multi-host) output comes back whole on every process.
  x_adv = np.asarray(distributed.gather(res.x_adv), np.float32)[:k].reshape(x.shape)
  success = np.asarray(distributed.gather(res.success), bool)[:k]
  c = np.asarray(distributed.gather(getattr(res, "c", np.full((chunk_size,), np.nan))), np.float32).reshape(-1)[:k]
  return AttackRecord(x_adv=x_adv, success=success, c=c, distortion=_rms(x, x_adv))


def run_attack_cached(logits_fn: Callable, x: Any, targets: Any, *, params: Any = None,
                      attack_fn: Optional[Callable] = None,
                      attack_options: Optional[Mapping[str, Any]] = None, cache_dir: Optional[str] = None,
                      chunk_size: int = 500, cache_key: str = "", name: str = "") -> AttackRecord:
  """Attacks ``x`` towards ``targets`` in chunks; finished chunks are saved to and reused from ``cache_dir``.

  Chunks live in ``cache_dir/settings_<digest>/`` (one directory per ``cache_key`` -- e.g. a digest of the
  model's parameters --, attack function, options and chunk size, described by its ``settings.json``). Each
  chunk file ``chunk_<start>_<size>.msgpack`` holds the chunk's outputs and a SHA-256 fingerprint of its
  images, targets and settings; a file whose fingerprint differs or that is corrupted is recomputed, never
  trusted. A small ``progress.json`` records how many chunks are done. One absl log line per chunk gives the rate and
  the expected remaining time.

  Scale-out: ``chunk_size`` is rounded up to a multiple of ``jax.device_count()`` (the attack shards each
  chunk's rows over all devices; a multiple needs no second padding), so 1 and 4 devices may use different
  cache sub-directories. Multi-host: every process calls this with the same inputs (SPMD), the attack's
  outputs are gathered, and only process 0 writes (the cache must be on a shared filesystem, visible to all
  processes when a run is resumed).

  Args:
    logits_fn: model, [B, ...] -> [B, num_classes] logits; ``logits_fn(params, x)`` when ``params`` is
      given (then one compiled attack serves every model of the same architecture).
    x: [N, ...] images in [0, 1].
    params: optional parameters passed to ``attack_fn`` as ``params=`` (not part of the fingerprint: put
      a digest of them in ``cache_key``).
    targets: [N] int target labels.
    attack_fn: ``attack_fn(logits_fn, x, target, **attack_options)`` returning an object with ``x_adv``,
      ``success`` and ``c`` ([B]-leading arrays); default :func:`intriguing_jax.attack.lbfgs_attack`.
    attack_options: keyword options for ``attack_fn`` (part of the fingerprint).
    cache_dir: directory of the chunk files; None disables caching.
    chunk_size: examples per attack call (also the compiled batch size; the last chunk is padded); rounded
      up to a multiple of the device count.
    cache_key: string identifying the model (part of the fingerprint).
    name: label for the log lines.

  Returns:
    AttackRecord of numpy arrays with N rows.
  """
  x = np.asarray(x, np.float32)
  targets = np.asarray(targets)
  if x.ndim < 2:
    raise ValueError(f"x must be [N, ...] images, got shape {x.shape}")
  if targets.shape != (x.shape[0],):
    raise ValueError(f"targets must have shape ({x.shape[0]},), got {targets.shape}")
  if not np.issubdtype(targets.dtype, np.integer):
    raise ValueError(f"targets must be integers, got dtype {targets.dtype}")
  if x.shape[0] == 0:
    raise ValueError("x is empty: nothing to attack")
  if not np.all(np.isfinite(x)):
    raise ValueError("x contains NaN or inf")
  if x.min() < 0.0 or x.max() > 1.0:
    raise ValueError(f"x must lie in [0, 1], got range [{x.min():.3g}, {x.max():.3g}]")
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
  attack_fn = attack_fn or _default_attack_fn()
  options = dict(attack_options or {})
  targets = targets.astype(np.int32)
  n = x.shape[0]
  num_devices = jax.device_count()
  chunk_size = distributed.round_up(min(chunk_size, distributed.round_up(n, num_devices)), num_devices)
  starts = list(range(0, n, chunk_size))
  writer = jax.process_index() == 0  # multi-host: one process writes the shared cache
  fn_name = getattr(attack_fn, "__module__", "") + "." + getattr(attack_fn, "__qualname__", repr(attack_fn))
  if cache_dir:
    # One sub-directory per setting (model key, attack, options, chunk size), so settings coexist.
    settings = {"cache_key": cache_key, "attack_fn": fn_name, "options": options, "chunk_size": chunk_size}
    digest = bytes(_fingerprint(cache_key, fn_name, options, chunk_size)).hex()[:16]
    cache_dir = os.path.join(cache_dir, f"settings_{digest}")
    if writer:
      os.makedirs(cache_dir, exist_ok=True)
      checkpoint.atomic_write_json(os.path.join(cache_dir, "settings.json"), json.loads(
          json.dumps(settings, sort_keys=True, default=repr)))
  parts: List[AttackRecord] = []
  reused = 0
  t0 = time.perf_counter()
  computed_examples = 0
  for i, start in enumerate(starts):
    stop = min(start + chunk_size, n)
    xc, tc = x[start:stop], targets[start:stop]
    fp = _fingerprint(xc, tc, cache_key, options, fn_name, chunk_size)
    path = os.path.join(cache_dir, f"chunk_{start:08d}_{chunk_size:05d}.msgpack") if cache_dir else None
    rec = None
    if path and os.path.isfile(path):
      try:
        state = checkpoint.load_pytree(path)
        if np.array_equal(np.asarray(state["fingerprint"], np.uint8), fp):
          rec = AttackRecord(x_adv=np.asarray(state["x_adv"], np.float32).reshape(xc.shape),
                             success=np.asarray(state["success"], bool), c=np.asarray(state["c"], np.float32),
                             distortion=_rms(xc, np.asarray(state["x_adv"], np.float32).reshape(xc.shape)))
          reused += 1
        else:
          logging.warning("attack[%s]: %s was made with other inputs or settings; recomputing", name, path)
      except (checkpoint.CheckpointError, KeyError, ValueError) as e:
        logging.warning("attack[%s]: cannot reuse %s (%s); recomputing", name, path, e)
    if rec is None:
      tc0 = time.perf_counter()
      rec = _attack_chunk(attack_fn, logits_fn, params, xc, tc, chunk_size, options)
      dt = time.perf_counter() - tc0
      computed_examples += stop - start
      if path and writer:
        checkpoint.save_pytree(path, {"x_adv": rec.x_adv, "success": rec.success, "c": rec.c,
                                      "distortion": rec.distortion, "fingerprint": fp})
      elapsed = time.perf_counter() - t0
      rate = computed_examples / max(elapsed, 1e-9)
      remaining = n - stop
      logging.info("attack[%s] chunk %d/%d (%d/%d examples): %.1fs, %.1f ex/s, success %.1f%%, "
                   "mean distortion %.4f, ETA %.0fs", name, i + 1, len(starts), stop, n, dt, rate,
                   100.0 * rec.success.mean(), rec.distortion.mean(), remaining / max(rate, 1e-9))
    parts.append(rec)
    if cache_dir and writer:
      checkpoint.atomic_write_json(os.path.join(cache_dir, "progress.json"),
                                   {"name": name, "num_examples": n, "chunk_size": chunk_size,
                                    "chunks_done": i + 1, "num_chunks": len(starts)})
  if reused:
    logging.info("attack[%s]: reused %d/%d finished chunks from %s", name, reused, len(starts), cache_dir)
  return AttackRecord(*(np.concatenate([getattr(p, f) for p in parts], axis=0) for f in AttackRecord._fields))


def _safe_name(name: str) -> str:
  safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"
  return safe + "_" + hashlib.sha256(name.encode()).hexdigest()[:6]


def adversarial_sets(models: Models, x: Any, labels: Any, targets: Any, *, attack_fn: Optional[Callable] = None,
                     attack_options: Optional[Mapping[str, Any]] = None, cache_dir: Optional[str] = None,
                     chunk_size: int = 500, batch_size: int = 1000) -> Dict[str, AdversarialSet]:
  """Makes each model's adversarial set of the same examples and targets (paper §4.2).

  Args:
    models: name -> logits_fn or (apply_fn, params).
    x: [N, ...] images in [0, 1].
    labels: [N] true labels.
    targets: [N] targets, e.g. from :func:`draw_targets`.
    attack_fn, attack_options, chunk_size: see :func:`run_attack_cached`.
    cache_dir: per-model chunk caches go to ``cache_dir/<model>``; None disables caching.
    batch_size: evaluation batch size for the clean predictions.

  Returns:
    name -> AdversarialSet, in the order of ``models``.
  """
  x = np.asarray(x, np.float32)
  labels = np.asarray(labels)
  targets = np.asarray(targets)
  if labels.shape != (x.shape[0],):
    raise ValueError(f"labels must have shape ({x.shape[0]},), got {labels.shape}")
  if targets.shape != labels.shape:
    raise ValueError(f"targets must have shape {labels.shape}, got {targets.shape}")
  fns = logits_fns(models)
  out = {}
  for name, fn in fns.items():
    sub = os.path.join(cache_dir, _safe_name(name)) if cache_dir else None
    m = models[name]
    afn, aparams = (m[0], m[1]) if isinstance(m, tuple) else (fn, None)
    rec = run_attack_cached(afn, x, targets, params=aparams, attack_fn=attack_fn,
                            attack_options=attack_options, cache_dir=sub,
                            chunk_size=chunk_size, cache_key=_model_digest(m), name=name)
    clean = metrics.predict(fn, x, batch_size=batch_size)
    out[name] = AdversarialSet(x=x, labels=labels.astype(np.int32), targets=targets.astype(np.int32),
                               x_adv=rec.x_adv, success=rec.success, distortion=rec.distortion, c=rec.c,
                               clean_correct=clean == labels)
    logging.info("adversarial set for %s: %d examples, success %.2f%%, av. distortion %.4f", name,
                 x.shape[0], 100.0 * rec.success.mean(), rec.distortion.mean())
  return out


def _ensure_adversarial(models: Models, data: Optional[ArrayPair], adversarial: Optional[Mapping[str, Any]],
                        *, num_examples: Optional[int], seed: int, attack_fn: Optional[Callable],
                        attack_options: Optional[Mapping[str, Any]], cache_dir: Optional[str], chunk_size: int,
                        batch_size: int, where: str) -> Mapping[str, AdversarialSet]:
  if adversarial is not None:
    missing = [m for m in models if m not in adversarial]
    if missing:
      raise ValueError(f"{where}: adversarial has no set for model(s) {missing}")
    return adversarial
  if data is None:
    raise ValueError(f"{where}: give either `adversarial` or the data to attack")
  x, y = np.asarray(data[0], np.float32), np.asarray(data[1])
  idx = select_examples(x.shape[0], num_examples, seed=seed)
  targets = draw_targets(y, seed=seed)[idx]
  return adversarial_sets(models, x[idx], y[idx], targets, attack_fn=attack_fn, attack_options=attack_options,
                          cache_dir=cache_dir, chunk_size=chunk_size, batch_size=batch_size)


def _common_examples(adversarial: Mapping[str, AdversarialSet], names: Sequence[str], where: str):
  first = adversarial[names[0]]
  for nm in names[1:]:
    a = adversarial[nm]
    if a.x.shape != first.x.shape or not np.array_equal(a.labels, first.labels):
      raise ValueError(f"{where}: the adversarial sets of {names[0]!r} and {nm!r} are not made from the same "
                       "examples")
  return first.x, first.labels


def _mean(v: np.ndarray) -> float:
  return float(np.mean(v)) if v.size else float("nan")


# --------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------

def table1(models: Models, train: ArrayPair, test: ArrayPair, *,
           adversarial: Optional[Mapping[str, AdversarialSet]] = None, num_examples: Optional[int] = None,
           seed: int = 0, attack_fn: Optional[Callable] = None, attack_options: Optional[Mapping[str, Any]] = None,
           cache_dir: Optional[str] = None, chunk_size: int = 500, batch_size: int = 1000) -> List[dict]:
  """Table 1: training/test error and average minimum distortion of each model.

  Args:
    models: name -> logits_fn or (apply_fn, params).
    train, test: (images [N, ...], labels [N]) for the error columns (the whole sets).
    adversarial: name -> AdversarialSet made from the training set; built from ``train`` when None
      (``num_examples``, ``seed``, ``attack_fn``, ``attack_options``, ``cache_dir``, ``chunk_size`` are
      then used as in :func:`adversarial_sets`).

  Returns:
    One dict per model: ``model``, ``train_error``, ``test_error``, ``av_min_distortion`` (mean over all
    attacked examples), ``av_distortion_correct`` (over the examples the model classified correctly),
    ``av_distortion_success`` (over successful attacks), ``success_rate``, ``num_attacked``, ``num_failed``,
    ``mean_log10_c``.
  """
  fns = logits_fns(models)
  adversarial = _ensure_adversarial(models, train, adversarial, num_examples=num_examples, seed=seed,
                                    attack_fn=attack_fn, attack_options=attack_options, cache_dir=cache_dir,
                                    chunk_size=chunk_size, batch_size=batch_size, where="table1")
  rows = []
  for name, fn in fns.items():
    a = adversarial[name]
    c = a.c[np.isfinite(a.c) & (a.c > 0)]
    rows.append({
        "model": name,
        "train_error": metrics.error_rate(fn, train[0], train[1], batch_size=batch_size),
        "test_error": metrics.error_rate(fn, test[0], test[1], batch_size=batch_size),
        "av_min_distortion": _mean(a.distortion),
        "av_distortion_correct": _mean(a.distortion[a.clean_correct]),
        "av_distortion_success": _mean(a.distortion[a.success]),
        "success_rate": _mean(a.success.astype(np.float64)),
        "num_attacked": int(a.x.shape[0]),
        "num_failed": int(np.sum(~a.success)),
        "mean_log10_c": _mean(np.log10(c)) if c.size else float("nan"),
    })
  return rows


def _gaussian_noise(key: jax.Array, x: np.ndarray, stddev: float, clip: bool) -> np.ndarray:
  from intriguing_jax import attack  # pylint: disable=g-import-not-at-top
  return np.asarray(attack.gaussian_noise(key, jax.numpy.asarray(x), stddev, clip=clip), np.float32)


def _scale_perturbation(x: np.ndarray, x_adv: np.ndarray, stddev: float, clip: bool) -> np.ndarray:
  from intriguing_jax import attack  # pylint: disable=g-import-not-at-top
  return np.asarray(attack.scale_perturbation(jax.numpy.asarray(x), jax.numpy.asarray(x_adv), stddev, clip=clip),
                    np.float32)


def _matrix_row(fns: Mapping[str, LogitsFn], x: np.ndarray, labels: np.ndarray, batch_size: int) -> Dict[str, float]:
  return {col: metrics.error_rate(fn, x, labels, batch_size=batch_size) for col, fn in fns.items()}


def table2(models: Models, train: Optional[ArrayPair] = None, *,
           adversarial: Optional[Mapping[str, AdversarialSet]] = None, noise_stddevs: Sequence[float] = (0.1, 0.3),
           clip_noise: bool = False, seed: int = 0, num_examples: Optional[int] = None,
           attack_fn: Optional[Callable] = None, attack_options: Optional[Mapping[str, Any]] = None,
           cache_dir: Optional[str] = None, chunk_size: int = 500, batch_size: int = 1000) -> List[dict]:
  """Table 2: cross-model generalisation, the adversarial set made for model i fed to model j.

  Args:
    models: name -> logits_fn or (apply_fn, params); they are both the rows and the columns.
    train: (images, labels) to attack when ``adversarial`` is None (the training set, paper §4.3).
    adversarial: name -> AdversarialSet of the same examples, one per model.
    noise_stddevs: stddevs of the Gaussian-noise reference rows, added to the same examples.
    clip_noise: clip the noisy images to [0, 1] (default no, paper §9 A10).
    seed: seed of the noise (and of the example subset/targets when attacking here).

  Returns:
    One dict per row: ``row`` (the source model, or "Gaussian noise, stddev=s"), ``kind``
    ("adversarial" | "noise"), ``source`` (model name or None), ``stddev`` (noise only), one error entry per
    column model (plain error vs true labels, A9), and ``av_distortion`` (measured mean RMS).
  """
  fns = logits_fns(models)
  adversarial = _ensure_adversarial(models, train, adversarial, num_examples=num_examples, seed=seed,
                                    attack_fn=attack_fn, attack_options=attack_options, cache_dir=cache_dir,
                                    chunk_size=chunk_size, batch_size=batch_size, where="table2")
  for s in noise_stddevs:
    if not s > 0:
      raise ValueError(f"noise_stddevs must be positive, got {s}")
  names = list(fns)
  x, labels = _common_examples(adversarial, names, "table2")
  rows = []
  for src in names:
    a = adversarial[src]
    row = {"row": src, "kind": "adversarial", "source": src}
    row.update(_matrix_row(fns, a.x_adv, a.labels, batch_size))
    row["av_distortion"] = _mean(a.distortion)
    rows.append(row)
  base = jax.random.PRNGKey(seed)
  for i, s in enumerate(noise_stddevs):
    xn = _gaussian_noise(jax.random.fold_in(base, 1000 + i), x, float(s), clip_noise)
    row = {"row": f"Gaussian noise, stddev={s:g}", "kind": "noise", "source": None, "stddev": float(s)}
    row.update(_matrix_row(fns, xn, labels, batch_size))
    row["av_distortion"] = _mean(_rms(x, xn))
    rows.append(row)
  return rows


def table3(models: Models, p1: ArrayPair, p2: ArrayPair, test: ArrayPair, *,
           adversarial: Optional[Mapping[str, AdversarialSet]] = None, num_examples: Optional[int] = None,
           seed: int = 0, attack_fn: Optional[Callable] = None, attack_options: Optional[Mapping[str, Any]] = None,
           cache_dir: Optional[str] = None, chunk_size: int = 500, batch_size: int = 1000) -> List[dict]:
  """Table 3: the P1/P2 models' errors on P1, P2 and the test set, and their min. av. distortion.

  Args:
    models: name -> model, e.g. FC100-100-10 and FC123-456-10 trained on P1, FC100-100-10' on P2.
    p1, p2, test: (images, labels) of the two training halves and the test set.
    adversarial: name -> AdversarialSet made from the *test* set (paper §4.2); built from ``test`` when None.

  Returns:
    One dict per model: ``model``, ``error_p1``, ``error_p2``, ``error_test``, ``min_av_distortion``,
    ``av_distortion_correct``, ``success_rate``, ``num_failed``.
  """
  fns = logits_fns(models)
  adversarial = _ensure_adversarial(models, test, adversarial, num_examples=num_examples, seed=seed,
                                    attack_fn=attack_fn, attack_options=attack_options, cache_dir=cache_dir,
                                    chunk_size=chunk_size, batch_size=batch_size, where="table3")
  rows = []
  for name, fn in fns.items():
    a = adversarial[name]
    rows.append({
        "model": name,
        "error_p1": metrics.error_rate(fn, p1[0], p1[1], batch_size=batch_size),
        "error_p2": metrics.error_rate(fn, p2[0], p2[1], batch_size=batch_size),
        "error_test": metrics.error_rate(fn, test[0], test[1], batch_size=batch_size),
        "min_av_distortion": _mean(a.distortion),
        "av_distortion_correct": _mean(a.distortion[a.clean_correct]),
        "success_rate": _mean(a.success.astype(np.float64)),
        "num_failed": int(np.sum(~a.success)),
    })
  return rows


def table4(models: Models, test: Optional[ArrayPair] = None, *,
           adversarial: Optional[Mapping[str, AdversarialSet]] = None, magnify_to: float = 0.1,
           noise_stddev: Optional[float] = None, clip: bool = False, seed: int = 0,
           num_examples: Optional[int] = None, attack_fn: Optional[Callable] = None,
           attack_options: Optional[Mapping[str, Any]] = None, cache_dir: Optional[str] = None,
           chunk_size: int = 500, batch_size: int = 1000) -> List[dict]:
  """Table 4: cross-training-set generalisation, plain and magnified, with Gaussian-noise references.

  Upper block: each model's adversarial set (made from test images) fed to every model, then Gaussian noise
  of stddev ``noise_stddev`` (None: the measured mean distortion of the sets, the paper's 0.06). Lower
  block: the same perturbations rescaled to an RMS of ``magnify_to`` (paper §9 A11), then Gaussian noise of
  stddev ``magnify_to``. Errors are plain error rates against the true labels (A9).

  Args:
    models: name -> model (rows and columns).
    test: (images, labels) to attack when ``adversarial`` is None.
    adversarial: name -> AdversarialSet of the same test examples.
    magnify_to: RMS of the magnified perturbations.
    noise_stddev: stddev of the upper noise row; None uses the measured mean distortion.
    clip: clip noisy and magnified images to [0, 1] (default no, A10/A11).
    seed: noise seed.

  Returns:
    One dict per row: ``row``, ``kind`` ("adversarial" | "noise" | "magnified"), ``block`` ("upper" |
    "lower"), ``source``, ``stddev`` (noise rows), one error per column model, ``av_distortion``
    (measured), and for magnified rows ``magnification`` (``magnify_to`` / the set's mean distortion, the
    paper's "from stddev 0.06 to 0.1").
  """
  fns = logits_fns(models)
  adversarial = _ensure_adversarial(models, test, adversarial, num_examples=num_examples, seed=seed,
                                    attack_fn=attack_fn, attack_options=attack_options, cache_dir=cache_dir,
                                    chunk_size=chunk_size, batch_size=batch_size, where="table4")
  if not magnify_to > 0:
    raise ValueError(f"magnify_to must be positive, got {magnify_to}")
  if noise_stddev is not None and not noise_stddev > 0:
    raise ValueError(f"noise_stddev must be positive or None, got {noise_stddev}")
  names = list(fns)
  x, labels = _common_examples(adversarial, names, "table4")
  base = jax.random.PRNGKey(seed)
  rows = []
  dists = []
  for src in names:
    a = adversarial[src]
    d = _mean(a.distortion)
    dists.append(d)
    row = {"row": f"Distorted for {src} (av. stddev={d:.3g})", "kind": "adversarial", "block": "upper",
           "source": src}
    row.update(_matrix_row(fns, a.x_adv, a.labels, batch_size))
    row["av_distortion"] = d
    rows.append(row)
  s_up = float(noise_stddev) if noise_stddev is not None else float(np.mean(dists))
  xn = _gaussian_noise(jax.random.fold_in(base, 2000), x, s_up, clip)
  row = {"row": f"Gaussian noise with stddev={s_up:.3g}", "kind": "noise", "block": "upper", "source": None,
         "stddev": s_up}
  row.update(_matrix_row(fns, xn, labels, batch_size))
  row["av_distortion"] = _mean(_rms(x, xn))
  rows.append(row)
  for src in names:
    a = adversarial[src]
    xm = _scale_perturbation(a.x, a.x_adv, float(magnify_to), clip)
    row = {"row": f"Distorted for {src} amplified to stddev={magnify_to:g}", "kind": "magnified",
           "block": "lower", "source": src}
    row.update(_matrix_row(fns, xm, a.labels, batch_size))
    row["av_distortion"] = _mean(_rms(a.x, xm))
    d = _mean(a.distortion)
    row["magnification"] = magnify_to / d if d > 0 else float("nan")
    rows.append(row)
  xn = _gaussian_noise(jax.random.fold_in(base, 2001), x, float(magnify_to), clip)
  row = {"row": f"Gaussian noise with stddev={magnify_to:g}", "kind": "noise", "block": "lower", "source": None,
         "stddev": float(magnify_to)}
  row.update(_matrix_row(fns, xn, labels, batch_size))
  row["av_distortion"] = _mean(_rms(x, xn))
  rows.append(row)
  return rows


# The claims, aggregation, figures and report of these tables live in ``transfer_report``; these names stay
# reachable from here (``transfer.build_report`` etc.), imported on first use.
_REPORT_NAMES = ("qualitative_claims", "aggregate_rows", "save_figures", "build_report")


def __getattr__(name):
  if name in _REPORT_NAMES:
    from intriguing_jax import transfer_report  # pylint: disable=g-import-not-at-top
    return getattr(transfer_report, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
