r"""Adversarial training with pools of adversarial examples vs weight decay vs dropout (paper §4.2 claim).

Trains FC100-100-10 three ways on MNIST -- weight decay only, weight decay + dropout, weight decay + pools
of adversarial examples (intriguing_jax.adversarial_training; by default one pool on the input) -- then measures
each model's test error and the average minimum distortion the L-BFGS attack (same settings for all)
needs to fool it on a fixed subset of test images. Writes ``results.json`` and ``report.md``/``.html``.

Command (real MNIST from ../shared/data/mnist or $INTRIGUING_JAX_MNIST_DIR; the runs are independent and
resumable, so they can run as three processes and a final call assembles the report)::

    python scripts/adversarial_training.py --workdir=runs/adversarial_training
    # or, in parallel:  --runs=weight_decay / --runs=dropout / --runs=adversarial, then the line above.

The defaults are the setting chosen on a validation split (session 4, notes/adversarial_training.md):
150 epochs of Adam at lr 1e-2 (cosine) for every run; dropout 0.1 (hidden) / 0.05 (pixels) for the dropout
run and, with --adv_dropout, the adversarial run; one input pool of 640 examples, 16 of which are replaced
every 4 steps by new examples of the current network (untargeted L-BFGS, 10 iterations) placed along the
attack's direction at an RMS distortion of 0.035 (--pool_rms); 10% of every batch is drawn from the pool.

Expected runtime and result (2 CPU cores, two seeds at a time, session 4; BUILD_NOTES.md, "Adversarial
training (issue 8)"): ~9 min per seed for the three runs and the attacks (weight decay ~1.5 min, dropout
~2.5 min, adversarial ~5.5 min). Test error over seeds 0-7: pool 1.15-1.31% (mean 1.23%; <= 1.2% on seeds
0 and 3), dropout 1.28-1.48% (mean 1.37%), weight decay 1.54-1.80% (mean 1.68%); av. min. distortion
0.080-0.086 vs 0.058-0.066 for weight decay.

Smoke test (2000 training images, 2 epochs, small pools; 16 s on an idle 2-core machine)::

    python scripts/adversarial_training.py --smoke --workdir=/tmp/adv_smoke

The earlier, paper-like configuration (no dropout in the adversarial run, pools on the input and both
hidden layers with examples AT the decision boundary, 40 epochs at lr 1e-3) ended between 1.9% and 3.3%
test error (notes/adversarial_training.md)::

    python scripts/adversarial_training.py --epochs=40 --learning_rate=1e-3 --noadv_dropout \
        --pool_layers=input,hidden_0,hidden_1 --pool_size=5000 --refresh_every=50 --refresh_fraction=0.02 \
        --mix_ratio=0.3 --pool_rms=0 --nopool_untargeted --pool_maxiter=10 --dropout_rate=0.2 \
        --input_dropout_rate=0.1

Many seeds at once (each run is ONE compiled program over the seeds, vmapped; the report gives every seed,
the mean and the standard deviation; seed S of the sweep is the ``--seed=S`` run computed with vmap's float
rounding when S is also --seed, and otherwise differs from it in the batch order too, which is --seed's;
over 150 epochs rounding alone makes it another draw of the same setting: 1.43 % vs 1.42 % validation
error for seed 0. On 2 CPU cores two separate processes are faster; the sweep is meant for accelerators)::

    python scripts/adversarial_training.py --workdir=runs/adv_sweep --sweep_seeds=0,1,2,3,4,5,6,7

Screening on the validation split (the test set is not evaluated; no distortion attack)::

    python scripts/adversarial_training.py --workdir=runs/adv_scr/NAME --num_val=10000 --num_attack=0 ...
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pathlib
import time

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from intriguing_jax import adversarial_training as at
from intriguing_jax import checkpoint
from intriguing_jax import data
from intriguing_jax import metrics
from intriguing_jax import models
from intriguing_jax import progress
from intriguing_jax import report
from intriguing_jax import train
from intriguing_jax import transfer

_REPO = pathlib.Path(__file__).resolve().parents[1]
_DEFAULT_MNIST = _REPO.parent / "shared" / "data" / "mnist"
RUNS = ("weight_decay", "dropout", "adversarial")
PAPER = {"weight_decay": 0.016, "dropout": 0.013, "adversarial": 0.012}
MODEL = "fc100-100-10"

_WORKDIR = flags.DEFINE_string("workdir", "runs/adversarial_training", "Output and resume directory.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "MNIST IDX directory (default $INTRIGUING_JAX_MNIST_DIR, "
                                "else ../shared/data/mnist).")
_RUNS = flags.DEFINE_multi_enum("runs", list(RUNS), RUNS, "Which runs to train/evaluate in this call.")
_SEED = flags.DEFINE_integer("seed", 0, "Init, data order, pool and attack-subset seed.", lower_bound=0)
_EPOCHS = flags.DEFINE_integer("epochs", 150, "Epochs of every run (the recipe of train.RECIPES otherwise).",
                               lower_bound=1)
_LR = flags.DEFINE_float("learning_rate", 1e-2, "Adam peak learning rate (cosine schedule).", lower_bound=1e-8)
_BATCH = flags.DEFINE_integer("batch_size", 128, "Clean examples per step.", lower_bound=1)
_NUM_TRAIN = flags.DEFINE_integer("num_train", None, "Use the first N training images (default all).",
                                  lower_bound=100)
_DROPOUT = flags.DEFINE_float("dropout_rate", 0.1, "Dropout on the hidden layers (dropout run; adversarial run "
                              "with --adv_dropout).",
                              lower_bound=0.0, upper_bound=0.95)
_INPUT_DROPOUT = flags.DEFINE_float("input_dropout_rate", 0.05, "Dropout on the pixels (as --dropout_rate).",
                                    lower_bound=0.0, upper_bound=0.95)
_POOL_LAYERS = flags.DEFINE_list("pool_layers", ["input"], "Pools (input, hidden_k).")
_POOL_SIZE = flags.DEFINE_integer("pool_size", 640, "Examples per pool.", lower_bound=1)
_REFRESH_EVERY = flags.DEFINE_integer("refresh_every", 4, "Steps between refreshes.", lower_bound=1)
_REFRESH_FRACTION = flags.DEFINE_float("refresh_fraction", 0.025, "Fraction of each pool replaced per "
                                       "refresh (x --pool_size = new examples per refresh: 16 by default).",
                                       lower_bound=1e-6, upper_bound=1.0)
_MIX = flags.DEFINE_float("mix_ratio", 0.1, "Fraction of each mixed batch drawn from the pools.",
                          lower_bound=0.01, upper_bound=0.95)
_WARMUP = flags.DEFINE_float("warmup_epochs", 2.0, "Clean epochs before the pools are filled.", lower_bound=0.0)
_POOL_MAXITER = flags.DEFINE_integer("pool_maxiter", 10, "L-BFGS iterations of the pool attack.", lower_bound=1)
_POOL_C = flags.DEFINE_list("pool_c_grid", ["0.1", "1.0"], "c values of the pool attack.")
_POOL_UNTARGETED = flags.DEFINE_bool("pool_untargeted", True, "Untargeted pool attack (--nopool_untargeted: "
                                      "toward random wrong targets).")
_POOL_REFINE = flags.DEFINE_bool("pool_refine", True, "Refine pool examples back to the decision boundary "
                                  "(a no-op, skipped, with --pool_rms).")
_POOL_SCALE = flags.DEFINE_float("pool_scale", 1.0, "Stored pool example = clip(h + s (h_adv - h)): s < 1 stops "
                                 "short of the boundary, s > 1 goes past it.", lower_bound=1e-6)
_POOL_RMS = flags.DEFINE_float("pool_rms", 0.035, "Stored pool example = the attack's direction at this RMS "
                               "distortion: closer boundaries are crossed. 0: off (then --pool_scale rules).",
                               lower_bound=0.0)
_POOL_LOSS_WEIGHT = flags.DEFINE_float("pool_loss_weight", 1.0, "Weight of a pool example relative to a clean "
                                       "one in the batch loss.", lower_bound=1e-6)
_ADV_DROPOUT = flags.DEFINE_bool("adv_dropout", True, "Train the adversarial run with dropout too (the dropout "
                                  "run's --dropout_rate/--input_dropout_rate); the paper's used none.")
_WEIGHT_DECAY = flags.DEFINE_list("weight_decay", None, "λ per layer for every run (default: train.RECIPES').")
_ADV_WEIGHT_DECAY = flags.DEFINE_list("adv_weight_decay", None, "λ per layer for the adversarial run only "
                                      "(default: as --weight_decay).")
_NUM_VAL = flags.DEFINE_integer("num_val", 0, "Hold out this many training images (data.train_val_split, seed 0) "
                                "and report the error on them instead of the test set (for choosing settings "
                                "without looking at the test set); 0 = train on all, report test error.",
                                lower_bound=0)
_NUM_ATTACK = flags.DEFINE_integer("num_attack", 100, "Evaluation images attacked per model for the distortion "
                                   "(0: no distortion measurement).", lower_bound=0)
_ATTACK_MAXITER = flags.DEFINE_integer("attack_maxiter", 100, "L-BFGS iterations of the evaluation attack.",
                                       lower_bound=1)
_ATTACK_BISECTION = flags.DEFINE_integer("attack_bisection", 10, "c bisection rounds of the evaluation attack.",
                                         lower_bound=0)
_CHUNK = flags.DEFINE_integer("chunk_size", 100, "Examples per evaluation attack call (cached chunks).",
                              lower_bound=1)
_SWEEP_SEEDS = flags.DEFINE_list("sweep_seeds", None, "Train each run for these seeds as ONE vmapped program "
                                  "(train.train_sweep, adversarial_training.train_with_pool_sweep; every seed "
                                  "sees the batch order of --seed, which also picks the attacked images) and "
                                  "report every seed and the mean. Results go to WORKDIR/<run>/ as for one seed.")
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny run: 2000 training images, 2 epochs, small pools, 20 attacks.")


def _settings():
  """Effective settings (the --smoke overrides applied)."""
  s = dict(epochs=_EPOCHS.value, num_train=_NUM_TRAIN.value, pool_size=_POOL_SIZE.value,
           num_attack=_NUM_ATTACK.value, refresh_every=_REFRESH_EVERY.value, attack_maxiter=_ATTACK_MAXITER.value,
           warmup_epochs=_WARMUP.value)
  if _SMOKE.value:  # 15 steps per epoch: pools filled after half an epoch, refreshed every 5 steps
    s.update(epochs=2, num_train=2000, pool_size=200, num_attack=20, refresh_every=5, attack_maxiter=30,
             warmup_epochs=0.5)
  return s


def _load():
  data_dir = _DATA_DIR.value
  if data_dir is None and not os.environ.get(data.ENV_VAR) and _DEFAULT_MNIST.is_dir():
    data_dir = str(_DEFAULT_MNIST)
  return data.load_mnist("train", data_dir), data.load_mnist("test", data_dir)


def _digest(variables) -> str:
  h = hashlib.sha256()
  for leaf in jax.tree_util.tree_leaves(variables):
    h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  return h.hexdigest()[:16]


def _err_key():
  """Name of the reported error: "val_error" with --num_val (the test set is not used), else "test_error"."""
  return "val_error" if _NUM_VAL.value else "test_error"


def _restore_finished(name, run_dir, want):
  """(variables as stored, result) of a finished run in ``run_dir`` whose settings are ``want``; None when
  the run is not finished. A finished run with other settings is an error that names them."""
  result_path = os.path.join(run_dir, "result.json")
  final_path = os.path.join(run_dir, "final.msgpack")
  if not (os.path.exists(result_path) and os.path.exists(final_path)):
    return None
  result = checkpoint.read_json(result_path)
  want = json.loads(json.dumps(want))
  diff = sorted(k for k in want if result.get(k) != want[k])
  if diff:
    raise ValueError(f"{run_dir} holds a finished run with other settings ({', '.join(diff)}); use another "
                     "--workdir or delete that run directory")
  logging.info("%s: restored from %s", name, run_dir)
  return jax.tree.map(jnp.asarray, checkpoint.load_pytree(final_path)), result


def _run_model(name):
  """FC100-100-10 as trained by run ``name`` (dropout for the dropout run, and the adversarial run with
  --adv_dropout)."""
  if name == "dropout" or (name == "adversarial" and _ADV_DROPOUT.value):
    return models.get_model(MODEL, dropout_rate=_DROPOUT.value, input_dropout_rate=_INPUT_DROPOUT.value)
  return models.get_model(MODEL)


def _train_run(name, train_data, test_data, config, pool_config, run_dir):
  """Trains (or resumes) one run; returns (variables, result dict). Finished runs are restored."""
  finished = _restore_finished(name, run_dir, _run_settings(name, config, pool_config))
  if finished is not None:
    return finished
  x, y = train_data
  t0 = time.perf_counter()
  if name == "adversarial":
    res = at.train_with_pool(_run_model(name), x, y, config, pool_config, seed=_SEED.value,
                             workdir=os.path.join(run_dir, "train"), eval_data=test_data)
  else:
    res = train.train_model(_run_model(name), x, y, config, seed=_SEED.value,
                            workdir=os.path.join(run_dir, "train"), eval_data=test_data)
  seconds = time.perf_counter() - t0
  eval_model = models.get_model(MODEL)
  fn = functools.partial(eval_model.apply, res.variables)
  history = [{k: (float(np.asarray(v)) if np.ndim(v) == 0 else np.asarray(v).tolist()) for k, v in h.items()}
             for h in res.history]
  result = {"run": name, _err_key(): metrics.error_rate(fn, *test_data),
            "train_error": metrics.error_rate(fn, *train_data), "train_seconds_this_call": seconds,
            "epoch_seconds": [h["seconds"] for h in history], "history": history,
            **_run_settings(name, config, pool_config)}
  checkpoint.save_pytree(os.path.join(run_dir, "final.msgpack"), res.variables)
  checkpoint.atomic_write_json(os.path.join(run_dir, "result.json"), result)
  logging.info("%s: %s %.4f (%.0fs)", name, _err_key(), result[_err_key()], seconds)
  return res.variables, result


def _run_settings(name, config, pool_config):
  """The settings that define a run (stored in its result.json, checked when it is restored)."""
  out = {"config": config.to_dict(), "pool_config": pool_config.to_dict() if name == "adversarial" else None,
          "dropout": ({"dropout_rate": _DROPOUT.value, "input_dropout_rate": _INPUT_DROPOUT.value}
                      if name == "dropout" or (name == "adversarial" and _ADV_DROPOUT.value) else None)}
  if _NUM_VAL.value:  # stored only when used, so that earlier runs' settings still match
    out["num_val"] = _NUM_VAL.value
  return out


def _generation_timing(variables, train_data, pool_config, result, reference=None):
  """Seconds of one refresh (all pools) with the final params, and its share of an adversarial epoch.

  The refresh is timed as a standalone call, which on an accelerator includes dispatch and synchronisation
  that the refresh inside the jitted epoch does not pay (on an H200 the estimate exceeded the whole epoch).
  ``reference`` = (name, result) of the run trained the same way without pools (dropout with
  --adv_dropout, else weight decay): the measured share of the adversarial epoch that the pools add
  (generation plus the pool rows of every step) is ``1 - reference epoch / adversarial epoch``.
  """
  model = models.get_model(MODEL)
  layers = at.model_pool_layers(model, pool_config.layers)
  gen = at.make_generate_fn(layers, pool_config, 10)
  x, y = jnp.asarray(train_data[0]), jnp.asarray(train_data[1])
  out = gen(variables["params"], x, y, jax.random.PRNGKey(0))
  jax.block_until_ready(out)
  times = []
  for i in range(3):
    t0 = time.perf_counter()
    jax.block_until_ready(gen(variables["params"], x, y, jax.random.PRNGKey(i + 1)))
    times.append(time.perf_counter() - t0)
  per_refresh = float(np.median(times))
  steps = train_data[0].shape[0] // _BATCH.value
  epoch_s = result["epoch_seconds"][1:] or result["epoch_seconds"]
  per_epoch = per_refresh * steps / pool_config.refresh_every
  stats = {name: {"success": float(np.mean(np.asarray(r.success))), "distortion": float(np.mean(np.asarray(
      r.distortion)))} for name, (_, r) in out.items()}
  timing = {"seconds_per_refresh": per_refresh, "refresh_size": pool_config.refresh_size,
            "refreshes_per_epoch": steps / pool_config.refresh_every,
            "generation_seconds_per_epoch": per_epoch, "median_epoch_seconds": float(np.median(epoch_s)),
            "generation_share_of_epoch": per_epoch / float(np.median(epoch_s)), "final_params_attack": stats}
  if reference is not None:
    ref_name, ref_result = reference
    ref_s = ref_result["epoch_seconds"][1:] or ref_result["epoch_seconds"]
    timing["reference_run"] = ref_name
    timing["reference_median_epoch_seconds"] = float(np.median(ref_s))
    timing["pool_share_of_epoch_vs_reference"] = 1.0 - float(np.median(ref_s)) / float(np.median(epoch_s))
  return timing


def _distortion(name, variables, x, targets, run_dir, attack_options):
  model = models.get_model(MODEL)
  rec = transfer.run_attack_cached(transfer.stable_apply(model), x, targets, params=variables,
                                   attack_options=attack_options, cache_dir=os.path.join(run_dir, "attack"),
                                   chunk_size=min(_CHUNK.value, x.shape[0]), cache_key=_digest(variables),
                                   name=name)
  return rec


def main(argv):
  del argv
  s = _settings()
  workdir = _WORKDIR.value
  progress.log_run_start(workdir, flags.FLAGS)
  try:
    c_grid = tuple(float(c) for c in _POOL_C.value)
  except ValueError as e:
    raise app.UsageError(f"--pool_c_grid must be numbers: {e}") from e
  if _POOL_RMS.value and _POOL_SCALE.value != 1.0:
    raise app.UsageError(f"--pool_rms={_POOL_RMS.value} and --pool_scale={_POOL_SCALE.value}: set one, not both "
                         "(--pool_rms is on by default; --pool_rms=0 turns it off)")
  (x_train, y_train), (x_test, y_test) = _load()
  if _NUM_VAL.value:  # the held-out images replace the test set everywhere below
    (x_train, y_train), (x_test, y_test) = data.train_val_split(x_train, y_train, num_val=_NUM_VAL.value, seed=0)
  if s["num_train"]:
    x_train, y_train = x_train[: s["num_train"]], y_train[: s["num_train"]]
  train_data, test_data = (np.asarray(x_train), np.asarray(y_train)), (np.asarray(x_test), np.asarray(y_test))
  recipe = dict(train.RECIPES[MODEL]["config"])
  recipe.update(epochs=s["epochs"], learning_rate=_LR.value, batch_size=_BATCH.value)
  configs = {}
  for name, flag in (("weight_decay", _WEIGHT_DECAY), ("adv_weight_decay", _ADV_WEIGHT_DECAY)):
    if flag.value is not None:
      try:
        configs[name] = tuple(float(v) for v in flag.value)
      except ValueError as e:
        raise app.UsageError(f"--{name} must be numbers: {e}") from e
  if "weight_decay" in configs:
    recipe["weight_decay"] = configs["weight_decay"]
  config = train.TrainConfig(**recipe)
  adv_config = config if "adv_weight_decay" not in configs else train.TrainConfig(
      **{**recipe, "weight_decay": configs["adv_weight_decay"]})
  steps_per_epoch = train_data[0].shape[0] // config.batch_size
  pool_config = at.PoolConfig(
      layers=tuple(_POOL_LAYERS.value), pool_size=s["pool_size"], refresh_every=s["refresh_every"],
      refresh_fraction=_REFRESH_FRACTION.value, mix_ratio=_MIX.value,
      warmup_steps=int(round(s["warmup_epochs"] * steps_per_epoch)), untargeted=_POOL_UNTARGETED.value,
      maxiter=_POOL_MAXITER.value, c_grid=c_grid, refine=_POOL_REFINE.value, perturbation_scale=_POOL_SCALE.value,
      pool_loss_weight=_POOL_LOSS_WEIGHT.value, perturbation_rms=_POOL_RMS.value or None)

  # The same test subset and targets for every model.
  if s["num_attack"]:
    idx = transfer.select_examples(test_data[1].shape[0], min(s["num_attack"], test_data[1].shape[0]),
                                   seed=_SEED.value)
    x_att, y_att = test_data[0][idx], test_data[1][idx]
    targets = transfer.draw_targets(y_att, seed=_SEED.value)
  else:
    idx = np.zeros((0,), np.int64)
  attack_options = {"maxiter": s["attack_maxiter"], "num_bisection": _ATTACK_BISECTION.value}
  if _SWEEP_SEEDS.value is not None:
    seeds = _sweep_seeds()
    _main_sweep(s, seeds, train_data, test_data, config, adv_config, pool_config,
                (x_att, y_att, targets) if s["num_attack"] else None, attack_options)
    return

  results = {}
  for name in RUNS:
    run_dir = os.path.join(workdir, name)
    if name not in _RUNS.value:
      if os.path.exists(os.path.join(run_dir, "result.json")):  # finished by another process: report it
        variables = jax.tree.map(jnp.asarray, checkpoint.load_pytree(os.path.join(run_dir, "final.msgpack")))
        results[name] = (variables, checkpoint.read_json(os.path.join(run_dir, "result.json")))
      continue
    results[name] = _train_run(name, train_data, test_data, adv_config if name == "adversarial" else config,
                               pool_config, run_dir)

  rows, summary = [], {}
  adv_records = {}
  err = _err_key()
  for name, (variables, result) in results.items():
    if err not in result:
      raise ValueError(f"{name} in {workdir} reports {sorted(k for k in result if k.endswith('_error'))}, not {err}: "
                       "it was trained with another --num_val")
    if not s["num_attack"]:
      summary[name] = {err: result[err], "train_error": result["train_error"], "paper_test_error": PAPER[name],
                       "train_seconds": float(np.sum(result["epoch_seconds"]))}
      continue
    t0 = time.perf_counter()
    rec = _distortion(name, variables, x_att, targets, os.path.join(workdir, name), attack_options)
    adv_records[name] = rec
    ok = np.asarray(rec.success)
    summary[name] = {err: result[err], "train_error": result["train_error"],
                     "paper_test_error": PAPER[name], "attack_success": float(ok.mean()),
                     "av_min_distortion": float(np.mean(rec.distortion[ok])) if ok.any() else float("nan"),
                     "median_min_distortion": float(np.median(rec.distortion[ok])) if ok.any() else float("nan"),
                     "train_seconds": float(np.sum(result["epoch_seconds"])),
                     "attack_seconds_this_call": time.perf_counter() - t0}
  if s["num_attack"] and len(adv_records) > 1:  # distortion over the examples every model was fooled on
    common = np.all([np.asarray(r.success) for r in adv_records.values()], axis=0)
    for name, rec in adv_records.items():
      summary[name]["num_common"] = int(common.sum())
      summary[name]["av_min_distortion_common"] = (float(np.mean(rec.distortion[common])) if common.any()
                                                   else float("nan"))
  timing = None
  if "adversarial" in results and s["num_attack"]:
    variables, result = results["adversarial"]
    ref_name = "dropout" if _ADV_DROPOUT.value else "weight_decay"
    reference = (ref_name, results[ref_name][1]) if ref_name in results else None
    timing = _generation_timing(variables, train_data, pool_config, result, reference)
  for name in summary:
    rows.append({"run": name, **summary[name]})

  out = {"settings": s, "train_config": config.to_dict(), "pool_config": pool_config.to_dict(),
         "attack_options": attack_options, "num_attacked": int(len(idx)), "summary": summary,
         "generation_timing": timing,
         **({"adversarial_train_config": adv_config.to_dict()} if adv_config is not config else {}),
         "evaluation_set": "validation" if _NUM_VAL.value else "test", "claims": _claims(summary, err)}
  checkpoint.atomic_write_json(os.path.join(workdir, "results.json"), out)
  _write_report(workdir, out, rows)
  for row in rows:
    logging.info("%s", row)


def _sweep_seeds():
  try:
    seeds = [int(v) for v in _SWEEP_SEEDS.value]
  except ValueError as e:
    raise app.UsageError(f"--sweep_seeds must be integers: {e}") from e
  if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
    raise app.UsageError(f"--sweep_seeds must be distinct integers >= 0, got {_SWEEP_SEEDS.value}")
  return seeds


def _train_sweep_run(name, seeds, train_data, test_data, config, pool_config, run_dir):
  """Trains (or restores) one run for all ``seeds`` as one program; returns (per-seed variables, result)."""
  want = {**_run_settings(name, config, pool_config), "seeds": seeds, "data_seed": _SEED.value}
  finished = _restore_finished(name, run_dir, want)
  if finished is not None:
    stacked, result = finished
    return train.unstack(stacked, len(seeds)), result
  x, y = train_data
  t0 = time.perf_counter()
  kw = dict(seeds=seeds, data_seed=_SEED.value, workdir=os.path.join(run_dir, "train"), eval_data=test_data)
  if name == "adversarial":
    res = at.train_with_pool_sweep(_run_model(name), x, y, config, pool_config, **kw)
  else:
    res = train.train_sweep(_run_model(name), x, y, config, **kw)
  seconds = time.perf_counter() - t0
  # Every member's errors in one stacked, float32 counting program (as metrics.error_rate counts one model).
  count = train.count_errors_fn(models.get_model(MODEL), stacked=True)
  errors = {key: train.evaluate(count, res.stacked_variables["params"], *data_, config.eval_batch_size).tolist()
            for key, data_ in ((_err_key(), test_data), ("train_error", train_data))}
  result = {"run": name, **errors, "train_seconds_this_call": seconds,
            "epoch_seconds": [float(h["seconds"]) for h in res.history], **want}
  checkpoint.save_pytree(os.path.join(run_dir, "final.msgpack"), res.stacked_variables)
  checkpoint.atomic_write_json(os.path.join(run_dir, "result.json"), result)
  logging.info("%s: %s %s (%.0fs for %d seeds)", name, _err_key(), np.round(result[_err_key()], 4), seconds,
               len(seeds))
  return res.variables, result


def _main_sweep(s, seeds, train_data, test_data, config, adv_config, pool_config, attack_set, attack_options):
  """--sweep_seeds: every run for all seeds, per-seed and mean results in results.json and the report."""
  workdir = _WORKDIR.value
  err = _err_key()
  results = {}
  for name in RUNS:
    run_dir = os.path.join(workdir, name)
    if name not in _RUNS.value and not os.path.exists(os.path.join(run_dir, "result.json")):
      continue  # not asked for, and not finished by another process (which would be restored and reported)
    results[name] = _train_sweep_run(name, seeds, train_data, test_data,
                                     adv_config if name == "adversarial" else config, pool_config, run_dir)
  per_seed = {name: [{err: result[err][i], "train_error": result["train_error"][i]} for i in range(len(seeds))]
              for name, (_, result) in results.items()}
  if attack_set is not None:
    x_att, _, targets = attack_set
    for name, (members, _) in results.items():
      for i, (seed, variables) in enumerate(zip(seeds, members)):
        rec = _distortion(f"{name}_seed{seed}", variables, x_att, targets, os.path.join(workdir, name, f"seed{seed}"),
                          attack_options)
        ok = np.asarray(rec.success)
        per_seed[name][i].update(attack_success=float(ok.mean()), av_min_distortion=(
            float(np.mean(rec.distortion[ok])) if ok.any() else float("nan")))
  rows, means = [], {}
  for i, seed in enumerate(seeds):
    row = {"seed": seed}
    for name in per_seed:
      row[f"{name}_{err}"] = per_seed[name][i][err]
      if "av_min_distortion" in per_seed[name][i]:
        row[f"{name}_distortion"] = per_seed[name][i]["av_min_distortion"]
    rows.append(row)
  for name in per_seed:
    e = np.array([r[err] for r in per_seed[name]])
    means[name] = {err: float(e.mean()), f"{err}_sd": float(e.std(ddof=1)) if len(e) > 1 else 0.0,
                   f"{err}_min": float(e.min()), f"{err}_max": float(e.max()), "paper_test_error": PAPER[name],
                   "train_seconds": float(np.sum(results[name][1]["epoch_seconds"]))}
    d = [r["av_min_distortion"] for r in per_seed[name] if "av_min_distortion" in r]
    if d:
      means[name]["av_min_distortion"] = float(np.mean(d))
  claims = {f"mean_{k}": v for k, v in _claims(means, err).items()}
  if all(n in per_seed for n in RUNS):
    seed_claims = [_claims({n: per_seed[n][i] for n in RUNS}, err) for i in range(len(seeds))]
    for key in seed_claims[0]:
      claims[f"seeds_with_{key}"] = f"{sum(c[key] for c in seed_claims)} of {len(seeds)}"
  out = {"settings": s, "seeds": seeds, "data_seed": _SEED.value, "train_config": config.to_dict(),
         "pool_config": pool_config.to_dict(), "attack_options": attack_options,
         "num_attacked": int(attack_set[0].shape[0]) if attack_set is not None else 0,
         "per_seed": per_seed, "mean": means, "claims": claims,
         **({"adversarial_train_config": adv_config.to_dict()} if adv_config is not config else {}),
         "evaluation_set": "validation" if _NUM_VAL.value else "test"}
  checkpoint.atomic_write_json(os.path.join(workdir, "results.json"), out)
  rep = report.Report(f"Adversarial training with a pool of adversarial examples (paper §4.2), {len(seeds)} seeds")
  rep.paragraph(f"Each run trained for seeds {seeds} as one vmapped program (batch order of seed {_SEED.value}). "
                f"Errors on the {out['evaluation_set']} set; distortion: mean RMS of the successful L-BFGS attacks "
                f"on {out['num_attacked']} images (the same for every model).")
  rep.table(rows, list(rows[0]), floatfmt=".4g", caption="Per seed")
  rep.table([{"run": n, **m} for n, m in means.items()], ["run"] + sorted({k for m in means.values() for k in m}),
            floatfmt=".4g", caption="Over the seeds (sd: sample standard deviation)")
  rep.heading("Claims checked")
  rep.bullets([f"{k}: {v}" for k, v in claims.items()] or ["(needs the adversarial run)"])
  rep.write(workdir, "report")
  for name, m in means.items():
    logging.info("%s: %s", name, m)


def _claims(summary, err="test_error"):
  claims = {}
  wd, do, adv = (summary.get(k) for k in RUNS)
  tag = "" if err == "test_error" else "_on_validation"
  if adv:
    claims[f"adversarial_error_at_most_1.2%{tag}"] = adv[err] <= 0.012
  if adv and wd and do:
    claims[f"adversarial_error_below_both_baselines{tag}"] = adv[err] < min(wd[err], do[err])
  if adv and wd and "av_min_distortion" in adv and "av_min_distortion" in wd:
    claims["adversarial_distortion_above_weight_decay"] = adv["av_min_distortion"] > wd["av_min_distortion"]
  return claims


def _write_report(workdir, out, rows):
  rep = report.Report("Adversarial training with a pool of adversarial examples (paper §4.2)")
  rep.paragraph("FC100-100-10 trained three ways on MNIST: weight decay only, weight decay + dropout, and weight "
                "decay + pools of adversarial examples (one pool per layer in pool_config.layers, a random "
                "fraction replaced every refresh_every steps with L-BFGS examples of the current network, mixed "
                "into every batch). Distortion: the same targeted L-BFGS attack (attack.lbfgs_attack, options "
                "below) on the same test images and random targets for every model; 'av. min. distortion' is "
                "the mean RMS over the examples the attack fooled, '(common)' over those fooled on all models.")
  cols = ["run", "val_error" if out["evaluation_set"] == "validation" else "test_error", "paper_test_error", "train_error", "av_min_distortion", "av_min_distortion_common",
          "median_min_distortion", "attack_success", "num_common", "train_seconds"]
  rep.table(rows, cols, floatfmt=".4g", caption=f"{out['num_attacked']} attacked {out['evaluation_set']} images "
            f"per model; errors on the {out['evaluation_set']} set")
  rep.heading("Claims checked")
  rep.bullets([f"{k}: {v}" for k, v in out["claims"].items()] or ["(needs all three runs)"])
  if out["generation_timing"]:
    t = out["generation_timing"]
    rep.heading("Cost of the pool generation")
    rep.paragraph(f"One refresh ({t['refresh_size']} new examples per pool, all pools) takes "
                  f"{t['seconds_per_refresh']:.3f}s with the final parameters; {t['refreshes_per_epoch']:.1f} "
                  f"refreshes per epoch = {t['generation_seconds_per_epoch']:.1f}s of a median "
                  f"{t['median_epoch_seconds']:.1f}s epoch ({100 * t['generation_share_of_epoch']:.0f}%; a "
                  "standalone call, an overestimate on accelerators)."
                  + (f" Measured in the runs: the median {t['reference_run']} epoch takes "
                     f"{t['reference_median_epoch_seconds']:.2f}s, so the pools take "
                     f"{100 * t['pool_share_of_epoch_vs_reference']:.0f}% of the adversarial epoch."
                     if "reference_run" in t else ""))
    rep.table([{"pool": k, **v} for k, v in t["final_params_attack"].items()], ["pool", "success", "distortion"],
              caption="Pool attack on the final network (success rate, mean RMS distortion in the layer)")
  rep.heading("Settings")
  rep.code("\n".join(f"{k}: {v}" for k, v in [("settings", out["settings"]), ("train_config", out["train_config"]),
                                               ("pool_config", out["pool_config"]),
                                               ("attack_options", out["attack_options"])]))
  rep.write(workdir, "report")


if __name__ == "__main__":
  app.run(main)
