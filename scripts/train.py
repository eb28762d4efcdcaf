r"""Train the paper's MNIST models (Table 1 and Table 3) and report train/test error.

Commands (CPU, 2 cores at load average 12-23; measured train/test error, training wall time; paper in
brackets; details in notes/models.md):

  # Table 1 (checkpoints kept in runs/models/<name>/, reused by train.get_or_train):
  python -m scripts.train --model=fc10-1e-4 --workdir=runs/models     # 6.75% / 7.42%, 40 s   [6.7 / 7.4]
  python -m scripts.train --model=fc10-1e-2 --workdir=runs/models     # 9.87% / 9.29%, 32 s   [10 / 9.4]
  python -m scripts.train --model=fc10-1 --workdir=runs/models        # 23.04% / 21.70%, 39 s [21.2 / 20]
  python -m scripts.train --model=fc100-100-10 --workdir=runs/models  # 0.00% / 1.74%, 139 s  [0 / 1.64]
  python -m scripts.train --model=fc200-200-10 --workdir=runs/models  # 0.00% / 1.67%, 171 s  [0 / 1.54]
  python -m scripts.train --model=ae400-10 --workdir=runs/models      # see notes/models.md   [0.57 / 1.9]
  python -m scripts.train --model=mnist_conv --workdir=runs/models    # ConvNet for unit analysis
  # Table 3 (P1 = first 30000 training images, P2 = last 30000); the "-t3" recipes use 10x Table 1's λ:
  python -m scripts.train --model=fc100-100-10-t3 --split=p1 --workdir=runs/models            # 0.01% / 2.17%, 175 s [0 / 2.0]
  python -m scripts.train --model=fc123-456-10-t3 --split=p1 --workdir=runs/models            # 0.01% / 2.00%, 218 s [0 / 2.1]
  python -m scripts.train --model=fc100-100-10-t3 --split=p2 --seed=1 --workdir=runs/models   # 0.01% / 2.25%, 111 s [0 / 2.1]
  #   (with Table 1's λ, --model=fc100-100-10 / fc123-456-10: test 2.38%, 2.30%, 2.51%)
  # A vmapped λ sweep (one compiled program; per-layer λ separated by ':'):
  python -m scripts.train --model=fc10 --sweep_weight_decays=1e-4,1e-2,1 --workdir=runs/sweeps
  # The weight-decay convention experiment of notes/models.md (repeat with sum / half_sum):
  python -m scripts.train --model=fc10 --sweep_weight_decays=1e-4,1e-2,1 --decay_form=per_unit \
      --workdir=runs/conventions

Without --weight_decay/--epochs/... the model's recipe (``train.RECIPES``) is used; flags that are set
override it. A finished run in the workdir is restored instead of retrained; an interrupted one resumes.
The data come from --data_dir (MNIST IDX files), else $INTRIGUING_JAX_MNIST_DIR, else TensorFlow Datasets.
"""

import functools
import json
import os

from absl import app
from absl import flags
from absl import logging
import numpy as np

from intriguing_jax import checkpoint
from intriguing_jax import data
from intriguing_jax import metrics
from intriguing_jax import models
from intriguing_jax import progress
from intriguing_jax import train

_MODEL = flags.DEFINE_string("model", "fc100-100-10",
                             "Recipe/model name: " + ", ".join(sorted(train.RECIPES)) + " or fc<w1>-<w2>-10.")
_WIDTHS = flags.DEFINE_list("widths", None, "Hidden widths of a sigmoid net, e.g. 123,456 (overrides --model).")
_WEIGHT_DECAY = flags.DEFINE_list("weight_decay", None, "Per-layer λ, input -> output (one value: every layer).")
_SWEEP = flags.DEFINE_list("sweep_weight_decays", None,
                           "Train one model per entry as one vmapped program; an entry is λ or λ1:λ2:λ3.")
_DECAY_FORM = flags.DEFINE_enum("decay_form", None, ["per_unit", "sum", "half_sum"],
                                "λΣw²/k, λΣw² or ½λΣw² (default: recipe, half_sum).")
_DATA_TERM = flags.DEFINE_enum("data_term", None, ["mean", "sum"], "Mean or summed cross-entropy.")
_EPOCHS = flags.DEFINE_integer("epochs", None, "Epochs (default: recipe).", lower_bound=1)
_OPTIMIZER = flags.DEFINE_enum("optimizer", None, ["adam", "sgd", "momentum"], "Optimiser (default: recipe).")
_LR = flags.DEFINE_float("learning_rate", None, "Peak learning rate (default: recipe).", lower_bound=0.0)
_SCHEDULE = flags.DEFINE_enum("schedule", None, ["constant", "cosine"], "Learning-rate schedule.")
_BATCH = flags.DEFINE_integer("batch_size", None, "Batch size (default: recipe).", lower_bound=1)
_DROPOUT = flags.DEFINE_float("dropout_rate", None, "Dropout between hidden layers (sigmoid nets).",
                              lower_bound=0.0, upper_bound=0.95)
_SEED = flags.DEFINE_integer("seed", 0, "Init seed (sweeps: the first seed).", lower_bound=0)
_SPLIT = flags.DEFINE_enum("split", "full", ["full", "p1", "p2"],
                           "Training set: all 60000, P1 (first 30000) or P2 (last 30000), paper.md A15.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/models", "Parent directory of the runs.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "MNIST IDX directory (default: $INTRIGUING_JAX_MNIST_DIR).")


def _overrides():
  out = {}
  if _WEIGHT_DECAY.value:
    out["weight_decay"] = tuple(float(v) for v in _WEIGHT_DECAY.value)
  for key, flag in (("decay_form", _DECAY_FORM), ("data_term", _DATA_TERM), ("optimizer", _OPTIMIZER),
                    ("learning_rate", _LR), ("schedule", _SCHEDULE), ("batch_size", _BATCH)):
    if flag.value is not None:
      out[key] = flag.value
  return out


def _parse_sweep(entries):
  out = []
  for e in entries:
    try:
      vals = [float(v) for v in e.split(":")]
    except ValueError as err:
      raise app.UsageError(f"--sweep_weight_decays: cannot parse {e!r} ({err})")
    out.append(vals[0] if len(vals) == 1 else vals)
  return out


def main(argv):
  del argv
  name = _MODEL.value.lower()
  if _WIDTHS.value:
    name = "fc" + "-".join(_WIDTHS.value + ["10"])
  try:
    recipe = train._recipe(name)  # pylint: disable=protected-access
  except ValueError as e:
    raise app.UsageError(str(e))
  model_kwargs = dict(recipe.get("model_kwargs", {}))
  if _DROPOUT.value:
    model_kwargs["dropout_rate"] = _DROPOUT.value

  x, y = data.load_mnist("train", _DATA_DIR.value)
  xt, yt = data.load_mnist("test", _DATA_DIR.value)
  (x1, y1), (x2, y2) = data.split_p1_p2(x, y)
  train_x, train_y = {"full": (x, y), "p1": (x1, y1), "p2": (x2, y2)}[_SPLIT.value]
  overrides = _overrides()

  if _SWEEP.value:
    if "pretrain" in recipe:
      raise app.UsageError("--sweep_weight_decays does not support the two-stage AE recipe")
    lams = _parse_sweep(_SWEEP.value)
    model = models.get_model(recipe["model"], **model_kwargs)
    cfg = dict(recipe["config"], **overrides)
    if _EPOCHS.value:
      cfg["epochs"] = _EPOCHS.value
    config = train.TrainConfig(**cfg)
    tag = train.default_run_name(name, seed=_SEED.value, overrides={"sweep": _SWEEP.value, **overrides,
                                                                     "epochs": _EPOCHS.value,
                                                                     "model_kwargs": model_kwargs},
                                 data_tag="" if _SPLIT.value == "full" else _SPLIT.value)
    run_dir = os.path.join(_WORKDIR.value, tag + "_sweep")
    progress.log_run_start(run_dir, flags.FLAGS)
    with progress.Timer() as timer:
      res = train.train_sweep(model, train_x, train_y, config, weight_decays=lams, seeds=[_SEED.value],
                              data_seed=_SEED.value, workdir=run_dir, eval_data=(xt, yt))
    rows = []
    for lam, variables in zip(res.weight_decays, res.variables):
      f = functools.partial(model.apply, variables)
      rows.append({"weight_decay": [float(f"{v:.6g}") for v in lam.tolist()], "train_error": metrics.error_rate(f, train_x, train_y),
                   "test_error": metrics.error_rate(f, xt, yt)})
    checkpoint.atomic_write_json(os.path.join(run_dir, "result.json"),
                                 {"config": config.to_dict(), "rows": rows, "seconds": timer.seconds})
    for r in rows:
      print(f"{name} λ={r['weight_decay']} ({config.decay_form}, {config.data_term}): "
            f"train error {100 * r['train_error']:.2f}%  test error {100 * r['test_error']:.2f}%")
    print(f"sweep of {len(rows)} models: {timer.seconds:.1f}s")
    return

  run_name = train.default_run_name(name, seed=_SEED.value,
                                    overrides=dict(overrides, **({"model_kwargs": model_kwargs}
                                                                 if model_kwargs else {})),
                                    epochs=_EPOCHS.value, data_tag="" if _SPLIT.value == "full" else _SPLIT.value)
  progress.log_run_start(os.path.join(_WORKDIR.value, run_name), flags.FLAGS)
  with progress.Timer() as timer:
    model, variables = train.get_or_train(name, train_x, train_y, workdir=_WORKDIR.value, seed=_SEED.value,
                                          epochs=_EPOCHS.value, run_name=run_name, eval_data=(xt, yt),
                                          model_kwargs=model_kwargs or None, **overrides)
  f = functools.partial(model.apply, variables)
  result = checkpoint.read_json(os.path.join(_WORKDIR.value, run_name, "result.json"))
  line = (f"{name} [{_SPLIT.value}] ({run_name}): train error {100 * metrics.error_rate(f, train_x, train_y):.2f}%"
          f"  test error {100 * metrics.error_rate(f, xt, yt):.2f}%")
  if _SPLIT.value != "full":
    line += (f"  P1 error {100 * metrics.error_rate(f, x1, y1):.2f}%"
             f"  P2 error {100 * metrics.error_rate(f, x2, y2):.2f}%")
  print(line)
  print(f"training wall time {result['train_seconds']:.1f}s (this call {timer.seconds:.1f}s); "
        f"run dir {os.path.join(_WORKDIR.value, run_name)}")
  logging.info("result: %s", json.dumps(result))


if __name__ == "__main__":
  app.run(main)
