r"""Benchmark: a vmapped 3-λ sweep (one compiled program) vs three sequential ``train_model`` runs.

Commands (CPU, 2 shared cores, ~1-2 min; figures in notes/models.md)::

    python scripts/bench/train.py --config.epochs=5
    python scripts/bench/train.py --config=intriguing_jax/configs/bench_train.py:sigmoid --config.epochs=3

Both modes train the same models (λ = 1e-4, 1e-2, 1, seed 0, same batches) on MNIST (``--config.synthetic``:
random data of the same size). Prints per mode the total wall time (compilation included), the first
epoch(s) and the steady-state throughput (model-examples per second after the first epoch), and the speed-up.
With ``--workdir`` the figures also go to ``<workdir>/bench_train.json``.
"""

import dataclasses
import time

from intriguing_jax import cli
from intriguing_jax import data
from intriguing_jax import models
from intriguing_jax import train

FLAGS = cli.define_flags("bench_train", workdir_required=False,
                         workdir_help="If set, the figures also go to <workdir>/bench_train.json.")


def _summary(histories, total, members, examples):
  """(total s, first-epoch s, steady model-examples/s) of per-run histories."""
  first = sum(h[0]["seconds"] for h in histories)
  steady = sum(r["seconds"] for h in histories for r in h[1:])
  return total, first, members * examples * sum(len(h) - 1 for h in histories) / max(steady, 1e-9)


def main(argv):
  cli.check_no_args(argv)
  c = FLAGS.config.value
  x, y = (data.synthetic_mnist(60000, seed=0) if c.synthetic
          else data.load_mnist("train", FLAGS.data_dir.value))
  x, y = (x[:c.num_train], y[:c.num_train]) if c.num_train else (x, y)
  model = models.get_model(c.model)
  config = train.TrainConfig(epochs=c.epochs, learning_rate=3e-3)
  examples = (x.shape[0] // config.batch_size) * config.batch_size
  t0 = time.perf_counter()
  sweep = train.train_sweep(model, x, y, config, weight_decays=list(c.weight_decays), seeds=[0], data_seed=0)
  total = time.perf_counter() - t0
  rows = {"vmapped sweep": _summary([sweep.history], total, len(c.weight_decays), examples)}
  t0 = time.perf_counter()
  histories = [train.train_model(model, x, y, dataclasses.replace(config, weight_decay=(lam,)), seed=0,
                                 data_seed=0).history for lam in c.weight_decays]
  rows["sequential runs"] = _summary(histories, time.perf_counter() - t0, 1, examples)
  print(f"{c.model}, λ = {tuple(c.weight_decays)}, {c.epochs} epochs, {x.shape[0]} examples")
  print(f"{'mode':<18}{'total s':>10}{'1st epoch(s) s':>16}{'steady model-ex/s':>20}")
  for name, (total, first, thr) in rows.items():
    print(f"{name:<18}{total:>10.2f}{first:>16.2f}{thr:>20.0f}")
  (ts, _, rs), (tq, _, rq) = rows.values()
  print(f"speed-up of the sweep: total {tq / ts:.2f}x, steady-state throughput {rs / rq:.2f}x")
  cli.write_figures(FLAGS.workdir.value, "bench_train",
                    dict(columns=["total_s", "first_epochs_s", "steady_model_examples_per_s"], rows=rows), c)


if __name__ == "__main__":
  cli.run(main)
