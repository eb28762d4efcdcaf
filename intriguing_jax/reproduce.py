"""The Tables 1-4 reproduction on MNIST: train or restore the paper's models, attack them, write the report.

Usage::

    from intriguing_jax import reproduce
    from intriguing_jax.configs import reproduce_mnist
    results = reproduce.run_experiment(reproduce_mnist.get_config("quick"), "runs/mnist_quick")

    # Or one step at a time, on your own models (name -> tables.Model); resumable, chunked, cached:
    adv = reproduce.adversarial_sets(models, x, labels, targets, options=opts, cache_dir="runs/attacks")

Attacks stream through ``distributed.stream_map`` (``jit=False``), keyed on the model (:func:`model_digest`),
the attack function and its options: reruns compute only missing, foreign or corrupted chunks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

from absl import logging
from flax import linen as nn
import jax
import numpy as np

from intriguing_jax import attack
from intriguing_jax import certify
from intriguing_jax import checkpoint
from intriguing_jax import data
from intriguing_jax import distributed
from intriguing_jax import metrics
from intriguing_jax import paper
from intriguing_jax import plotting
from intriguing_jax import progress
from intriguing_jax import tables
from intriguing_jax import tables_report
from intriguing_jax import train as train_lib
from intriguing_jax.tables import Model

ArrayPair = Tuple[Any, Any]

# The paper's models: (display name, intriguing_jax.train recipe, training data, seed offset). Table 3's
# FC100-100-10 and FC100-100-10' share the recipe and differ in data (P1 / P2) and seed (A16).
TABLE1_MODELS = (("FC10(10^-4)", "fc10-1e-4", "train", 0), ("FC10(10^-2)", "fc10-1e-2", "train", 0),
                 ("FC10(1)", "fc10-1", "train", 0), ("FC100-100-10", "fc100-100-10", "train", 0),
                 ("FC200-200-10", "fc200-200-10", "train", 0), ("AE400-10", "ae400-10", "train", 0))
TABLE3_MODELS = (("FC100-100-10", "fc100-100-10", "p1", 0), ("FC123-456-10", "fc123-456-10", "p1", 0),
                 ("FC100-100-10'", "fc100-100-10", "p2", 1))
CONFIG_FIELDS = ("seeds", "tables", "num_examples", "num_train", "epochs", "chunk_size", "models_dir",
                 "figures", "synthetic_data", "attack", "unrefined")


class AttackRecord(NamedTuple):
  """Attack outputs as numpy arrays: x_adv [N, ...], success [N] bool, c [N], distortion [N] RMS."""
  x_adv: np.ndarray
  success: np.ndarray
  c: np.ndarray
  distortion: np.ndarray


def model_digest(model: Model) -> str:
  """SHA-256 of the apply function's identity (module, qualified name, the repr of a bound method's owner,
  e.g. a Flax module's attributes) and of every parameter leaf's shape, dtype and bytes."""
  fn = model.apply_fn
  owner = getattr(fn, "__self__", None)
  ident = [getattr(fn, "__module__", ""), getattr(fn, "__qualname__", type(fn).__name__),
           "" if owner is None else repr(owner)]
  h = hashlib.sha256(json.dumps(ident).encode())
  for leaf in jax.tree_util.tree_leaves(model.params):
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(f"{a.shape}{a.dtype}".encode() + a.tobytes())
  return h.hexdigest()[:24]


def attack_cached(model: Model, x: Any, targets: Any, *, options: Optional[attack.AttackOptions] = None,
                  cache_dir: Optional[str] = None, chunk_size: int = 500, name: str = "",
                  attack_fn: Optional[Callable] = None) -> AttackRecord:
  """Attacks ``x`` [N, ...] (in [0, 1]) toward ``targets`` [N] int with ``attack_fn(apply_fn, params, x,
  target, options=options)`` (default ``attack.lbfgs_attack``: ``x_adv``, ``success``, ``c`` sized B) in
  ``distributed.stream_map`` chunks of ``chunk_size``, reusing the finished chunks in ``cache_dir`` (None:
  nothing written; ``name`` labels the logs). Returns N rows, ``distortion`` :func:`tables.rms`(x, x_adv)."""
  x = np.asarray(x, np.float32)
  targets = np.asarray(targets)
  if x.ndim < 2 or targets.shape != (x.shape[0],) or not np.issubdtype(targets.dtype, np.integer):
    raise ValueError(f"x must be [N, ...] images and targets [N] integers, got shapes {x.shape}, "
                     f"{targets.shape} and targets dtype {targets.dtype}")
  if not np.all(np.isfinite(x)) or x.min() < 0.0 or x.max() > 1.0:
    raise ValueError(f"x must be finite and lie in [0, 1], got range [{np.min(x):.3g}, {np.max(x):.3g}]")
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
  options, attack_fn = options or attack.AttackOptions(), attack_fn or attack.lbfgs_attack
  key = {"model": model_digest(model), "options": dataclasses.asdict(options),
         "attack": f"{getattr(attack_fn, '__module__', '')}.{getattr(attack_fn, '__qualname__', '')}"}

  def run(params, xb, tb):
    res = attack_fn(model.apply_fn, params, xb, tb, options=options)
    return {"x_adv": res.x_adv, "success": res.success, "c": res.c}

  out = distributed.stream_map(run, x, targets.astype(np.int32), broadcast=(model.params,),
                               chunk_size=chunk_size, workdir=cache_dir, name=f"attack {name}", jit=False,
                               key=json.dumps(key, sort_keys=True, default=repr))
  x_adv = np.asarray(out["x_adv"], np.float32).reshape(x.shape)
  return AttackRecord(x_adv=x_adv, success=np.asarray(out["success"], bool),
                      c=np.asarray(out["c"], np.float32).reshape(-1), distortion=tables.rms(x, x_adv))


def adversarial_sets(models: Mapping[str, Model], x: Any, labels: Any, targets: Any, *,
                     options: Optional[attack.AttackOptions] = None, cache_dir: Optional[str] = None,
                     chunk_size: int = 500, batch_size: int = 1000,
                     attack_fn: Optional[Callable] = None) -> Dict[str, tables.AdversarialSet]:
  """Each model's adversarial set (paper §4.2) of ``x`` [N, ...] in [0, 1], ``labels`` and ``targets`` [N]
  (e.g. :func:`tables.draw_targets`) by :func:`attack_cached`, one cache sub-directory per model."""
  x = np.asarray(x, np.float32)
  labels, targets = np.asarray(labels), np.asarray(targets)
  if labels.shape != (x.shape[0],) or targets.shape != labels.shape:
    raise ValueError(f"labels and targets must have shape ({x.shape[0]},), got {labels.shape} and "
                     f"{targets.shape}")
  out = {}
  for name, m in models.items():
    t0 = time.perf_counter()
    sub = os.path.join(cache_dir, plotting.safe_name(name)) if cache_dir else None
    rec = attack_cached(m, x, targets, options=options, cache_dir=sub, chunk_size=chunk_size, name=name,
                        attack_fn=attack_fn)
    clean = metrics.predict(m.apply_fn, m.params, x, batch_size=batch_size)
    out[name] = tables.AdversarialSet(x=x, labels=labels.astype(np.int32), targets=targets.astype(np.int32),
                                      clean_correct=clean == labels, **rec._asdict())
    logging.info("adversarial set for %s: %d examples, success %.2f%%, av. distortion %.4f (%.0f s)", name,
                 x.shape[0], 100.0 * rec.success.mean(), rec.distortion.mean(), time.perf_counter() - t0)
  return out


def train_models(specs: Sequence[Tuple[str, str, str, int]], parts: Mapping[str, ArrayPair], *, workdir: str,
                 seed: int = 0, epochs: Optional[int] = None, data_tag: str = "") -> Dict[str, Model]:
  """Display name -> Model(model.apply, variables) of each (display name, recipe, part, seed offset) of
  ``specs``, trained or restored (``train.get_or_train`` in ``workdir``) on ``parts[part]`` (images, labels)
  with seed ``seed + offset`` (``epochs``: None keeps the recipe's). Run names: ``train.default_run_name``
  with data tag ``data_tag`` for part "train" ("" for all of MNIST: ``scripts/train.py``'s runs are reused),
  ``<part>[_<data_tag>]`` otherwise."""
  out = {}
  for name, recipe, part, offset in specs:
    s = seed + offset
    tag = data_tag if part == "train" else part + (f"_{data_tag}" if data_tag else "")
    logging.info("model %s (recipe %s on %s, seed %d): training or restoring", name, recipe, part, s)
    model, variables = train_lib.get_or_train(
        recipe, *parts[part], workdir=workdir, seed=s, epochs=epochs,
        run_name=train_lib.default_run_name(recipe, seed=s, epochs=epochs, data_tag=tag))
    out[name] = Model(model.apply, variables)
  return out


def validate(config: Any) -> attack.AttackOptions:
  """Checks a ``configs/reproduce_mnist.py`` config without loading data; returns the attack options."""
  if set(config.keys()) != set(CONFIG_FIELDS):
    raise ValueError(f"config: fields {sorted(config.keys())} differ from {sorted(CONFIG_FIELDS)}")
  tabs, seeds = list(config.tables), list(config.seeds)
  if not tabs or len(set(tabs)) != len(tabs) or not set(tabs) <= {1, 2, 3, 4}:
    raise ValueError(f"config.tables must be distinct values among 1, 2, 3, 4, got {tabs}")
  if not seeds or len(set(seeds)) != len(seeds) or not all(isinstance(s, int) and s >= 0 for s in seeds):
    raise ValueError(f"config.seeds must be distinct non-negative integers, got {seeds}")
  for field, low in (("num_examples", 1), ("num_train", 2), ("epochs", 1), ("chunk_size", 1),
                     ("synthetic_data", 0)):
    if (config[field] is not None or field == "chunk_size") and not (isinstance(config[field], int)
                                                                      and config[field] >= low):
      raise ValueError(f"config.{field} must be an integer >= {low}, got {config[field]!r}")
  if not isinstance(config.unrefined, bool):
    raise ValueError(f"config.unrefined must be True or False, got {config.unrefined!r}")
  try:
    return attack.AttackOptions(**config.attack.to_dict())
  except (TypeError, ValueError) as e:
    raise ValueError(f"config.attack: {e}") from e


def _load_data(config: Any, seed: int, data_dir: Optional[str]) -> Tuple[ArrayPair, ArrayPair]:
  """(train, test), the training set cut to ``config.num_train`` images."""
  n = config.synthetic_data
  train, test = ((data.synthetic_mnist(n, seed=seed), data.synthetic_mnist(max(n // 2, 10), seed=seed + 1))
                 if n else (data.load_mnist("train", data_dir), data.load_mnist("test", data_dir)))
  if config.num_train is not None:
    if config.num_train > train[1].shape[0]:
      raise ValueError(f"config.num_train={config.num_train} exceeds the {train[1].shape[0]} training images")
    train = (train[0][:config.num_train], train[1][:config.num_train])
  n = train[1].shape[0]
  if config.num_examples is not None and config.num_examples > n and set(config.tables) & {1, 2}:
    raise ValueError(f"config.num_examples={config.num_examples} exceeds the {n} training images")
  return train, test


def _attack_group(config, options, specs, parts, attacked, seed, workdir, group, timings):
  """Trains/restores the models of ``specs`` and attacks the same examples of ``attacked`` on each: (models,
  adversarial sets, and the sets of the paper's method alone, ``refine=False``, when ``config.unrefined``
  asks for them and the options refine; else None)."""
  data_tag = "_".join((["synthetic"] if config.synthetic_data else [])
                      + ([f"first{config.num_train}"] if config.num_train is not None else []))
  with progress.Timer() as t:
    models = train_models(specs, parts, workdir=config.models_dir or os.path.join(workdir, "models"),
                          seed=seed, epochs=config.epochs, data_tag=data_tag)
  timings[f"seed{seed}: train/restore the {group}-set models"] = t.seconds
  x, y = attacked
  n = config.num_examples and min(config.num_examples, y.shape[0])
  idx = tables.select_examples(y.shape[0], n, seed=seed)
  targets = tables.draw_targets(y, seed=seed)[idx]
  with progress.Timer() as t:
    adv = adversarial_sets(models, x[idx], y[idx], targets, options=options, chunk_size=config.chunk_size,
                           cache_dir=os.path.join(workdir, "attacks", f"seed{seed}", group))
  timings[f"seed{seed}: attacks on {len(idx)} {group} images x {len(models)} models"] = t.seconds
  unrefined = None
  if config.unrefined and options.refine:
    with progress.Timer() as t:
      sub = os.path.join(workdir, "attacks", f"seed{seed}", f"{group}_unrefined")
      unrefined = adversarial_sets(models, x[idx], y[idx], targets, chunk_size=config.chunk_size,
                                   options=dataclasses.replace(options, refine=False), cache_dir=sub)
    timings[f"seed{seed}: refine=False attacks on {group} images"] = t.seconds
  return models, adv, unrefined


def _with_unrefined(rows: Sequence[dict], unrefined: Optional[Mapping[str, tables.AdversarialSet]],
                    distortion_key: str) -> List[dict]:
  """Table 1/3 rows with ``<distortion_key>_unrefined`` and ``success_rate_unrefined`` (the paper's method
  alone, ``refine=False``) beside the refined attack's, when ``unrefined`` sets are given."""
  if unrefined is None:
    return list(rows)
  return [dict(r, **{f"{distortion_key}_unrefined": float(np.mean(unrefined[r["model"]].distortion)),
                     "success_rate_unrefined": float(np.mean(unrefined[r["model"]].success))}) for r in rows]


def lipschitz_matrices(models: Mapping[str, Model], input_shape: Sequence[int]) -> Dict[str, Any]:
  """Name -> ``certify.lipschitz_matrix`` of each model, whose ``apply_fn`` must be a Flax ``model.apply``."""
  out = {}
  for name, m in models.items():
    module = getattr(m.apply_fn, "__self__", None)
    if not isinstance(module, nn.Module):
      raise ValueError(f"lipschitz_matrices: the apply_fn of {name!r} is not a Flax module's apply, so its "
                       "layers (and Lipschitz bounds) are unknown")
    out[name] = certify.lipschitz_matrix(module, m.params, input_shape)
  return out


def _run_seed(config, options, seed, train, test, workdir, timings):
  """The requested tables of one seed: (name -> rows, figures)."""
  out, figures, wanted = {}, [], set(config.tables)
  if wanted & {1, 2}:
    models, adv, unref = _attack_group(config, options, TABLE1_MODELS, {"train": train}, train, seed, workdir,
                                       "train", timings)
    out["bracket_train"] = certify.bracket(models, adv, lipschitz_matrices(models, train[0].shape[1:]))
    t1 = lambda: _with_unrefined(tables.table1(models, adv, train, test), unref, "av_min_distortion")
    out.update({f"table{k}": f() for k, f in ((1, t1),
                                              (2, lambda: tables.table2(models, adv, seed=seed)))
                if k in wanted})
    if config.figures:
      pair = [n for n in ("FC10(10^-4)", "FC200-200-10") if n in models]
      figures += tables_report.save_figures(workdir, adv, models, prefix=f"seed{seed}_train",
                                            pair_models=pair, seed=seed)
  if wanted & {3, 4}:
    p1, p2 = data.split_p1_p2(*train)
    models, adv, unref = _attack_group(config, options, TABLE3_MODELS, {"p1": p1, "p2": p2}, test, seed,
                                       workdir, "test", timings)
    out["bracket_test"] = certify.bracket(models, adv, lipschitz_matrices(models, test[0].shape[1:]))
    t3 = lambda: _with_unrefined(tables.table3(models, adv, p1, p2, test), unref, "min_av_distortion")
    out.update({f"table{k}": f() for k, f in ((3, t3), (4, lambda: tables.table4(models, adv, seed=seed)))
                if k in wanted})
    if 4 in wanted:
      out["table4_diagonal"] = tables.magnified_diagonal(models, adv)
    if config.figures:
      figures += tables_report.save_figures(workdir, adv, models, prefix=f"seed{seed}_test", seed=seed)
  logging.info("seed %d: tables %s done", seed, ", ".join(sorted(out)))
  return out, figures


def run_experiment(config: Any, workdir: str, data_dir: Optional[str] = None) -> Dict[str, Any]:
  """Runs the Tables 1-4 reproduction of ``config`` (``configs/reproduce_mnist.py``, validated before any
  data is loaded) in ``workdir``. For each seed: load the data (``data_dir``, else
  ``$INTRIGUING_JAX_MNIST_DIR``, else tfds), train or restore the models, attack, build the tables (and
  figures, first seed only). Writes and returns ``workdir/results.json`` (tables aggregated over seeds, per
  seed, the claims, timings, readings, the paper's values), then ``report.md`` / ``report.html``; resumes."""
  options = validate(config)
  t_start = time.perf_counter()
  per_seed, figures, timings = {}, [], {}
  for seed in config.seeds:
    with progress.Timer() as t:
      train, test = _load_data(config, seed, data_dir)
    timings[f"seed{seed}: load data"] = t.seconds
    logging.info("seed %d: %d training / %d test images, tables %s, %s examples per set", seed,
                 train[1].shape[0], test[1].shape[0], list(config.tables), config.num_examples or "all")
    per_seed[seed], figs = _run_seed(config, options, seed, train, test, workdir, timings)
    figures = figures or figs
  first = per_seed[config.seeds[0]]
  keys = {"table1": "model", "table2": "row", "table3": "model", "table4": "row", "table4_diagonal": "row",
          "bracket_train": "model", "bracket_test": "model"}
  results = {name: tables_report.aggregate_rows([per_seed[s][name] for s in config.seeds], key)
             for name, key in keys.items() if name in first}
  results["claims"] = tables_report.qualitative_claims(results, lambda_order=paper.LAMBDA_ORDER)
  timings["total"] = time.perf_counter() - t_start
  default = dataclasses.asdict(attack.AttackOptions())
  changed = {k: v for k, v in dataclasses.asdict(options).items() if v != default[k]}
  results.update(config=dict(config.to_dict(), attack=changed), timings=timings,
                 readings=list(paper.READINGS), per_seed={str(s): r for s, r in per_seed.items()},
                 paper=paper.PAPER)
  if config.synthetic_data or config.num_train is not None or config.epochs is not None:
    results["notes"] = ["The models are trained on a subset or for fewer epochs than the recipes (see the "
                        "settings), so these numbers are a smoke test, not a reproduction."]
  checkpoint.atomic_write_json(os.path.join(workdir, "results.json"), results)
  md, html = tables_report.build_report(results, figures=figures).write(workdir, "report")
  logging.info("wrote %s, %s and %s in %.1f s", os.path.join(workdir, "results.json"), md, html,
               timings["total"])
  return results
