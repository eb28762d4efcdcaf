r"""Benchmark: a vmapped 3-λ FC10 sweep (one compiled program) vs three sequential runs.

Command (CPU, 2 shared cores, ~1-2 min; figures in notes/models.md):

  python -m scripts.bench_train --epochs=5
  python -m scripts.bench_train --epochs=3 --model=fc100-100-10     # same comparison for a sigmoid net

Both modes train the same three models (λ = 1e-4, 1e-2, 1, same seed, same data order) for --epochs on
the MNIST training set (--synthetic: random data of the same size, no files needed). Printed per mode:
total wall time (compilation included), compile+first-epoch time, and the steady-state throughput
(model-examples per second over the epochs after the first), plus the sweep's speed-up.
"""

import time

from absl import app
from absl import flags
import numpy as np

from intriguing_jax import data
from intriguing_jax import models
from intriguing_jax import train

_EPOCHS = flags.DEFINE_integer("epochs", 5, "Epochs per model (>= 2: the first one includes compilation).",
                               lower_bound=2)
_BATCH = flags.DEFINE_integer("batch_size", 128, "Batch size.", lower_bound=1)
_MODEL = flags.DEFINE_string("model", "fc10", "Model name (models.get_model).")
_LAMBDAS = flags.DEFINE_list("weight_decays", ["1e-4", "1e-2", "1"], "λ of the swept models.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "MNIST IDX directory (default: $INTRIGUING_JAX_MNIST_DIR).")
_SYNTHETIC = flags.DEFINE_bool("synthetic", False, "Use 60000 synthetic images instead of MNIST.")


def _summary(histories, total):
  """(total, first-epoch seconds, steady model-examples/s) from per-run histories."""
  first = sum(h[0]["seconds"] for h in histories)
  steady_sec = sum(r["seconds"] for h in histories for r in h[1:])
  steady_examples = sum(r["examples_per_sec"] * r["seconds"] for h in histories for r in h[1:])
  return total, first, steady_examples / steady_sec


def main(argv):
  del argv
  if _SYNTHETIC.value:
    x, y = data.synthetic_mnist(60000, seed=0)
  else:
    x, y = data.load_mnist("train", _DATA_DIR.value)
  x, y = np.asarray(x, np.float32), np.asarray(y, np.int32)
  lams = [float(v) for v in _LAMBDAS.value]
  model = models.get_model(_MODEL.value)
  config = train.TrainConfig(epochs=_EPOCHS.value, batch_size=_BATCH.value, learning_rate=3e-3)

  t0 = time.perf_counter()
  sweep = train.train_sweep(model, x, y, config, weight_decays=lams, seeds=[0], data_seed=0)
  sweep_stats = _summary([sweep.history], time.perf_counter() - t0)

  # Sequential runs: the compiled program is shared between them (λ is traced), as a user would get.
  t0 = time.perf_counter()
  histories = []
  for lam in lams:
    cfg = train.TrainConfig(**{**config.to_dict(), "weight_decay": (lam,)})
    histories.append(train.train_model(model, x, y, cfg, seed=0, data_seed=0).history)
  seq_stats = _summary(histories, time.perf_counter() - t0)

  print(f"{_MODEL.value}, {len(lams)} models (λ = {', '.join(_LAMBDAS.value)}), {_EPOCHS.value} epochs, "
        f"batch {_BATCH.value}, {x.shape[0]} examples")
  print(f"{'mode':<22}{'total s':>10}{'1st epoch(s) s':>16}{'steady model-ex/s':>20}")
  for name, (total, first, thr) in (("vmapped sweep", sweep_stats), ("3 sequential runs", seq_stats)):
    print(f"{name:<22}{total:>10.2f}{first:>16.2f}{thr:>20.0f}")
  print(f"speed-up of the sweep: total {seq_stats[0] / sweep_stats[0]:.2f}x, "
        f"steady-state throughput {sweep_stats[2] / seq_stats[2]:.2f}x")


if __name__ == "__main__":
  app.run(main)
