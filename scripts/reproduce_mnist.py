r"""Reproduces Tables 1-4 of Szegedy et al. (2014) on MNIST, with figures and a report beside the paper's numbers.

Quick smoke version (real MNIST from ../shared/data/mnist or $INTRIGUING_JAX_MNIST_DIR; 10000 training
images, 2 epochs, 100 examples per model and set, a lighter attack). Measured: 14.7 min wall / 3.7 min CPU on
a 2-core box shared with other jobs (load average ~16); most of it is the attack (five compiles, one per
architecture, and ~1 example/s for the sigmoid nets). All five qualitative claims held::

    python scripts/reproduce_mnist.py --quick --workdir=runs/mnist_quick

Fully trained models (reusing scripts/train.py's runs), 200 attacked examples per model and set. Measured:
27.7 min wall / 6 min CPU on the shared 2-core box (of which 6.5 min training AE400-10); every Table 1
distortion within 26% of the paper's (FC100-100-10 0.059 vs 0.058), Table 2 diagonal 100%, all claims held::

    python scripts/reproduce_mnist.py --workdir=runs/mnist_200 --models_dir=runs/models --num_examples=200 \
        --chunk_size=100 --attack_option=maxiter=50 --attack_option=num_bisection=5

Full paper setting (every training image attacked for Tables 1-2, every test image for Tables 3-4). Not run:
projected from the measured attack rates at ~60 h on that shared box, roughly 7-10 h on an idle 2-core
machine (notes/tables.md); chunks are saved, so it can be spread over several sessions::

    python scripts/reproduce_mnist.py --workdir=runs/mnist --models_dir=runs/models

Outputs in --workdir: ``results.json`` (every table per seed, the aggregate, the claims, timings),
``report.md`` + ``report.html`` (our numbers / the paper's, the qualitative claims checked on our numbers,
the readings chosen for the paper's ambiguities, Figures 5-7 analogues), ``figures/*.png``, the trained
models (``models/``), the attack chunks (``attacks/``) and ``metrics.jsonl``. Everything is resumable:
rerunning the same command after an interruption restores finished models and attack chunks.
"""

from __future__ import annotations

import ast
import os
import pathlib
import sys
import time

from absl import app
from absl import flags
from absl import logging

from intriguing_jax import checkpoint
from intriguing_jax import data
from intriguing_jax import progress
from intriguing_jax import transfer
from intriguing_jax import transfer_report

_REPO = pathlib.Path(__file__).resolve().parents[1]
_DEFAULT_MNIST = _REPO.parent / "shared" / "data" / "mnist"

_WORKDIR = flags.DEFINE_string("workdir", None, "Output and resume directory (default runs/mnist, or "
                               "runs/mnist_quick with --quick).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "MNIST IDX directory (default $INTRIGUING_JAX_MNIST_DIR, else "
                                "../shared/data/mnist when present, else tfds).")
_NUM_EXAMPLES = flags.DEFINE_integer("num_examples", None, "Examples attacked per model and set (a seeded random "
                                     "subset); default: the whole named set (paper setting), 100 with --quick.",
                                     lower_bound=1)
_NUM_TRAIN = flags.DEFINE_integer("num_train", None, "Train the models on the first N training images (and split "
                                  "those into P1/P2); default all 60000, 10000 with --quick.", lower_bound=2)
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Seeds (model init, example subset, targets, noise); tables are "
                           "averaged over seeds.")
_TABLES = flags.DEFINE_list("tables", ["1", "2", "3", "4"], "Which tables to reproduce (subset of 1,2,3,4).")
_QUICK = flags.DEFINE_bool("quick", False, "Tiny smoke run: few epochs, 100 examples, lighter attack.")
_EPOCHS = flags.DEFINE_integer("epochs", None, "Override every model's training epochs (default: the recipes; "
                               "2 with --quick).", lower_bound=1)
_CHUNK = flags.DEFINE_integer("chunk_size", 500, "Examples per attack call; each finished chunk is saved.",
                              lower_bound=1)
_ATTACK_OPTIONS = flags.DEFINE_multi_string("attack_option", [], "key=value option for attack.lbfgs_attack "
                                            "(repeatable; values are Python literals), e.g. "
                                            "--attack_option=maxiter=50 --attack_option=c_grid=[0.1,10].")
_MODELS_DIR = flags.DEFINE_string("models_dir", None, "Where models are trained or restored (default "
                                  "<workdir>/models); e.g. runs/models to reuse scripts/train.py's runs.")
_FIGURES = flags.DEFINE_bool("figures", True, "Write the Figure 5/7 analogues and distortion histograms.")
_SYNTHETIC = flags.DEFINE_integer("synthetic_data", 0, "Testing only: use N synthetic training and N/2 test "
                                  "images (intriguing_jax.data.synthetic_mnist) instead of MNIST; 0 = off.",
                                  lower_bound=0)

# Lighter attack for --quick (the defaults are attack.lbfgs_attack's own).
_QUICK_ATTACK = {"maxiter": 50, "num_bisection": 5}


def _parse_attack_options(items):
  opts = {}
  for item in items:
    if "=" not in item:
      raise app.UsageError(f"--attack_option must be key=value, got {item!r}")
    k, v = item.split("=", 1)
    try:
      opts[k.strip()] = ast.literal_eval(v.strip())
    except (ValueError, SyntaxError):
      opts[k.strip()] = v.strip()
  return opts


def _load_data(seed: int):
  if _SYNTHETIC.value:
    n = _SYNTHETIC.value
    return data.synthetic_mnist(n, seed=seed), data.synthetic_mnist(max(n // 2, 10), seed=seed + 1)
  data_dir = _DATA_DIR.value
  if data_dir is None and not os.environ.get(data.ENV_VAR) and _DEFAULT_MNIST.is_dir():
    data_dir = str(_DEFAULT_MNIST)
  return data.load_mnist("train", data_dir), data.load_mnist("test", data_dir)


def _run_seed(seed, tables, train, test, workdir, num_examples, num_train, epochs, attack_options, writer,
              timings):
  """All requested tables for one seed: (results dict of rows, figures)."""
  out, figures = {}, []
  models_dir = _MODELS_DIR.value or os.path.join(workdir, "models")
  # Run-name tag of the training set: "" for the full MNIST training set (shared with scripts/train.py).
  data_tag = ("_synthetic" if _SYNTHETIC.value else "") + (f"_first{num_train}" if num_train is not None else "")
  attack_kw = dict(attack_options=attack_options, chunk_size=_CHUNK.value)
  tag = f"seed{seed}"
  if tables & {1, 2}:
    with progress.Timer() as t:
      t1_models = transfer.table1_models(train, workdir=models_dir, seed=seed, epochs=epochs,
                                         data_tag=data_tag.lstrip("_"))
    timings[f"{tag}: train/restore Table 1 models"] = t.seconds
    fns = transfer.logits_fns(t1_models)
    idx = transfer.select_examples(train[1].shape[0], num_examples, seed=seed)
    targets = transfer.draw_targets(train[1], seed=seed)[idx]
    with progress.Timer() as t:
      adv = transfer.adversarial_sets(t1_models, train[0][idx], train[1][idx], targets,
                                      cache_dir=os.path.join(workdir, "attacks", tag, "train"), **attack_kw)
    timings[f"{tag}: attacks on {len(idx)} training images x {len(t1_models)} models"] = t.seconds
    if 1 in tables:
      out["table1"] = transfer.table1(fns, train, test, adversarial=adv)
      writer.write(step=seed, stage="table1", **{f"{r['model']}/distortion": r["av_min_distortion"]
                                                 for r in out["table1"]})
    if 2 in tables:
      out["table2"] = transfer.table2(fns, adversarial=adv, seed=seed)
      writer.write(step=seed, stage="table2")
    if _FIGURES.value:
      pair = [n for n in ("FC10(10^-4)", "FC200-200-10") if n in fns]
      figures += transfer_report.save_figures(workdir, adv, fns, prefix=f"{tag}_train", pair_models=pair, seed=seed)
  if tables & {3, 4}:
    p1, p2 = data.split_p1_p2(*train)
    with progress.Timer() as t:
      t3_models = transfer.table3_models(p1, p2, workdir=models_dir, seed=seed, epochs=epochs,
                                         data_tag=data_tag)
    timings[f"{tag}: train/restore Table 3 models"] = t.seconds
    fns = transfer.logits_fns(t3_models)
    idx = transfer.select_examples(test[1].shape[0], num_examples and min(num_examples, test[1].shape[0]),
                                   seed=seed)
    targets = transfer.draw_targets(test[1], seed=seed)[idx]
    with progress.Timer() as t:
      adv = transfer.adversarial_sets(t3_models, test[0][idx], test[1][idx], targets,
                                      cache_dir=os.path.join(workdir, "attacks", tag, "test"), **attack_kw)
    timings[f"{tag}: attacks on {len(idx)} test images x {len(t3_models)} models"] = t.seconds
    if 3 in tables:
      out["table3"] = transfer.table3(fns, p1, p2, test, adversarial=adv)
      writer.write(step=seed, stage="table3")
    if 4 in tables:
      out["table4"] = transfer.table4(fns, adversarial=adv, seed=seed)
      writer.write(step=seed, stage="table4")
    if _FIGURES.value:
      figures += transfer_report.save_figures(workdir, adv, fns, prefix=f"{tag}_test", seed=seed)
  return out, figures


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  t_start = time.perf_counter()
  quick = _QUICK.value
  try:
    tables = {int(t) for t in _TABLES.value}
  except ValueError as e:
    raise app.UsageError(f"--tables must be integers in 1..4, got {_TABLES.value}") from e
  if not tables or not tables <= {1, 2, 3, 4}:
    raise app.UsageError(f"--tables must be a non-empty subset of 1,2,3,4, got {_TABLES.value}")
  try:
    seeds = [int(s) for s in _SEEDS.value]
  except ValueError as e:
    raise app.UsageError(f"--seeds must be integers, got {_SEEDS.value}") from e
  if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
    raise app.UsageError(f"--seeds must be distinct non-negative integers, got {_SEEDS.value}")
  workdir = _WORKDIR.value or str(_REPO / "runs" / ("mnist_quick" if quick else "mnist"))
  num_examples = _NUM_EXAMPLES.value if _NUM_EXAMPLES.value is not None else (100 if quick else None)
  num_train = _NUM_TRAIN.value if _NUM_TRAIN.value is not None else (10000 if quick else None)
  epochs = _EPOCHS.value if _EPOCHS.value is not None else (2 if quick else None)
  attack_options = dict(_QUICK_ATTACK) if quick else {}
  attack_options.update(_parse_attack_options(_ATTACK_OPTIONS.value))
  progress.log_run_start(workdir, flags.FLAGS)
  writer = progress.MetricWriter(workdir)

  per_seed, figures, timings = {}, [], {}
  for seed in seeds:
    with progress.Timer() as t:
      train, test = _load_data(seed)
    timings[f"seed{seed}: load data"] = t.seconds
    if num_train is not None:
      if num_train > train[1].shape[0]:
        raise app.UsageError(f"--num_train={num_train} exceeds the {train[1].shape[0]} training images")
      train = (train[0][:num_train], train[1][:num_train])
    if num_examples is not None and num_examples > train[1].shape[0] and tables & {1, 2}:
      raise app.UsageError(f"--num_examples={num_examples} exceeds the {train[1].shape[0]} training images")
    logging.info("seed %d: %d training / %d test images, tables %s, %s examples per set", seed,
                 train[1].shape[0], test[1].shape[0], sorted(tables), num_examples or "all")
    per_seed[seed], figs = _run_seed(seed, tables, train, test, workdir, num_examples, num_train, epochs,
                                     attack_options, writer, timings)
    if seed == seeds[0]:
      figures = figs

  agg_keys = {"table1": "model", "table2": "row", "table3": "model", "table4": "row"}
  results = {name: transfer_report.aggregate_rows([per_seed[s][name] for s in seeds], key)
             for name, key in agg_keys.items() if name in per_seed[seeds[0]]}
  results["claims"] = transfer_report.qualitative_claims(results, lambda_order=transfer.LAMBDA_ORDER)
  timings["total"] = time.perf_counter() - t_start
  results.update({
      "command": " ".join(["python", "scripts/reproduce_mnist.py"] + sys.argv[1:]),
      "config": {"workdir": workdir, "seeds": seeds, "tables": sorted(tables), "quick": quick,
                 "examples attacked per model and set": num_examples or "all",
                 "training images": num_train or "all", "epochs": epochs or "recipe defaults",
                 "attack options": attack_options or "lbfgs_attack defaults",
                 "data": "synthetic" if _SYNTHETIC.value else "MNIST"},
      "timings": timings,
      "readings": list(transfer.READINGS),
      "per_seed": {str(s): r for s, r in per_seed.items()},
      "paper": transfer.PAPER,
  })
  if quick:
    results["notes"] = ["Quick mode: models trained for a few epochs on a subset and a lighter attack on 100 "
                        "examples, so the numbers are a smoke test, not a reproduction."]
  checkpoint.atomic_write_json(os.path.join(workdir, "results.json"), results)
  md, html = transfer_report.build_report(results, figures=figures).write(workdir, "report")
  for c in results["claims"]:
    logging.info("claim %s: %s %s", "HOLDS" if c["holds"] else "DOES NOT HOLD", c["claim"], c["evidence"])
  logging.info("wrote %s, %s and %s in %.1fs", os.path.join(workdir, "results.json"), md, html, timings["total"])


if __name__ == "__main__":
  app.run(main)
