r"""Benchmark of adversarial_training.train_with_pool_sweep: seconds per model and epoch vs the number of members.

Trains FC100-100-10 with the adversarial_training.py defaults (dropout 0.1/0.05, one input pool of 640, 16 new
untargeted L-BFGS examples every 4 steps at RMS 0.035, mix 0.1, Adam 1e-2) for a few epochs, once alone
(``train_with_pool``, k = 0 in ``--ks``) and as sweeps of k seeds (``train_with_pool_sweep``), with the pool
warm-up cut to ``--warmup_steps`` so that every timed epoch refreshes. Prints the epoch times (the first
includes compilation) and the mean seconds per model per epoch over the later epochs; the model-epochs per
second of a sweep divided by those of one run alone is its speed-up.

Command::

    nice -n 5 .venv/bin/python scripts/bench_pool_sweep.py --data_dir=../shared/data/mnist --ks=0,4,8 \
        --out=runs/bench_pool_sweep.json

Expected result (2 CPU cores, idle, session 6, the command above, ~2 min; BUILD_NOTES.md, "Adversarial
training (issue 8)"): 1.50 s per model-epoch alone, 1.41 s at k = 4, 1.45 s at k = 8, i.e. 1.07x and 1.03x:
no real speed-up on the CPU, where one run already keeps both cores busy. The sweep is meant for
accelerators, where one refresh of 16 examples is latency-bound (not measured there yet).
"""

import time

from absl import app
from absl import flags
import numpy as np

from intriguing_jax import adversarial_training as at
from intriguing_jax import checkpoint
from intriguing_jax import data
from intriguing_jax import models
from intriguing_jax import train

MODEL = "fc100-100-10"

_DATA_DIR = flags.DEFINE_string("data_dir", None, "MNIST IDX directory (default $INTRIGUING_JAX_MNIST_DIR).")
_KS = flags.DEFINE_list("ks", ["0", "4", "8"], "Members per sweep; 0 = one train_with_pool run.")
_EPOCHS = flags.DEFINE_integer("epochs", 3, "Epochs per measurement (the first one compiles).", lower_bound=2)
_WARMUP = flags.DEFINE_integer("warmup_steps", 10, "Clean steps before the pool is filled.", lower_bound=0)
_NUM_TRAIN = flags.DEFINE_integer("num_train", None, "Use the first N training images (default all).",
                                  lower_bound=128)
_OUT = flags.DEFINE_string("out", None, "Write the figures as JSON here (atomically).")


def main(argv):
  del argv
  try:
    ks = [int(k) for k in _KS.value]
  except ValueError as e:
    raise app.UsageError(f"--ks must be integers: {e}") from e
  if not ks or min(ks) < 0:
    raise app.UsageError(f"--ks must be integers >= 0, got {_KS.value}")
  x, y = data.load_mnist("train", _DATA_DIR.value)
  if _NUM_TRAIN.value:
    x, y = x[: _NUM_TRAIN.value], y[: _NUM_TRAIN.value]
  config = train.TrainConfig(**{**train.RECIPES[MODEL]["config"], "epochs": _EPOCHS.value, "learning_rate": 1e-2})
  pool = at.PoolConfig(layers=("input",), pool_size=640, refresh_every=4, refresh_fraction=0.025, mix_ratio=0.1,
                       warmup_steps=_WARMUP.value, untargeted=True, maxiter=10, c_grid=(0.1, 1.0),
                       perturbation_rms=0.035)
  model = models.get_model(MODEL, dropout_rate=0.1, input_dropout_rate=0.05)
  rows = []
  for k in ks:
    t0 = time.perf_counter()
    if k == 0:
      res = at.train_with_pool(model, x, y, config, pool, seed=0)
    else:
      res = at.train_with_pool_sweep(model, x, y, config, pool, seeds=list(range(k)))
    secs = [float(h["seconds"]) for h in res.history]
    per_model = float(np.mean(secs[1:])) / max(k, 1)
    rows.append({"k": k, "epoch_seconds": secs, "seconds_per_model_epoch": per_model,
                 "wall_seconds": time.perf_counter() - t0})
    print(f"k={k:3d}  epochs {[round(s, 2) for s in secs]} s  ->  {per_model:.3f} s per model-epoch", flush=True)
  base = next((r["seconds_per_model_epoch"] for r in rows if r["k"] == 0), None)
  if base is not None:
    for r in rows:
      r["speedup_vs_one_run"] = base / r["seconds_per_model_epoch"]
      print(f"k={r['k']:3d}  speed-up vs one run: {r['speedup_vs_one_run']:.2f}x")
  if _OUT.value:
    checkpoint.atomic_write_json(_OUT.value, {"num_train": int(x.shape[0]), "pool_config": pool.to_dict(),
                                              "rows": rows})


if __name__ == "__main__":
  app.run(main)
