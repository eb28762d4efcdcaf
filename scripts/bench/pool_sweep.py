r"""Benchmark of ``adversarial_training.train_with_pool_sweep``: seconds per model-epoch vs members.

Trains FC100-100-10 with the adversarial-training defaults (``configs/adversarial_training.py``: dropout
0.1/0.05, one input pool of 640, 16 new untargeted L-BFGS examples every 4 steps at RMS 0.035, mix 0.1,
Adam 1e-2) for a few epochs, alone (k = 0) and as sweeps of k seeds, the pool warm-up cut to
``warmup_steps`` so that every timed epoch refreshes. Prints the epoch times (the first compiles) and the
mean seconds per model-epoch after the first; a sweep's speed-up is one run's figure over the sweep's.

Command::

    python scripts/bench/pool_sweep.py --config.epochs=3

Expected (2 CPU cores, idle, session 6, ~2 min; notes/adversarial_training.md): 1.50 s per model-epoch alone,
1.41 s at k = 4, 1.45 s at k = 8 (1.07x, 1.03x): no real speed-up on the CPU; the sweep is meant for
accelerators. With ``--workdir`` the rows also go to ``<workdir>/bench_pool_sweep.json``.
"""

import numpy as np

from intriguing_jax import adversarial_training as at
from intriguing_jax import attack
from intriguing_jax import cli
from intriguing_jax import data
from intriguing_jax import models
from intriguing_jax import train

FLAGS = cli.define_flags("bench_train", workdir_required=False,
                         workdir_help="If set, the figures also go to <workdir>/bench_pool_sweep.json.")


def main(argv):
  cli.check_no_args(argv)
  c = FLAGS.config.value
  x, y = data.load_mnist("train", FLAGS.data_dir.value)
  x, y = (x[:c.num_train], y[:c.num_train]) if c.num_train else (x, y)
  recipe = train.RECIPES["fc100-100-10"]["config"]
  config = train.TrainConfig(**{**recipe, "epochs": c.epochs, "learning_rate": 1e-2})
  pool = at.PoolConfig(**{**c.pool, "warmup_steps": c.warmup_steps,
                          "attack": attack.AttackOptions(**c.pool.attack)})
  model = models.get_model("fc100-100-10", dropout_rate=0.1, input_dropout_rate=0.05)
  rows = []
  for k in c.ks:
    res = (at.train_with_pool(model, x, y, config, pool) if k == 0
           else at.train_with_pool_sweep(model, x, y, config, pool, seeds=list(range(k))))
    secs = [h["seconds"] for h in res.history]
    per_model = float(np.mean(secs[1:])) / max(k, 1)
    rows.append(dict(k=k, epoch_seconds=secs, seconds_per_model_epoch=per_model))
    print(f"k={k:3d}  epochs {[round(s, 2) for s in secs]} s  ->  {per_model:.3f} s per model-epoch",
          flush=True)
  base = {row["k"]: row["seconds_per_model_epoch"] for row in rows}.get(0)
  for row in rows if base else ():
    row["speed_up"] = base / row["seconds_per_model_epoch"]
    print(f"k={row['k']:3d}  speed-up vs one run: {row['speed_up']:.2f}x")
  cli.write_figures(FLAGS.workdir.value, "bench_pool_sweep", {"num_train": int(x.shape[0]), "rows": rows}, c)


if __name__ == "__main__":
  cli.run(main)
